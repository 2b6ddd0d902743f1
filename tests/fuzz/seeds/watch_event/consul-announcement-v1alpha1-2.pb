
e1"ª
§
¤
?
defaultcounting-traffic-target:access.smi-spec.io/v1alpha1#
ServiceAccountcountingdefault"$
ServiceAccount	dashboarddefault*counting-tcp-route