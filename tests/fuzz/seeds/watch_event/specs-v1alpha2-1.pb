
e1"²
¯¬
1
default
the-routes:specs.smi-spec.io/v1alpha2W
android-insecure"(
cookie^(.*?;)?(type=insecure)(;.*)?$"

user-agent.*Android.*
metricsGETHEAD/metrics