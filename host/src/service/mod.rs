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

/// What a configuration reload did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Monitors started.
    pub added: Vec<String>,
    /// Monitors stopped (drained, checkpointed).
    pub removed: Vec<String>,
    /// Monitors whose configuration changed: stopped, then started from
    /// their checkpoint.
    pub restarted: Vec<String>,
    /// Monitors left running as they were.
    pub unchanged: Vec<String>,
    /// Restarted monitors whose strategy or its configuration changed: their
    /// detectors start fresh (saved state describes the old configuration).
    pub started_fresh: Vec<String>,
    /// Top-level settings that changed but apply only after a restart.
    pub needs_restart: Vec<String>,
}

/// The running service.
pub struct Service {
    /// Its configuration.
    pub config: ServiceConfig,
    /// The monitors, in configuration order (replaced on config reload).
    monitor_set: parking_lot::RwLock<Arc<Vec<Arc<Monitor>>>>,
    /// Actions per monitor, shared with the deliverer.
    actions: Arc<parking_lot::RwLock<HashMap<String, Vec<config::ActionConfig>>>>,
    /// The file `reload` reads.
    config_path: parking_lot::Mutex<Option<std::path::PathBuf>>,
    /// The strategy-file watcher: its stop flag and thread.
    watcher: parking_lot::Mutex<Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>>,
    /// One reload at a time.
    reloading: parking_lot::Mutex<()>,
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
        f.debug_struct("Service")
            .field("monitors", &self.monitors())
            .finish_non_exhaustive()
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
        let outbox = Outbox {
            store: store.clone(),
            wake: wake.clone(),
        };
        let mut monitors = Vec::with_capacity(config.monitors.len());
        for m in &config.monitors {
            let monitor = Monitor::start(
                m.clone(),
                outbox.clone(),
                config.queue_batches,
                config.checkpoint_every,
            )
            .map_err(|source| ServiceError::Monitor {
                monitor: m.name.clone(),
                source,
            })?;
            monitors.push(monitor);
        }
        let actions = config
            .monitors
            .iter()
            .map(|m| (m.name.clone(), m.actions.clone()))
            .collect();
        Ok(Arc::new(Service {
            config,
            monitor_set: parking_lot::RwLock::new(Arc::new(monitors)),
            actions: Arc::new(parking_lot::RwLock::new(actions)),
            config_path: parking_lot::Mutex::new(None),
            watcher: parking_lot::Mutex::new(None),
            reloading: parking_lot::Mutex::new(()),
            store,
            metrics: ServiceMetrics::default(),
            wake,
            shutting_down: AtomicBool::new(false),
            sequence: AtomicU64::new(0),
        }))
    }

    /// The monitors now, in configuration order.
    pub fn monitors(&self) -> Arc<Vec<Arc<Monitor>>> {
        self.monitor_set.read().clone()
    }

    /// The monitor named `name`.
    pub fn monitor(&self, name: &str) -> Option<Arc<Monitor>> {
        self.monitors()
            .iter()
            .find(|m| m.config.name == name)
            .cloned()
    }

    /// Sets the configuration file that [`reload`](Self::reload) reads.
    pub fn set_config_path(&self, path: std::path::PathBuf) {
        *self.config_path.lock() = Some(path);
    }

    /// Re-reads the configuration file and applies its monitors: new ones
    /// start, removed ones stop (drained and checkpointed), changed ones
    /// restart from their checkpoint (snapshots routed to them meanwhile are
    /// answered 503, never lost), unchanged ones are untouched. Settings
    /// that need a restart (`listen`, `db`, ...) are reported, not applied.
    /// A file with any error changes nothing.
    ///
    /// # Errors
    ///
    /// Why nothing was applied.
    pub fn reload(&self) -> Result<ReloadReport, String> {
        let _one = self.reloading.lock();
        if self.shutting_down() {
            return Err("the service is shutting down".into());
        }
        let path = self
            .config_path
            .lock()
            .clone()
            .ok_or("the service runs without a config file (--config); nothing to reload")?;
        let new = ServiceConfig::load(&path).map_err(|e| e.to_string())?;
        let mut report = ReloadReport::default();
        let old = &self.config;
        for (key, changed) in [
            ("queue_batches", new.queue_batches != old.queue_batches),
            (
                "checkpoint_every",
                new.checkpoint_every != old.checkpoint_every,
            ),
            ("max_body_bytes", new.max_body_bytes != old.max_body_bytes),
            (
                "admin_token_env",
                new.admin_token_env != old.admin_token_env,
            ),
            ("watch_interval", new.watch_interval != old.watch_interval),
            (
                "canonicalize_nans",
                new.canonicalize_nans != old.canonicalize_nans,
            ),
        ] {
            if changed {
                report.needs_restart.push(key.to_string());
            }
        }
        let current = self.monitors();
        // Load and configure every new or changed monitor's strategy first:
        // a strategy that does not load refuses the whole reload.
        for m in &new.monitors {
            let same = current.iter().any(|c| c.config == *m);
            if !same {
                let source = m
                    .strategy
                    .parse()
                    .map_err(|e| format!("monitor `{}`: {e}", m.name))?;
                crate::runtime::StrategyComponent::load(&source)
                    .and_then(|c| c.instantiate(&m.config_json(), m.limits.limits()))
                    .map_err(|e| format!("monitor `{}`: {e}", m.name))?;
            }
        }
        self.stop_watcher();
        let outbox = Outbox {
            store: self.store.clone(),
            wake: self.wake.clone(),
        };
        let mut next: Vec<Arc<Monitor>> = Vec::with_capacity(new.monitors.len());
        let mut failed = None;
        for m in &new.monitors {
            match current.iter().find(|c| c.config.name == m.name) {
                Some(c) if c.config == *m => {
                    report.unchanged.push(m.name.clone());
                    next.push(c.clone());
                }
                existing => {
                    if let Some(c) = existing {
                        // Drain and checkpoint before the new one restores;
                        // meanwhile batches for it are answered 503.
                        c.stop();
                        report.restarted.push(m.name.clone());
                        // Saved detector state embeds the configuration it
                        // was made with: a new configuration starts fresh.
                        if c.config.config != m.config || c.config.strategy != m.strategy {
                            match self.store.clear_states(&m.name) {
                                Ok(n) if n > 0 => report.started_fresh.push(m.name.clone()),
                                Ok(_) => {}
                                Err(e) => {
                                    tracing::error!(monitor = %m.name, "cannot forget the old detector state: {e}")
                                }
                            }
                        }
                    } else {
                        report.added.push(m.name.clone());
                    }
                    match Monitor::start(
                        m.clone(),
                        outbox.clone(),
                        self.config.queue_batches,
                        self.config.checkpoint_every,
                    ) {
                        Ok(started) => next.push(started),
                        Err(e) => {
                            failed = Some(format!("monitor `{}` did not start: {e}", m.name));
                            break;
                        }
                    }
                }
            }
        }
        if failed.is_some() {
            // Keep what was not reached yet.
            for c in current.iter() {
                if !next.iter().any(|n| n.config.name == c.config.name)
                    && !report.restarted.contains(&c.config.name)
                {
                    next.push(c.clone());
                }
            }
        } else {
            for c in current
                .iter()
                .filter(|c| !new.monitors.iter().any(|m| m.name == c.config.name))
            {
                c.stop();
                report.removed.push(c.config.name.clone());
            }
        }
        *self.actions.write() = new
            .monitors
            .iter()
            .map(|m| (m.name.clone(), m.actions.clone()))
            .collect();
        *self.monitor_set.write() = Arc::new(next);
        self.start_watcher();
        tracing::warn!(?report, "configuration reloaded from {}", path.display());
        match failed {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    fn start_watcher(&self) {
        if self.config.watch_interval.is_zero() {
            return;
        }
        let stop = Arc::new(AtomicBool::new(false));
        if let Some(handle) =
            watch::spawn(&self.monitors(), self.config.watch_interval, stop.clone())
        {
            *self.watcher.lock() = Some((stop, handle));
        }
    }

    fn stop_watcher(&self) {
        if let Some((stop, handle)) = self.watcher.lock().take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }

    /// Whether shutdown has begun (ingestion answers 503).
    pub fn shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Relaxed)
    }

    /// `m`'s status, with its agreement when it shadows another monitor.
    pub fn status_of(&self, m: &Monitor) -> monitor::MonitorStatus {
        let mut status = m.status();
        if let Some(primary) = m.config.shadows.as_ref().and_then(|p| self.monitor(p)) {
            status.agreement = Some(monitor::agreement(m, &primary));
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
        let monitors = self.monitors();
        let targets: Vec<(&Arc<Monitor>, u64)> = monitors
            .iter()
            .filter_map(|m| {
                let n: u64 = models
                    .iter()
                    .filter(|(model, _)| m.config.selects(model))
                    .map(|(_, n)| n)
                    .sum();
                (n > 0).then_some((m, n))
            })
            .collect();
        // A monitor that is stopping (shutdown, or a reload restarting it)
        // takes nothing: refuse before any monitor queued the batch.
        if let Some((stopped, _)) = targets.iter().find(|(m, _)| !m.accepting()) {
            return Err(stopped.config.name.clone());
        }
        // A healthy monitor that is behind pushes back on the client (503,
        // nothing lost). A failing or quarantined one may not: its verdicts
        // are lost anyway, so what does not fit its queue is shed (counted)
        // and the other monitors keep their rate.
        if let Some((busy, _)) = targets.iter().find(|(m, _)| !m.has_room() && !m.failing()) {
            return Err(busy.config.name.clone());
        }
        let seq = self
            .sequence
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
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
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), ServiceError> {
        let deliver_stop = CancellationToken::new();
        let deliverer = actions::Deliverer {
            store: self.store.clone(),
            actions: self.actions.clone(),
            wake: self.wake.clone(),
            http: reqwest::Client::builder()
                .user_agent(concat!("visutility/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(|e| ServiceError::Http(std::io::Error::other(e)))?,
        };
        let delivering = tokio::spawn(deliverer.run(deliver_stop.clone()));
        self.start_watcher();

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
        let service = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            // A reload under way finishes first.
            let _one = service.reloading.lock();
            service.stop_watcher();
        })
        .await;

        let monitors = self.monitors();
        let _ = tokio::task::spawn_blocking(move || {
            for m in monitors.iter() {
                m.stop();
            }
        })
        .await;
        // Let the deliverer pick up what the drain recorded.
        self.wake.notify_one();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let grace = tokio::time::timeout(Duration::from_secs(5), async {
            while self
                .store
                .due_deliveries(store::now_ms(), 1)
                .map(|d| !d.is_empty())
                .unwrap_or(false)
            {
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
