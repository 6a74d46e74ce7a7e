//! `visutility run`: the monitoring service.
//!
//! * `config`: the TOML configuration.
//! * `store`: SQLite signal log, outbox and detector state.
//! * `monitor`: one thread per monitor running its strategy.
//! * `actions`: delivery of signals to `log` / `exec` / `webhook` actions.
//! * `http`: the HTTP API.
//!
//! Flow: `POST /v1/snapshots` validates a whole request, then queues it to
//! every monitor (or answers 503 when one is behind, accepting nothing); each
//! monitor evaluates its models' points in order, records retrain signals in
//! the outbox (cooldown per model), and the deliverer runs the actions.

pub mod actions;
pub mod config;
pub mod http;
pub mod monitor;
pub mod store;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use self::config::ServiceConfig;
use self::monitor::{Monitor, Outbox};
use self::store::{Store, StoreError};
use crate::runtime::LoadError;
use crate::snapshot::Observation;

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A monitor's strategy could not be loaded or configured.
    #[error("monitor `{monitor}`: {source}")]
    Monitor {
        /// The monitor.
        monitor: String,
        /// Why.
        source: LoadError,
    },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
}

/// Ingestion counters.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    /// Snapshots accepted.
    pub accepted: AtomicU64,
    /// Snapshots refused as invalid.
    pub refused: AtomicU64,
    /// Snapshots rejected with 503.
    pub rejected_busy: AtomicU64,
}

/// The running service.
pub struct Service {
    /// Its configuration.
    pub config: ServiceConfig,
    /// The monitors, in configuration order.
    pub monitors: Vec<Arc<Monitor>>,
    /// The store.
    pub store: Store,
    /// Ingestion counters.
    pub metrics: ServiceMetrics,
    wake: Arc<tokio::sync::Notify>,
    shutting_down: AtomicBool,
    /// Sequence number of the next snapshot routed (service-wide).
    sequence: AtomicU64,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").field("monitors", &self.monitors).finish_non_exhaustive()
    }
}

impl Service {
    /// Opens the store and starts every monitor (loading, configuring and
    /// restoring its strategy).
    ///
    /// # Errors
    ///
    /// [`ServiceError`] naming what failed.
    pub fn start(config: ServiceConfig) -> Result<Arc<Service>, ServiceError> {
        let store = Store::open(&config.db)?;
        let wake = Arc::new(tokio::sync::Notify::new());
        let outbox = Outbox { store: store.clone(), wake: wake.clone() };
        let mut monitors = Vec::with_capacity(config.monitors.len());
        for m in &config.monitors {
            let monitor = Monitor::start(m.clone(), outbox.clone(), config.queue_batches, config.checkpoint_every)
                .map_err(|source| ServiceError::Monitor { monitor: m.name.clone(), source })?;
            monitors.push(monitor);
        }
        Ok(Arc::new(Service {
            config,
            monitors,
            store,
            metrics: ServiceMetrics::default(),
            wake,
            shutting_down: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
        }))
    }

    /// Whether shutdown has begun (ingestion answers 503).
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// `m`'s status, with its agreement when it shadows another monitor.
    pub fn status_of(&self, m: &Monitor) -> monitor::MonitorStatus {
        let mut status = m.status();
        if let Some(primary) = m.config.shadows.as_ref().and_then(|p| self.monitors.iter().find(|o| &o.config.name == p)) {
            status.agreement = Some(monitor::agreement(m, primary));
        }
        status
    }

    /// Queues `batch` to every monitor selecting some of it, or to none when
    /// one of them is behind (returns its name).
    ///
    /// # Errors
    ///
    /// The name of a monitor whose queue is full.
    pub fn route(&self, batch: Vec<Observation>) -> Result<(), String> {
        let mut models: HashMap<&str, u64> = HashMap::new();
        for o in &batch {
            *models.entry(o.snapshot.model_version.as_str()).or_default() += 1;
        }
        let targets: Vec<(&Arc<Monitor>, u64)> = self
            .monitors
            .iter()
            .filter_map(|m| {
                let n: u64 = models.iter().filter(|(model, _)| m.config.selects(model)).map(|(_, n)| n).sum();
                (n > 0).then_some((m, n))
            })
            .collect();
        // A healthy monitor that is behind pushes back on the client (503,
        // nothing lost). A failing or quarantined one may not: its verdicts
        // are lost anyway, so what does not fit its queue is shed (counted)
        // and the other monitors keep their rate.
        if let Some((busy, _)) = targets.iter().find(|(m, _)| !m.has_room() && !m.failing()) {
            return Err(busy.config.name.clone());
        }
        let seq = self.sequence.fetch_add(batch.len() as u64, Ordering::Relaxed);
        let batch = Arc::new(batch);
        for (m, n) in targets {
            if !m.has_room() {
                m.shed(n);
                continue;
            }
            if !m.enqueue(batch.clone(), seq, n) {
                return Err(m.config.name.clone());
            }
        }
        Ok(())
    }

    /// Serves the API on `listener` until `shutdown`, then stops ingestion,
    /// drains every monitor's queue through its strategy, checkpoints state,
    /// and gives pending deliveries a few seconds (the rest stay in the
    /// outbox for the next start).
    ///
    /// # Errors
    ///
    /// [`ServiceError::Http`] if the server fails.
    pub async fn serve(self: Arc<Self>, listener: tokio::net::TcpListener, shutdown: CancellationToken) -> Result<(), ServiceError> {
        let deliver_stop = CancellationToken::new();
        let deliverer = actions::Deliverer {
            store: self.store.clone(),
            actions: self.config.monitors.iter().map(|m| (m.name.clone(), m.actions.clone())).collect(),
            wake: self.wake.clone(),
            http: reqwest::Client::builder()
                .user_agent(concat!("visutility/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| ServiceError::Http(std::io::Error::other(e)))?,
        };
        let delivering = tokio::spawn(deliverer.run(deliver_stop.clone()));
        let watch_stop = Arc::new(AtomicBool::new(false));
        let watching = if self.config.watch_interval.is_zero() {
            None
        } else {
            watch::spawn(&self.monitors, self.config.watch_interval, watch_stop.clone())
        };

        let app = http::router(self.clone());
        let service = self.clone();
        let stop = shutdown.clone();
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                stop.cancelled().await;
                service.shutting_down.store(true, Ordering::Relaxed);
                tracing::info!("shutting down: ingestion stopped, draining monitors");
            })
            .await?;
        self.shutting_down.store(true, Ordering::Relaxed);
        watch_stop.store(true, Ordering::Relaxed);
        if let Some(w) = watching {
            let _ = tokio::task::spawn_blocking(move || w.join()).await;
        }

        let monitors = self.monitors.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for m in &monitors {
                m.stop();
            }
        })
        .await;
        // Let the deliverer pick up what the drain recorded.
        self.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let grace = tokio::time::timeout(Duration::from_secs(5), async {
            while self.store.due_deliveries(store::now_ms(), 1).map(|d| !d.is_empty()).unwrap_or(false) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if grace.is_err() {
            tracing::warn!("pending deliveries stay in the outbox for the next start");
        }
        deliver_stop.cancel();
        let _ = delivering.await;
        Ok(())
    }
}
