
e1"W
U*S
2
defaultwhole-units:split.smi-spec.io/v1alpha1api
api-v1è
api-v2¸