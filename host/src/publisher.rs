//! `MetricPublisher`, `MetricObserver`, `DynObserver`: fan-out of snapshots
//! to synchronous observers and asynchronous receivers, with counted,
//! avoidable loss.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tokio::sync::broadcast;

use crate::error::MonitoringError;
use crate::snapshot::MetricSnapshot;

/// Trait for types that can observe streamed [`MetricSnapshot`]s.
pub trait MetricObserver: Send + Sync + 'static {
    /// Called synchronously, in publish order, for every published snapshot.
    fn on_metric(&self, metric: &MetricSnapshot);
}

/// Helper newtype for type-erasing observers.
#[derive(Clone)]
pub struct DynObserver(Arc<dyn MetricObserver>);

impl DynObserver {
    /// Wraps `observer`.
    pub fn new<T: MetricObserver>(observer: T) -> Self {
        Self(Arc::new(observer))
    }
}

impl fmt::Debug for DynObserver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DynObserver(...)")
    }
}

/// What [`MetricPublisher::publish`] does when the slowest async receiver
/// still has `buffer` snapshots to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverflowPolicy {
    /// Overwrite the oldest buffered snapshot (the seed's behaviour). The
    /// slow receiver sees `RecvError::Lagged`; every overwritten snapshot is
    /// counted in [`PublisherStats::dropped`].
    #[default]
    DropOldest,
    /// Never lose a snapshot: `publish` fails with
    /// [`MonitoringError::Backpressure`] and `publish_wait` waits for room.
    Lossless,
}

/// Counters of a [`MetricPublisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PublisherStats {
    /// Snapshots published.
    pub published: u64,
    /// Snapshots overwritten before every async receiver had read them.
    pub dropped: u64,
    /// `publish` calls refused for back-pressure (lossless mode).
    pub refused: u64,
}

/// Central publisher/observable for metric snapshots.
///
/// Every asynchronous receiver gets every snapshot (tokio broadcast);
/// synchronous observers are called in publish order. Unlike the seed,
/// publishing with no async receiver succeeds, and loss is counted (and can be
/// ruled out with [`OverflowPolicy::Lossless`]).
pub struct MetricPublisher {
    sender: broadcast::Sender<MetricSnapshot>,
    capacity: usize,
    policy: OverflowPolicy,
    observers: RwLock<Vec<DynObserver>>,
    // Serialises the room check and the send in lossless mode.
    send_lock: Mutex<()>,
    published: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
}

impl fmt::Debug for MetricPublisher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetricPublisher")
            .field("capacity", &self.capacity)
            .field("policy", &self.policy)
            .field("observers", &self.observer_count())
            .field("stats", &self.stats())
            .finish()
    }
}

impl MetricPublisher {
    /// A publisher buffering up to `buffer` snapshots per async receiver,
    /// overwriting the oldest when a receiver falls behind (counted).
    ///
    /// # Panics
    ///
    /// If `buffer` is 0.
    pub fn new(buffer: usize) -> Self {
        Self::with_policy(buffer, OverflowPolicy::DropOldest)
    }

    /// A publisher with an explicit overflow policy.
    ///
    /// # Panics
    ///
    /// If `buffer` is 0.
    pub fn with_policy(buffer: usize, policy: OverflowPolicy) -> Self {
        let (sender, _receiver) = broadcast::channel(buffer);
        Self {
            sender,
            capacity: buffer,
            policy,
            observers: RwLock::new(Vec::new()),
            send_lock: Mutex::new(()),
            published: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        }
    }

