
e1"ê
ç
ä
5
defaultpath-specific:access.smi-spec.io/v1alpha3$
ServiceAccount	service-adefault"%
ServiceAccount
prometheusdefault"
ServiceAccountgrafana*the-tcp-route*the-http-route	
metrics*the-udp-route