//! One sandboxed strategy instance: a store, the bindings, and one detector
//! resource per model stream. Every call runs under the instance's limits.

use std::collections::HashMap;
use std::sync::Arc;

use wasmtime::component::ResourceAny;
use wasmtime::{Store, Trap};

use super::bindings::RetrainStrategy;
use super::bindings::visutility::strategy::types as wit;
use super::component::{LoadError, StrategyComponent};
use super::sandbox::{HostState, SandboxCounters};
use super::{Limits, StrategyError, StrategyFault};
use crate::snapshot::Observation;

/// Longest verdict reason kept, in bytes; longer ones are truncated.
pub const MAX_REASON_BYTES: usize = 4096;
/// Largest saved state accepted from a strategy, in bytes.
pub const MAX_STATE_BYTES: usize = 16 << 20;

fn cap_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut cut = MAX_REASON_BYTES;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let dropped = reason.len() - cut;
        reason.truncate(cut);
        reason.push_str(&format!("… ({dropped} more bytes truncated)"));
    }
    reason
}

/// What a strategy says about itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StrategyInfo {
    /// Short name, e.g. `baseline`.
    pub name: String,
    /// The strategy's own version.
    pub version: String,
    /// One line saying what it detects.
    pub description: String,
    /// JSON Schema of its configuration, if published.
    pub config_schema: Option<String>,
}

/// Warn or retrain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictKind {
    /// Worth a look; no action.
    Warn,
    /// Retrain the model.
    Retrain,
}

impl VerdictKind {
    /// `warn` or `retrain`.
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Warn => "warn",
            VerdictKind::Retrain => "retrain",
        }
    }
}

/// A non-healthy verdict on one point of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Position of the point in the batch passed to `evaluate`.
    pub index: usize,
    /// Warn or retrain.
    pub kind: VerdictKind,
    /// Why, in the strategy's words.
    pub reason: String,
}

/// Consecutive points of one model stream, in the columnar layout that
/// crosses the boundary. Reuse one with [`clear`](Self::clear) to avoid
/// allocations.
#[derive(Debug, Clone)]
pub struct PointBatch {
    inner: wit::Batch,
    any_loss: bool,
}

impl Default for PointBatch {
    fn default() -> Self {
        PointBatch {
            inner: wit::Batch {
                scores: Vec::new(),
                losses: Vec::new(),
                timestamps: Vec::new(),
                metrics: Vec::new(),
            },
            any_loss: false,
        }
    }
}

