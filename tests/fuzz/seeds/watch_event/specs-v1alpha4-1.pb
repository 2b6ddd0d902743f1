
e1"¬
©¦
1
default
the-routes:specs.smi-spec.io/v1alpha4
metricsGET/metricsW
android-insecure"

user-agent.*Android.*"(
cookie^(.*?;)?(type=insecure)(;.*)?$