//! Real Consul dev agents for tests.
