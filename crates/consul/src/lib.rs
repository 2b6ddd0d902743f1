//! Consul HTTP API client.
