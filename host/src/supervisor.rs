//! `MonitoringSupervisor`: runs one strategy on a publisher's stream, turns
//! its signals into de-duplicated retrain signals, and watches the stream for
//! stalls. Shuts down on request, when the publisher is dropped, or when the
//! signal receiver is dropped.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::MonitoringError;
use crate::publisher::MetricPublisher;
use crate::snapshot::MetricSnapshot;
use crate::strategy::{RetrainSignal, RetrainStrategy};

/// Interval at which the internal watchdog checks for stalled metric streams.
pub const WATCHDOG_INTERVAL: Duration = Duration::from_secs(30);

/// Default time during which further signals for the same model are
/// suppressed after one was emitted.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(10 * 60);

/// Capacity of the signal channel returned by [`MonitoringSupervisor::new`].
pub const SIGNAL_CHANNEL_BUFFER: usize = 16;

/// Counters of a running supervisor.
#[derive(Debug, Default)]
pub struct SupervisorStats {
    /// Signals passed on to the receiver.
    pub signals: AtomicU64,
    /// Signals suppressed by the cooldown (counted, not lost silently).
    pub suppressed: AtomicU64,
    /// Stalls detected by the watchdog (once per stall).
    pub stalls: AtomicU64,
    /// Snapshots seen by the watchdog.
    pub snapshots: AtomicU64,
}

/// Stops a supervisor: its tasks finish and [`MonitoringSupervisor::spawn`]'s
/// handle resolves. Signals already emitted are still delivered.
#[derive(Debug, Clone)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Requests shutdown.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// High-level supervisor that bundles publisher, strategy, and trigger
/// channel. Spawn via [`Self::spawn`] to obtain a running Tokio task.
pub struct MonitoringSupervisor<S>
where
    S: RetrainStrategy,
{
    publisher: Arc<MetricPublisher>,
    strategy: Arc<S>,
    tx_trigger: mpsc::Sender<RetrainSignal>,
    cooldown: Duration,
    watchdog_interval: Duration,
    stale_after: Duration,
    shutdown: CancellationToken,
    stats: Arc<SupervisorStats>,
}

impl<S: RetrainStrategy> std::fmt::Debug for MonitoringSupervisor<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MonitoringSupervisor")
            .field("cooldown", &self.cooldown)
            .field("watchdog_interval", &self.watchdog_interval)
            .field("stale_after", &self.stale_after)
            .finish_non_exhaustive()
    }
}

impl<S> MonitoringSupervisor<S>
where
    S: RetrainStrategy,
{
    /// A supervisor running `strategy` on `publisher`'s stream, and the
    /// receiver of its retrain signals.
    pub fn new(
        publisher: Arc<MetricPublisher>,
        strategy: S,
    ) -> (Self, mpsc::Receiver<RetrainSignal>) {
        let (tx_trigger, rx_trigger) = mpsc::channel(SIGNAL_CHANNEL_BUFFER);
        (
            Self {
                publisher,
                strategy: Arc::new(strategy),
                tx_trigger,
                cooldown: DEFAULT_COOLDOWN,
                watchdog_interval: WATCHDOG_INTERVAL,
                stale_after: WATCHDOG_INTERVAL * 2,
                shutdown: CancellationToken::new(),
                stats: Arc::new(SupervisorStats::default()),
            },
            rx_trigger,
        )
    }

    /// Suppresses further signals for a model for `cooldown` after one was
    /// emitted ([`DEFAULT_COOLDOWN`]); `Duration::ZERO` passes every signal.
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }

    /// Checks for a stalled stream every `interval`, reporting a stall after
    /// `stale_after` without a snapshot (defaults: [`WATCHDOG_INTERVAL`] and
    /// twice that).
    pub fn with_watchdog(mut self, interval: Duration, stale_after: Duration) -> Self {
        self.watchdog_interval = interval.max(Duration::from_millis(1));
        self.stale_after = stale_after;
        self
    }

    /// A handle that stops the supervisor.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shutdown.clone())
    }

    /// The supervisor's counters.
    pub fn stats(&self) -> Arc<SupervisorStats> {
        self.stats.clone()
    }

    /// Spawns the strategy, the signal forwarder and the watchdog.
    ///
    /// The subscriptions are taken before this returns, so every snapshot
    /// published afterwards is seen. The supervisor keeps no reference to the
    /// publisher: dropping it ends the stream and the supervisor.
    pub fn spawn(self) -> JoinHandle<Result<(), MonitoringError>> {
        let rx = self.publisher.subscribe_async();
        let watchdog_rx = self.publisher.subscribe_async();
        drop(self.publisher);
        let done = self.shutdown.child_token();
        let (inner_tx, inner_rx) = mpsc::channel(SIGNAL_CHANNEL_BUFFER);

        tokio::spawn(async move {
            let strategy_task = {
                let s = self.strategy.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        r = s.run(rx, inner_tx) => r,
                        () = done.cancelled() => Ok(()),
                    }
                })
            };
            let forward_task = tokio::spawn(forward(
                inner_rx,
                self.tx_trigger,
                self.cooldown,
                self.stats.clone(),
            ));
            let watchdog_task = tokio::spawn(watchdog(
                watchdog_rx,
                self.watchdog_interval,
                self.stale_after,
                self.stats.clone(),
                done.clone(),
            ));

            let strategy_result = strategy_task.await;
            // The strategy's sender is gone: the forwarder drains and ends.
            let forward_result = forward_task.await;
            done.cancel();
            let watchdog_result = watchdog_task.await;
            strategy_result??;
            forward_result?;
            watchdog_result?;
            Ok(())
        })
    }
}