    /// Publish a snapshot to all observers and broadcast receivers.
    ///
    /// Succeeds with no async receiver subscribed.
    ///
    /// # Errors
    ///
    /// [`MonitoringError::Backpressure`] in [`OverflowPolicy::Lossless`] mode
    /// when a receiver's buffer is full; nothing was published then.
    pub fn publish(&self, metric: MetricSnapshot) -> Result<(), MonitoringError> {
        {
            let _guard = self.send_lock.lock();
            // `len` counts snapshots not yet read by every receiver; at
            // capacity the next send evicts one that someone has not seen.
            if self.sender.receiver_count() > 0 && self.sender.len() >= self.capacity {
                match self.policy {
                    OverflowPolicy::DropOldest => {
                        self.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    OverflowPolicy::Lossless => {
                        self.refused.fetch_add(1, Ordering::Relaxed);
                        return Err(MonitoringError::Backpressure {
                            capacity: self.capacity,
                        });
                    }
                }
            }
            // An error here only means "no receiver": not a failure.
            let _ = self.sender.send(metric.clone());
            self.published.fetch_add(1, Ordering::Relaxed);
        }
        // Fan-out to in-process observers synchronously.
        for obs in self.observers.read().iter() {
            obs.0.on_metric(&metric);
        }
        Ok(())
    }

    /// Publishes, waiting while a receiver's buffer is full (lossless mode);
    /// identical to [`publish`](Self::publish) otherwise.
    ///
    /// # Errors
    ///
    /// None today; kept fallible for future policies.
    pub async fn publish_wait(&self, metric: MetricSnapshot) -> Result<(), MonitoringError> {
        let mut pause = Duration::from_micros(50);
        loop {
            match self.publish(metric.clone()) {
                Err(MonitoringError::Backpressure { .. }) => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    /// Subscribe a *new* asynchronous receiver to this publisher. It sees
    /// snapshots published from now on.
    pub fn subscribe_async(&self) -> broadcast::Receiver<MetricSnapshot> {
        self.sender.subscribe()
    }

    /// Attach a synchronous observer.
    pub fn attach(&self, observer: DynObserver) {
        self.observers.write().push(observer);
    }

    /// Count currently registered synchronous observers.
    pub fn observer_count(&self) -> usize {
        self.observers.read().len()
    }

    /// Published / dropped / refused counters.
    pub fn stats(&self) -> PublisherStats {
        PublisherStats {
            published: self.published.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// The per-receiver buffer size.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn snap(score: f64) -> MetricSnapshot {
        MetricSnapshot {
            model_version: "m".into(),
            score,
            loss: None,
            timestamp: SystemTime::now(),
        }
    }

    struct Count(Arc<AtomicU64>);
    impl MetricObserver for Count {
        fn on_metric(&self, _: &MetricSnapshot) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn publish_without_async_receiver_reaches_sync_observers() {
        let p = MetricPublisher::new(4);
        let seen = Arc::new(AtomicU64::new(0));
        p.attach(DynObserver::new(Count(seen.clone())));
        for i in 0..10 {
            p.publish(snap(f64::from(i))).unwrap();
        }
        assert_eq!(seen.load(Ordering::Relaxed), 10);
        assert_eq!(
            p.stats(),
            PublisherStats {
                published: 10,
                dropped: 0,
                refused: 0
            }
        );
    }

    #[test]
    fn overwritten_snapshots_are_counted() {
        let p = MetricPublisher::new(2);
        let mut rx = p.subscribe_async();
        for i in 0..5 {
            p.publish(snap(f64::from(i))).unwrap();
        }
        assert_eq!(p.stats().dropped, 3);
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(3))
        ));
    }

    #[tokio::test]
    async fn lossless_policy_refuses_then_waits_for_room() {
        let p = Arc::new(MetricPublisher::with_policy(2, OverflowPolicy::Lossless));
        let mut rx = p.subscribe_async();
        p.publish(snap(0.0)).unwrap();
        p.publish(snap(1.0)).unwrap();
        assert!(matches!(
            p.publish(snap(2.0)),
            Err(MonitoringError::Backpressure { capacity: 2 })
        ));
        let p2 = p.clone();
        let waiter = tokio::spawn(async move { p2.publish_wait(snap(2.0)).await });
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(rx.recv().await.unwrap().score);
        }
        waiter.await.unwrap().unwrap();
        assert_eq!(got, vec![0.0, 1.0, 2.0]);
        assert_eq!(p.stats().dropped, 0);
    }
}
