//! Conversions between Consul state/commands and their wire form.
