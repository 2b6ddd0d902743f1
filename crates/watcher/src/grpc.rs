//! `consul_smi.v1.SmiWatch`: one bounded channel and one task per subscriber, fed by
//! [`SharedStore::run_subscription_with`], at most [`SubscriberLimits::max_subscribers`] at
//! once.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use consul_smi_grpc::v1;
use consul_smi_grpc::v1::smi_watch_client::SmiWatchClient;
use consul_smi_grpc::v1::smi_watch_server::SmiWatch;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tracing::warn;

use crate::WatcherError;
use crate::shared::{Ended, SharedStore};

/// How many subscriptions the watcher serves at once (the translator is normally the only
/// one; `consul-smi` tools and replicas add a few), and how long one may leave its queue
/// full before it is dropped.
#[derive(Clone, Copy, Debug)]
pub struct SubscriberLimits {
    pub max_subscribers: usize,
    pub stall_timeout: Duration,
}

impl Default for SubscriberLimits {
    fn default() -> Self {
        SubscriberLimits {
            max_subscribers: 64,
            stall_timeout: crate::shared::DEFAULT_STALL_TIMEOUT,
        }
    }
}

#[derive(Clone)]
pub struct WatchService {
    shared: Arc<SharedStore>,
    buffer: usize,
    limits: SubscriberLimits,
    slots: Arc<Semaphore>,
}

impl WatchService {
    /// `buffer`: events queued per subscriber before the watcher waits for it to read.
    pub fn new(shared: Arc<SharedStore>, buffer: usize) -> WatchService {
        WatchService::with_limits(shared, buffer, SubscriberLimits::default())
    }

    pub fn with_limits(
        shared: Arc<SharedStore>,
        buffer: usize,
        limits: SubscriberLimits,
    ) -> WatchService {
        WatchService {
            shared,
            buffer: buffer.max(1),
            slots: Arc::new(Semaphore::new(limits.max_subscribers.max(1))),
            limits,
        }
    }
}

/// One subscription's response stream. Its queue is shared with the subscription's task,
/// which takes it away when it drops a subscriber that stopped reading: whatever waits in it
/// is freed at once, not when the connection finally goes.
pub struct SubscriptionStream {
    queue: Arc<Mutex<Option<Queue>>>,
}

type Queue = mpsc::Receiver<Result<v1::WatchEvent, tonic::Status>>;

impl Stream for SubscriptionStream {
    type Item = Result<v1::WatchEvent, tonic::Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        match queue.as_mut() {
            Some(events) => events.poll_recv(cx),
            None => Poll::Ready(None),
        }
    }
}

#[tonic::async_trait]
impl SmiWatch for WatchService {
    type WatchStream = SubscriptionStream;

    async fn watch(
        &self,
        request: tonic::Request<v1::WatchRequest>,
    ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            warn!(
                max = self.limits.max_subscribers,
                "refused a subscriber: too many subscriptions"
            );
            return Err(tonic::Status::resource_exhausted(format!(
                "smi-watcher serves at most {} subscriptions at once",
                self.limits.max_subscribers
            )));
        };
        let request = request.into_inner();
        let (tx, rx) = mpsc::channel(self.buffer);
        let queue = Arc::new(Mutex::new(Some(rx)));
        let (shared, stall) = (self.shared.clone(), self.limits.stall_timeout);
        // Weak: a subscriber that goes away drops the queue, which is how its task notices.
        let dropped = Arc::downgrade(&queue);
        tokio::spawn(async move {
            let _slot = slot;
            let ended = shared.run_subscription_with(request, tx, stall).await;
            if ended == Ended::Stalled
                && let Some(queue) = dropped.upgrade()
            {
                // The sender is gone too, which wakes a reader parked on the empty queue.
                queue.lock().unwrap_or_else(|p| p.into_inner()).take();
            }
        });
        Ok(tonic::Response::new(SubscriptionStream { queue }))
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

#[cfg(test)]
mod tests {
    use consul_smi_api::{Meta, ObjectRef, SmiKind, SmiObject, TcpRoute};
    use consul_smi_grpc::v1::smi_watch_server::SmiWatch;
    use tokio_stream::StreamExt;

    use super::*;
    use crate::store::Observed;

    fn request() -> tonic::Request<v1::WatchRequest> {
        tonic::Request::new(v1::WatchRequest {
            subscriber: "test".into(),
            ..Default::default()
        })
    }

    /// Issue 24, finding 10: 1,000 subscribers that never read held 2 GB of snapshot copies,
    /// for good, and nothing capped how many there were.
    #[tokio::test]
    async fn subscribers_are_capped_and_one_that_never_reads_is_dropped_with_its_snapshot() {
        let shared = SharedStore::new("e1".into(), 100);
        for i in 0..50 {
            shared.upsert(Observed::Valid(SmiObject::TcpRoute(TcpRoute {
                meta: Meta {
                    namespace: "default".into(),
                    name: format!("r{i}"),
                    ..Meta::default()
                },
                matches: None,
            })));
        }
        shared.set_ready();
        let held = || {
            let store = shared.snapshot_for_tests();
            let r0 = ObjectRef::new(SmiKind::TCPRoute, "default", "r0");
            Arc::strong_count(store.get(&r0).unwrap().valid.as_ref().unwrap())
        };
        let at_rest = held();
        let service = WatchService::with_limits(
            shared.clone(),
            1,
            SubscriberLimits {
                max_subscribers: 2,
                stall_timeout: Duration::from_millis(200),
            },
        );
        let mut stuck = service.watch(request()).await.unwrap().into_inner();
        let other = service.watch(request()).await.unwrap().into_inner();
        let refused = service.watch(request()).await.err().expect("over the cap");
        assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

        // `stuck` reads nothing: its task waits on a full queue with the snapshot in hand,
        // then gives up, freeing the snapshot and its slot.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while shared.metrics().dropped_for_tests() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the subscribers that never read were not dropped"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(held(), at_rest, "no snapshot copy is left behind");
        assert!(stuck.next().await.is_none(), "its stream ends");
        drop(other);
        let again = service.watch(request()).await;
        assert!(again.is_ok(), "slots are free again");
    }
}
