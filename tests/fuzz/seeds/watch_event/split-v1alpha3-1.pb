
e1"x
v*t
.
defaultab-test:split.smi-spec.io/v1alpha3website

website-v1

website-v2†ç"
HTTPRouteGroupab-test