impl PointBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.inner.scores.len()
    }

    /// Whether there are no points.
    pub fn is_empty(&self) -> bool {
        self.inner.scores.is_empty()
    }

    /// Removes all points, keeping the allocations.
    pub fn clear(&mut self) {
        self.inner.scores.clear();
        self.inner.losses.clear();
        self.inner.timestamps.clear();
        self.inner.metrics.clear();
        self.any_loss = false;
    }

    /// Appends a point with only a score and a timestamp (fast path).
    #[inline]
    pub fn push_score(&mut self, score: f64, timestamp_ms: i64) {
        if self.any_loss || !self.inner.metrics.is_empty() {
            return self.push_raw(score, None, timestamp_ms);
        }
        self.inner.scores.push(score);
        self.inner.timestamps.push(timestamp_ms);
    }

    /// Appends points that carry only scores and timestamps, in bulk.
    ///
    /// # Panics
    ///
    /// If the two slices differ in length.
    pub fn extend_scores(&mut self, scores: &[f64], timestamps_ms: &[i64]) {
        assert_eq!(scores.len(), timestamps_ms.len(), "one timestamp per score");
        if self.any_loss || !self.inner.metrics.is_empty() {
            for (&s, &t) in scores.iter().zip(timestamps_ms) {
                self.push_raw(s, None, t);
            }
            return;
        }
        self.inner.scores.extend_from_slice(scores);
        self.inner.timestamps.extend_from_slice(timestamps_ms);
    }

    #[inline]
    fn push_raw(&mut self, score: f64, loss: Option<f64>, timestamp_ms: i64) {
        let n = self.inner.scores.len();
        self.inner.scores.push(score);
        self.inner.timestamps.push(timestamp_ms);
        match loss {
            Some(l) => {
                if !self.any_loss {
                    self.any_loss = true;
                    self.inner.losses.resize(n, f64::NAN);
                }
                self.inner.losses.push(l);
            }
            None if self.any_loss => self.inner.losses.push(f64::NAN),
            None => {}
        }
        for col in &mut self.inner.metrics {
            col.values.push(f64::NAN);
        }
    }

    /// Appends an observation (score, loss, timestamp and named metrics).
    pub fn push(&mut self, obs: &Observation) {
        let s = &obs.snapshot;
        self.push_parts(s.score, s.loss, s.timestamp_ms(), &obs.metrics);
    }

    /// Appends a point from its parts.
    pub fn push_parts(
        &mut self,
        score: f64,
        loss: Option<f64>,
        timestamp_ms: i64,
        metrics: &std::collections::BTreeMap<String, f64>,
    ) {
        if loss.is_none() && metrics.is_empty() {
            return self.push_score(score, timestamp_ms);
        }
        self.push_raw(score, loss, timestamp_ms);
        let n = self.inner.scores.len();
        for (name, &value) in metrics {
            match self.inner.metrics.iter_mut().find(|c| &c.name == name) {
                Some(col) => col.values[n - 1] = value,
                None => {
                    let mut values = vec![f64::NAN; n];
                    values[n - 1] = value;
                    self.inner.metrics.push(wit::MetricColumn {
                        name: name.clone(),
                        values,
                    });
                }
            }
        }
    }

    fn newest_timestamp(&self) -> Option<i64> {
        self.inner.timestamps.iter().copied().max()
    }
}

/// One sandboxed instance of a strategy with one detector per model stream.
pub struct StrategyInstance {
    store: Store<HostState>,
    bindings: RetrainStrategy,
    info: StrategyInfo,
    label: String,
    limits: Limits,
    deadline_ticks: u64,
    fuel_metering: bool,
    detectors: HashMap<String, ResourceAny>,
    counters: Arc<SandboxCounters>,
    last_fuel: u64,
    poisoned: bool,
}

impl std::fmt::Debug for StrategyInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StrategyInstance")
            .field("label", &self.label)
            .field("info", &self.info)
            .field("models", &self.detectors.len())
            .finish_non_exhaustive()
    }
}

impl StrategyInstance {
    pub(crate) fn new(
        component: &StrategyComponent,
        config: Option<&str>,
        limits: Limits,
    ) -> Result<Self, LoadError> {
        let label = component.meta.label.clone();
        let counters = Arc::new(SandboxCounters::default());
        let state = HostState::new(label.clone(), &limits, counters.clone());
        let mut store = Store::new(component.runtime.engine(), state);
        store.limiter(|s| &mut s.limiter);
        store.epoch_deadline_trap();
        let deadline_ticks = component.runtime.ticks_for(limits.deadline);
        let fault = |call, e| StrategyError {
            strategy: label.clone(),
            call,
            fault: e,
        };

        let fuel_metering = component.runtime.fuel_metering();
        // Instantiation runs the guest's start code: give it a budget too.
        if fuel_metering {
            store
                .set_fuel(limits.fuel)
                .map_err(|e| fault("instantiate", StrategyFault::Trap(e.to_string())))?;
        }
        store.set_epoch_deadline(deadline_ticks);
        let bindings = component
            .pre
            .instantiate(&mut store)
            .map_err(|e| fault("instantiate", classify(&e, &store, &limits)))?;

        let mut instance = StrategyInstance {
            store,
            bindings,
            info: StrategyInfo {
                name: String::new(),
                version: String::new(),
                description: String::new(),
                config_schema: None,
            },
            label,
            limits,
            deadline_ticks,
            fuel_metering,
            detectors: HashMap::new(),
            counters,
            last_fuel: 0,
            poisoned: false,
        };
        let info = instance.call("describe", |store, b| {
            b.visutility_strategy_strategy().call_describe(store)
        })?;
        instance.info = StrategyInfo {
            name: info.name,
            version: info.version,
            description: info.description,
            config_schema: info.config_schema,
        };
        if let Some(config) = config {
            instance
                .call("configure", |store, b| {
                    b.visutility_strategy_strategy()
                        .call_configure(store, config)
                })?
                .map_err(|message| LoadError::Config {
                    label: instance.label.clone(),
                    message,
                })?;
        }
        Ok(instance)
    }

