
e1"I
GE
0
default	tcp-ports:specs.smi-spec.io/v1alpha4
	tcp-portsê®2