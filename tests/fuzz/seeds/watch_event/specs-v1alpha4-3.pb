
e1"4
20
.
defaulttcp-all:specs.smi-spec.io/v1alpha4