    /// What the strategy says about itself.
    pub fn info(&self) -> &StrategyInfo {
        &self.info
    }

    /// `builtin:NAME` or the component's path.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The limits every call runs under.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Fuel used by the last call.
    pub fn last_fuel(&self) -> u64 {
        self.last_fuel
    }

    /// Counters of dropped log lines and output.
    pub fn counters(&self) -> &Arc<SandboxCounters> {
        &self.counters
    }

    /// Whether an earlier call failed; a poisoned instance must be replaced.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    /// The model streams this instance holds a detector for.
    pub fn models(&self) -> impl Iterator<Item = &str> {
        self.detectors.keys().map(String::as_str)
    }

    /// Feeds `batch` (points of model `model`, oldest first) to the model's
    /// detector, creating it on first use. Returns the non-healthy verdicts.
    ///
    /// # Errors
    ///
    /// [`StrategyError`] if the call traps, exceeds a limit, or returns an
    /// index outside the batch. The instance is then poisoned.
    pub fn evaluate(
        &mut self,
        model: &str,
        batch: &PointBatch,
    ) -> Result<Vec<Verdict>, StrategyError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let detector = self.detector(model)?;
        if let Some(ts) = batch.newest_timestamp() {
            // The virtual clock only moves forward.
            self.store
                .data()
                .clock_ms
                .fetch_max(ts, std::sync::atomic::Ordering::Relaxed);
        }
        let raw = self.call("evaluate", |store, b| {
            b.visutility_strategy_strategy()
                .detector()
                .call_evaluate(store, detector, &batch.inner)
        })?;
        let n = batch.len();
        let mut out = Vec::with_capacity(raw.len());
        let mut previous = None;
        for v in raw {
            let index = v.index as usize;
            if index >= n || previous.is_some_and(|p| index <= p) {
                self.poisoned = true;
                return Err(self.error(
                    "evaluate",
                    StrategyFault::Contract(format!(
                        "verdict index {index} is out of order or outside the batch of {n} points"
                    )),
                ));
            }
            previous = Some(index);
            let kind = match v.severity {
                wit::Severity::Warn => VerdictKind::Warn,
                wit::Severity::Retrain => VerdictKind::Retrain,
            };
            out.push(Verdict {
                index,
                kind,
                reason: cap_reason(v.reason),
            });
        }
        Ok(out)
    }

    /// The saved state of `model`'s detector, if it has one.
    ///
    /// # Errors
    ///
    /// [`StrategyError`] if the call fails or the state is larger than
    /// [`MAX_STATE_BYTES`].
    pub fn save(&mut self, model: &str) -> Result<Option<Vec<u8>>, StrategyError> {
        let Some(&detector) = self.detectors.get(model) else {
            return Ok(None);
        };
        let state = self.call("save", |store, b| {
            b.visutility_strategy_strategy()
                .detector()
                .call_save(store, detector)
        })?;
        if state.len() > MAX_STATE_BYTES {
            return Err(self.error(
                "save",
                StrategyFault::Contract(format!(
                    "saved state of {} bytes exceeds the cap of {MAX_STATE_BYTES} bytes",
                    state.len()
                )),
            ));
        }
        Ok(Some(state))
    }

    /// Replaces `model`'s detector with one restored from `state`.
    ///
    /// Returns `Ok(Err(message))` when the strategy refuses the state (the
    /// old detector, if any, is kept).
    ///
    /// # Errors
    ///
    /// [`StrategyError`] if the call fails.
    pub fn restore(
        &mut self,
        model: &str,
        state: &[u8],
    ) -> Result<Result<(), String>, StrategyError> {
        let restored = self.call("restore", |store, b| {
            b.visutility_strategy_strategy()
                .detector()
                .call_restore(store, model, state)
        })?;
        match restored {
            Ok(handle) => {
                if let Some(old) = self.detectors.insert(model.to_string(), handle) {
                    let _ = old.resource_drop(&mut self.store);
                }
                Ok(Ok(()))
            }
            Err(message) => Ok(Err(message)),
        }
    }

    /// Drops `model`'s detector (e.g. a retired model).
    pub fn forget(&mut self, model: &str) {
        if let Some(old) = self.detectors.remove(model) {
            let _ = old.resource_drop(&mut self.store);
        }
    }

    fn detector(&mut self, model: &str) -> Result<ResourceAny, StrategyError> {
        if let Some(&d) = self.detectors.get(model) {
            return Ok(d);
        }
        let d = self.call("detector.new", |store, b| {
            b.visutility_strategy_strategy()
                .detector()
                .call_constructor(store, model)
        })?;
        self.detectors.insert(model.to_string(), d);
        Ok(d)
    }

    fn error(&self, call: &'static str, fault: StrategyFault) -> StrategyError {
        StrategyError {
            strategy: self.label.clone(),
            call,
            fault,
        }
    }

    fn call<R>(
        &mut self,
        name: &'static str,
        f: impl FnOnce(&mut Store<HostState>, &RetrainStrategy) -> wasmtime::Result<R>,
    ) -> Result<R, StrategyError> {
        if self.poisoned {
            return Err(self.error(name, StrategyFault::Poisoned));
        }
        let budget = self.limits.fuel;
        self.store.data_mut().begin_call();
        if self.fuel_metering
            && let Err(e) = self.store.set_fuel(budget)
        {
            return Err(self.error(name, StrategyFault::Trap(e.to_string())));
        }
        self.store.set_epoch_deadline(self.deadline_ticks);
        let result = f(&mut self.store, &self.bindings);
        if self.fuel_metering {
            self.last_fuel = budget.saturating_sub(self.store.get_fuel().unwrap_or(0));
        }
        let panic = self.store.data_mut().flush_output();
        result.map_err(|e| {
            self.poisoned = true;
            let fault = match (classify(&e, &self.store, &self.limits), panic) {
                (StrategyFault::Trap(trap), Some(panic)) => {
                    StrategyFault::Trap(format!("{trap}; the guest {panic}"))
                }
                (fault, _) => fault,
            };
            self.error(name, fault)
        })
    }
}

fn classify(e: &wasmtime::Error, store: &Store<HostState>, limits: &Limits) -> StrategyFault {
    if let Some(resource) = store.data().limiter.hit {
        return StrategyFault::MemoryCap {
            resource,
            limit_bytes: limits.memory_bytes,
        };
    }
    match e.downcast_ref::<Trap>() {
        Some(Trap::OutOfFuel) => StrategyFault::OutOfFuel {
            budget: limits.fuel,
        },
        Some(Trap::Interrupt) => StrategyFault::Deadline {
            deadline: limits.deadline,
        },
        Some(Trap::StackOverflow) => StrategyFault::StackOverflow,
        // The trap itself (`wasm `unreachable` instruction executed`, an
        // out-of-bounds access...), not the backtrace around it.
        Some(trap) => {
            let text = trap.to_string();
            StrategyFault::Trap(
                text.strip_prefix("wasm trap: ")
                    .unwrap_or(&text)
                    .to_string(),
            )
        }
        None => {
            // A host-side error: the root cause's first line.
            let text = e.root_cause().to_string();
            StrategyFault::Trap(text.lines().next().unwrap_or("unknown error").to_string())
        }
    }
}
