//! Completion notices across instances, by Redis pub/sub.
//!
//! The `complete` and `release` scripts publish the Redis key they changed on
//! the store's channel. Each store with notices on keeps one subscriber
//! connection (re-established after an outage, to the next node given when
//! there are several) and wakes the local waiters of that key, so a duplicate waiting on another instance learns of the result
//! at once instead of at its next poll. A notice lost (published before the
//! waiter registered, or during an outage) costs only latency: the engine
//! polls with backoff anyway.
//!
//! In a Redis Cluster a classic `PUBLISH` reaches every node, so one
//! subscription on any node (a seed node) hears the changes of all primaries.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};
use tokio::task::AbortHandle;

/// Local waiters by Redis key, and the subscriber task that wakes them.
pub(super) struct Notices {
    waiters: Mutex<HashMap<String, Weak<Waiter>>>,
    listener: Mutex<Option<AbortHandle>>,
}

#[derive(Default)]
struct Waiter {
    changed: AtomicBool,
    notify: Notify,
}

impl Notices {
    /// Subscribes to `channel` on the first of `nodes` that answers, in a
    /// task of its own (which lives as long as the answer). The receiver
    /// fires once the first subscription holds, so that a caller can wait
    /// until notices flow.
    pub(super) fn spawn(
        nodes: Vec<redis::Client>,
        channel: String,
        timeout: Duration,
    ) -> (Arc<Self>, oneshot::Receiver<()>) {
        let notices = Arc::new(Self {
            waiters: Mutex::new(HashMap::new()),
            listener: Mutex::new(None),
        });
        let (subscribed, first) = oneshot::channel();
        let task = tokio::spawn(listen(
            nodes,
            channel,
            timeout,
            Arc::downgrade(&notices),
            subscribed,
        ));
        *lock(&notices.listener) = Some(task.abort_handle());
        (notices, first)
    }

    /// A future that resolves when `key` is announced, or at `deadline`. The
    /// waiter is registered now, before the future is first polled.
    pub(super) fn changed(
        &self,
        key: String,
        deadline: tokio::time::Instant,
    ) -> impl Future<Output = ()> + Send + 'static {
        let waiter = {
            let mut waiters = lock(&self.waiters);
            waiters.retain(|_, waiter| waiter.strong_count() > 0);
            match waiters.get(&key).and_then(Weak::upgrade) {
                Some(waiter) => waiter,
                None => {
                    let waiter = Arc::new(Waiter::default());
                    waiters.insert(key, Arc::downgrade(&waiter));
                    waiter
                }
            }
        };
        async move {
            let notified = waiter.notify.notified();
            if waiter.changed.load(Ordering::Acquire) {
                return;
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    fn wake(&self, key: &str) {
        let waiter = lock(&self.waiters).remove(key).and_then(|w| w.upgrade());
        if let Some(waiter) = waiter {
            waiter.changed.store(true, Ordering::Release);
            waiter.notify.notify_waiters();
        }
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        if let Some(task) = lock(&self.listener).take() {
            task.abort();
        }
    }
}

async fn listen(
    nodes: Vec<redis::Client>,
    channel: String,
    timeout: Duration,
    notices: Weak<Notices>,
    subscribed: oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    let mut backoff = Duration::from_millis(50);
    // Rotates through the nodes: a node that failed is tried again last.
    for client in nodes.iter().cycle() {
        let connected = tokio::time::timeout(timeout, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        })
        .await;
        if let Ok(Ok(pubsub)) = connected {
            backoff = Duration::from_millis(50);
            if let Some(subscribed) = subscribed.take() {
                let _ = subscribed.send(());
            }
            let mut messages = pubsub.into_on_message();
            // The stream ends when the connection does.
            while let Some(message) = messages.next().await {
                let Some(notices) = notices.upgrade() else {
                    return;
                };
                if let Ok(key) = std::str::from_utf8(message.get_payload_bytes()) {
                    notices.wake(key);
                }
            }
        }
        if notices.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section is one map operation: the map stays consistent.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
