
e1"
*Š
.
defaultab-test:split.smi-spec.io/v1alpha4website

website-v1N

website-v2¿",
HTTPRouteGroupab-testspecs.smi-spec.io