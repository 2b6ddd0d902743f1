
e1"6
42
0
default	tcp-route:specs.smi-spec.io/v1alpha3