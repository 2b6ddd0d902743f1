# Least-privilege ACL policy for the consul-smi writer (verified against Consul 1.8.7).
# - intentions = "write": create/update/delete intentions whose destination is any service
#   (legacy API) and service-intentions config entries (1.9+).
# - policy = "write": service-defaults and service-splitter config entries need service:write
#   on the entry's service (Consul requires a `policy` in every service rule anyway).
# Narrow the prefix ("" = all services) if the writer manages only some services.
service_prefix "" {
  policy     = "write"
  intentions = "write"
}
