use consul_smi_core::Outcome;

/// A failed Consul request, classified by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    #[error("invalid Consul client configuration: {0}")]
    Config(String),

    /// Consul refused the request as invalid. Consul 1.8 reports validation errors as
    /// HTTP 500 with a plain-text body (`1 error occurred:\n\t* ...`), newer ones as 400.
    #[error("Consul rejected {what}: {message}")]
    Validation { what: String, message: String },

    /// 403: the token is missing, unknown, or lacks the ACL rights for this request.
    #[error("Consul denied {what} (HTTP 403 {message:?}): {hint}")]
    PermissionDenied {
        what: String,
        message: String,
        hint: String,
    },

    #[error("{what} not found in Consul: {message}")]
    NotFound { what: String, message: String },

    /// Transient failures (connection errors, 429, non-validation 5xx) outlasted the retries.
    #[error("Consul unavailable for {what} after {attempts} attempts: {message}")]
    Unavailable {
        what: String,
        attempts: u32,
        message: String,
    },

    #[error("unexpected Consul response to {what} (HTTP {status}): {message}")]
    Unexpected {
        what: String,
        status: u16,
        message: String,
    },

    #[error("cannot decode Consul's response to {what}: {message}")]
    Decode { what: String, message: String },

    /// consul-smi itself refused to send the request: a name that is not a Kubernetes name
    /// (it could address another endpoint with the writer's token), or an answer it does not
    /// follow (a redirect).
    #[error("refused {what}: {message}")]
    Refused { what: String, message: String },
}

impl ConsulError {
    /// The per-command outcome this error maps to.
    pub fn outcome(&self) -> Outcome {
        match self {
            ConsulError::Validation { .. } | ConsulError::PermissionDenied { .. } => {
                Outcome::Rejected
            }
            ConsulError::Config(_) | ConsulError::Refused { .. } => Outcome::Rejected,
            ConsulError::NotFound { .. }
            | ConsulError::Unavailable { .. }
            | ConsulError::Unexpected { .. }
            | ConsulError::Decode { .. } => Outcome::Failed,
        }
    }

    pub fn is_permission_denied(&self) -> bool {
        matches!(self, ConsulError::PermissionDenied { .. })
    }
}
