
e1"@
>"<
0
default	udp-ports:specs.smi-spec.io/v1alpha4
dns5