//! The gRPC contract between consul-smi services, generated from `proto/`, plus lossless
//! conversions between the wire types and the domain types of `consul-smi-api` (hub) and
//! `consul-smi-core` (Consul state and commands).

#[allow(clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("consul_smi.v1");
}

/// Hub model (`consul-smi-api`) <-> wire types of `smi.proto`/`watch.proto`.
pub mod smi;
/// mTLS between the services (certificate hot reload) and the plaintext peer policy.
pub mod tls;
/// Consul state and commands (`consul-smi-core`) <-> wire types of `writer.proto`.
pub mod writer;
