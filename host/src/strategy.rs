//! `RetrainStrategy`, `RetrainSignal`, the native `BaselineStrategy`, and
//! `WasmStrategy`, which runs a WebAssembly strategy behind the same trait.

use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{broadcast, mpsc};

use crate::error::MonitoringError;
use crate::runtime::{
    Limits, LoadError, PointBatch, StrategyComponent, StrategyInfo, StrategyInstance,
    StrategySource, Verdict, VerdictKind,
};
use crate::snapshot::MetricSnapshot;

/// Most snapshots a [`WasmStrategy`] evaluates in one call.
pub const DEFAULT_MAX_BATCH: usize = 1024;

/// Strategy interface for deciding when to trigger automated retraining.
#[async_trait::async_trait]
pub trait RetrainStrategy: Send + Sync + 'static {
    /// Consumes a stream of `MetricSnapshot`s and emits a [`RetrainSignal`]
    /// whenever retraining should be kicked off. Returns when the publisher
    /// is gone or the signal receiver is dropped.
    async fn run(
        &self,
        mut rx: broadcast::Receiver<MetricSnapshot>,
        tx_trigger: mpsc::Sender<RetrainSignal>,
    ) -> Result<(), MonitoringError>;
}

/// Signal emitted by [`RetrainStrategy`] implementations.
#[derive(Debug, Clone)]
pub struct RetrainSignal {
    /// The snapshot that triggered it.
    pub degraded_snapshot: MetricSnapshot,
}

/// Baseline-comparison strategy (native).
///
/// Fires a signal for each snapshot that degrades beyond `tolerance` with
/// respect to `baseline` ([`MetricSnapshot::is_degraded`]). Repeats are
/// suppressed by the [`MonitoringSupervisor`](crate::MonitoringSupervisor)'s
/// cooldown, not here, so that native and WASM strategies behave alike.
#[derive(Debug, Clone)]
pub struct BaselineStrategy {
    baseline: MetricSnapshot,
    tolerance: f64,
}

impl BaselineStrategy {
    /// Compares every snapshot to `baseline` with `tolerance`.
    pub fn new(baseline: MetricSnapshot, tolerance: f64) -> Self {
        Self {
            baseline,
            tolerance,
        }
    }
}

#[async_trait::async_trait]
impl RetrainStrategy for BaselineStrategy {
    async fn run(
        &self,
        mut rx: broadcast::Receiver<MetricSnapshot>,
        tx_trigger: mpsc::Sender<RetrainSignal>,
    ) -> Result<(), MonitoringError> {
        loop {
            match rx.recv().await {
                Ok(snapshot) if snapshot.is_degraded(&self.baseline, self.tolerance) => {
                    let signal = RetrainSignal {
                        degraded_snapshot: snapshot,
                    };
                    if tx_trigger.send(signal).await.is_err() {
                        // Downstream has dropped; nothing more to do.
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    // Counted by the publisher (`PublisherStats::dropped`).
                    tracing::warn!(
                        lagged = n,
                        strategy = "baseline",
                        "lagged behind the metric stream"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            }
        }
    }
}

/// A verdict of a [`WasmStrategy`], with the snapshot it is about.
#[derive(Debug, Clone)]
pub struct VerdictEvent {
    /// The snapshot.
    pub snapshot: MetricSnapshot,
    /// Warn or retrain.
    pub kind: VerdictKind,
    /// The strategy's reason.
    pub reason: String,
}

/// A WebAssembly strategy behind the [`RetrainStrategy`] trait.
///
/// Snapshots are batched per model (up to [`DEFAULT_MAX_BATCH`] of whatever
/// is queued) and evaluated on a blocking thread under the instance's
/// [`Limits`]. Each `retrain` verdict becomes a [`RetrainSignal`]; every
/// verdict, with its reason, is also sent to [`verdicts`](Self::verdicts)
/// subscribers.
pub struct WasmStrategy {
    component: StrategyComponent,
    config: String,
    limits: Limits,
    instance: Arc<Mutex<StrategyInstance>>,
    info: StrategyInfo,
    max_batch: usize,
    verdicts: broadcast::Sender<VerdictEvent>,
}

impl std::fmt::Debug for WasmStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmStrategy")
            .field("info", &self.info)
            .finish_non_exhaustive()
    }
}

impl WasmStrategy {
    /// Instantiates `component` and configures it with `config` (JSON).
    ///
    /// # Errors
    ///
    /// [`LoadError`] if instantiation or configuration fails.
    pub fn new(
        component: StrategyComponent,
        config: &str,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let instance = component.instantiate(config, limits.clone())?;
        let info = instance.info().clone();
        let (verdicts, _) = broadcast::channel(1024);
        Ok(WasmStrategy {
            component,
            config: config.to_string(),
            limits,
            instance: Arc::new(Mutex::new(instance)),
            info,
            max_batch: DEFAULT_MAX_BATCH,
            verdicts,
        })
    }

    /// Loads `builtin:<name>` or a path (see [`StrategySource`]) with default
    /// limits.
    ///
    /// # Errors
    ///
    /// [`LoadError`] if the component cannot be loaded or configured.
    pub fn load(source: &str, config: &str) -> Result<Self, LoadError> {
        let component = StrategyComponent::load(&source.parse()?)?;
        Self::new(component, config, Limits::default())
    }

