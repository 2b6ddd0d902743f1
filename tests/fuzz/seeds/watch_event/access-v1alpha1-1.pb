
e1"∫
∑
¥
G
defaultpath-specific2
app	service-a:access.smi-spec.io/v1alpha1$
ServiceAccount	service-adefaultê?"%
ServiceAccount
prometheusdefault*
the-routes	
metrics