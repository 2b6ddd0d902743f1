use consul_smi_consul::ConsulError;

#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    #[error(transparent)]
    Consul(#[from] ConsulError),

    #[error("gRPC server failed: {0}")]
    Server(#[from] tonic::transport::Error),

    #[error(transparent)]
    Tls(#[from] consul_smi_grpc::tls::TlsError),
}