    /// The bundled `builtin:baseline` configured like the seed's
    /// `BaselineStrategy::new(baseline, tolerance)`.
    ///
    /// # Errors
    ///
    /// [`LoadError`] if the component cannot be loaded or configured.
    pub fn baseline(baseline: &MetricSnapshot, tolerance: f64) -> Result<Self, LoadError> {
        let config = serde_json::json!({
            "baseline": baseline.score,
            "tolerance": tolerance,
            "model_version": baseline.model_version,
        });
        let component = StrategyComponent::load(&StrategySource::Builtin("baseline".into()))?;
        Self::new(component, &config.to_string(), Limits::default())
    }

    /// Sets the largest batch per call (at least 1).
    pub fn with_max_batch(mut self, max_batch: usize) -> Self {
        self.max_batch = max_batch.max(1);
        self
    }

    /// What the strategy says about itself.
    pub fn info(&self) -> &StrategyInfo {
        &self.info
    }

    /// The loaded component.
    pub fn component(&self) -> &StrategyComponent {
        &self.component
    }

    /// Every non-healthy verdict, with its reason.
    pub fn verdicts(&self) -> broadcast::Receiver<VerdictEvent> {
        self.verdicts.subscribe()
    }

    /// Evaluates `snapshots` (any models, in order) and returns the
    /// verdicts. On a failure the instance is replaced by a fresh one (its
    /// detectors start over) and the error is returned.
    async fn evaluate(
        &self,
        snapshots: Arc<Vec<MetricSnapshot>>,
    ) -> Result<Vec<(usize, Verdict)>, MonitoringError> {
        let instance = self.instance.clone();
        let snaps = snapshots.clone();
        let result = tokio::task::spawn_blocking(move || {
            let mut inst = instance.lock();
            evaluate_grouped(&mut inst, &snaps)
        })
        .await?;
        if let Err(e) = &result {
            tracing::error!(strategy = %self.info.name, "{e}; starting a fresh instance");
            match self
                .component
                .instantiate(&self.config, self.limits.clone())
            {
                Ok(fresh) => *self.instance.lock() = fresh,
                Err(e) => {
                    tracing::error!(strategy = %self.info.name, "cannot restart the strategy: {e}")
                }
            }
        }
        result.map_err(MonitoringError::from)
    }
}

/// Evaluates snapshots of any models in order: one call per model, verdicts
/// returned as (position in `snaps`, verdict), sorted by position.
pub(crate) fn evaluate_grouped(
    inst: &mut StrategyInstance,
    snaps: &[MetricSnapshot],
) -> Result<Vec<(usize, Verdict)>, crate::runtime::StrategyError> {
    let mut order: Vec<&str> = Vec::new();
    let mut groups: std::collections::HashMap<&str, Vec<usize>> = std::collections::HashMap::new();
    for (i, s) in snaps.iter().enumerate() {
        groups
            .entry(s.model_version.as_str())
            .or_insert_with(|| {
                order.push(s.model_version.as_str());
                Vec::new()
            })
            .push(i);
    }
    let mut out = Vec::new();
    let mut batch = PointBatch::new();
    for model in order {
        let positions = &groups[model];
        batch.clear();
        for &i in positions {
            batch.push(&snaps[i].clone().into());
        }
        for v in inst.evaluate(model, &batch)? {
            out.push((positions[v.index], v));
        }
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out)
}

#[async_trait::async_trait]
impl RetrainStrategy for WasmStrategy {
    async fn run(
        &self,
        mut rx: broadcast::Receiver<MetricSnapshot>,
        tx_trigger: mpsc::Sender<RetrainSignal>,
    ) -> Result<(), MonitoringError> {
        loop {
            let first = match rx.recv().await {
                Ok(s) => s,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(lagged = n, strategy = %self.info.name, "lagged behind the metric stream");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            };
            let mut batch = vec![first];
            let mut closed = false;
            while batch.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(s) => batch.push(s),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        tracing::warn!(lagged = n, strategy = %self.info.name, "lagged behind the metric stream");
                    }
                    Err(broadcast::error::TryRecvError::Closed) => {
                        closed = true;
                        break;
                    }
                    Err(broadcast::error::TryRecvError::Empty) => break,
                }
            }
            let batch = Arc::new(batch);
            // A failing strategy loses this batch's verdicts, not the task:
            // the error is logged and the next batch goes to a fresh instance.
            let verdicts = self.evaluate(batch.clone()).await.unwrap_or_default();
            for (i, v) in verdicts {
                let snapshot = batch[i].clone();
                let _ = self.verdicts.send(VerdictEvent {
                    snapshot: snapshot.clone(),
                    kind: v.kind,
                    reason: v.reason,
                });
                if v.kind == VerdictKind::Retrain
                    && tx_trigger
                        .send(RetrainSignal {
                            degraded_snapshot: snapshot,
                        })
                        .await
                        .is_err()
                {
                    return Ok(());
                }
            }
            if closed {
                return Ok(());
            }
        }
    }
}
