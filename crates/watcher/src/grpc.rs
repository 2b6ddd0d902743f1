//! `consul_smi.v1.SmiWatch`: one bounded channel and one task per subscriber, fed by
//! [`SharedStore::run_subscription`].

use std::sync::Arc;

use consul_smi_grpc::v1;
use consul_smi_grpc::v1::smi_watch_client::SmiWatchClient;
use consul_smi_grpc::v1::smi_watch_server::SmiWatch;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::WatcherError;
use crate::shared::SharedStore;

#[derive(Clone)]
pub struct WatchService {
    shared: Arc<SharedStore>,
    buffer: usize,
}

impl WatchService {
    /// `buffer`: events queued per subscriber before the watcher waits for it to read.
    pub fn new(shared: Arc<SharedStore>, buffer: usize) -> WatchService {
        WatchService {
            shared,
            buffer: buffer.max(1),
        }
    }
}

#[tonic::async_trait]
impl SmiWatch for WatchService {
    type WatchStream = ReceiverStream<Result<v1::WatchEvent, tonic::Status>>;

    async fn watch(
        &self,
        request: tonic::Request<v1::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(self.buffer);
        tokio::spawn(self.shared.clone().run_subscription(request, tx));
        Ok(tonic::Response::new(ReceiverStream::new(rx)))
    }
}

/// The event stream [`subscribe`] returns.
pub type WatchEventStream = tonic::Streaming<v1::WatchEvent>;

/// Subscribes to a watcher at `endpoint` (e.g. `http://127.0.0.1:7401`). Pass an empty
/// `epoch` for a fresh snapshot, or the epoch and last revision seen to resume; the stream
/// starts with `SnapshotBegin{REASON_RESUME_UNAVAILABLE}` when the watcher cannot resume.
pub async fn subscribe(
    endpoint: impl Into<String>,
    epoch: impl Into<String>,
    after_revision: u64,
    subscriber: impl Into<String>,
) -> Result<WatchEventStream, WatcherError> {
    let mut client = SmiWatchClient::connect(endpoint.into())
        .await?
        .max_decoding_message_size(consul_smi_grpc::smi::WATCH_MESSAGE_LIMIT);
    let request = v1::WatchRequest {
        epoch: epoch.into(),
        after_revision,
        subscriber: subscriber.into(),
    };
    Ok(client.watch(request).await?.into_inner())
}
