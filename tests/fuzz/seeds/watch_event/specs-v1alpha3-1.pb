
e1"s
qo
1
default
the-routes:specs.smi-spec.io/v1alpha3
metricsGET/metrics 
health*/ping"
x-debug1