async fn forward(
    mut inner: mpsc::Receiver<RetrainSignal>,
    out: mpsc::Sender<RetrainSignal>,
    cooldown: Duration,
    stats: Arc<SupervisorStats>,
) {
    let mut last: HashMap<String, Instant> = HashMap::new();
    while let Some(signal) = inner.recv().await {
        let model = &signal.degraded_snapshot.model_version;
        let now = Instant::now();
        if let Some(at) = last.get(model)
            && now.duration_since(*at) < cooldown
        {
            stats.suppressed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(model = %model, "retrain signal suppressed by cooldown");
            continue;
        }
        last.insert(model.clone(), now);
        if out.send(signal).await.is_err() {
            return;
        }
        stats.signals.fetch_add(1, Ordering::Relaxed);
    }
}

async fn watchdog(
    mut rx: broadcast::Receiver<MetricSnapshot>,
    interval: Duration,
    stale_after: Duration,
    stats: Arc<SupervisorStats>,
    done: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Monotonic, unlike the seed's `SystemTime`.
    let mut last_seen = Instant::now();
    let mut stalled = false;
    loop {
        tokio::select! {
            () = done.cancelled() => return,
            _ = ticker.tick() => {
                if !stalled && last_seen.elapsed() > stale_after {
                    stalled = true;
                    stats.stalls.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(silent_for = ?last_seen.elapsed(), "metric stream stalled");
                }
            }
            msg = rx.recv() => match msg {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    stats.snapshots.fetch_add(1, Ordering::Relaxed);
                    last_seen = Instant::now();
                    if stalled {
                        stalled = false;
                        tracing::info!("metric stream resumed");
                    }
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::strategy::BaselineStrategy;
    use std::time::SystemTime;

    fn snap(model: &str, score: f64) -> MetricSnapshot {
        MetricSnapshot {
            model_version: model.into(),
            score,
            loss: None,
            timestamp: SystemTime::now(),
        }
    }

    #[tokio::test]
    async fn cooldown_suppresses_repeats_per_model_and_counts_them() {
        let publisher = Arc::new(MetricPublisher::new(64));
        let strategy = BaselineStrategy::new(snap("a", 0.9), 0.05);
        let (sup, mut rx) = MonitoringSupervisor::new(publisher.clone(), strategy);
        let stats = sup.stats();
        let handle = sup.with_cooldown(Duration::from_secs(3600)).spawn();
        for score in [0.5, 0.4, 0.3] {
            publisher.publish(snap("a", score)).unwrap();
        }
        drop(publisher);
        handle.await.unwrap().unwrap();
        let first = rx.recv().await.unwrap();
        assert_eq!(first.degraded_snapshot.score, 0.5);
        assert!(rx.recv().await.is_none());
        assert_eq!(stats.suppressed.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn dropping_the_publisher_or_shutting_down_ends_the_supervisor() {
        let publisher = Arc::new(MetricPublisher::new(8));
        let (sup, _rx) = MonitoringSupervisor::new(
            publisher.clone(),
            BaselineStrategy::new(snap("a", 0.9), 0.05),
        );
        let handle = sup.spawn();
        drop(publisher);
        tokio::time::timeout(Duration::from_secs(2), handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();

        let publisher = Arc::new(MetricPublisher::new(8));
        let (sup, _rx) = MonitoringSupervisor::new(
            publisher.clone(),
            BaselineStrategy::new(snap("a", 0.9), 0.05),
        );
        let stop = sup.shutdown_handle();
        let handle = sup.spawn();
        stop.shutdown();
        tokio::time::timeout(Duration::from_secs(2), handle)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_reports_a_stall_once_with_monotonic_time() {
        let publisher = Arc::new(MetricPublisher::new(8));
        let (sup, _rx) = MonitoringSupervisor::new(
            publisher.clone(),
            BaselineStrategy::new(snap("a", 0.9), 0.05),
        );
        let stats = sup.stats();
        let stop = sup.shutdown_handle();
        let handle = sup
            .with_watchdog(Duration::from_secs(1), Duration::from_secs(3))
            .spawn();
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
        publisher.publish(snap("a", 0.9)).unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(stats.stalls.load(Ordering::Relaxed), 2);
        stop.shutdown();
        handle.await.unwrap().unwrap();
    }
}
