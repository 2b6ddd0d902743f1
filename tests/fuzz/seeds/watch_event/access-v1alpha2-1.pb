
e1"®
•
¢
5
defaultpath-specific:access.smi-spec.io/v1alpha2$
ServiceAccount	service-adefaultê?"%
ServiceAccount
prometheusdefault*
the-routes	
metrics