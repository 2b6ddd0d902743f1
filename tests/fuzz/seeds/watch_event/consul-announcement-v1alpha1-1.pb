
e1"?
=;
9
defaultcounting-tcp-route:specs.smi-spec.io/v1alpha1