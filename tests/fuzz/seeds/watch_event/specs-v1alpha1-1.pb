
e1"e
ca
1
default
the-routes:specs.smi-spec.io/v1alpha1
metricsGET/metrics
health*/ping