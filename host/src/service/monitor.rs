//! One monitor: a strategy instance on its own thread, fed batches of
//! snapshots through a bounded queue, turning retrain verdicts into durable
//! signals (with a cooldown per model), reporting stale models, and
//! checkpointing detector state.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde::Serialize;

use super::config::MonitorConfig;
use super::store::{NewSignal, Store};
use crate::runtime::{
    ComponentMeta, LoadError, PointBatch, StrategyComponent, StrategyInfo, StrategyInstance,
    VerdictKind,
};
use crate::snapshot::Observation;

/// Upper bounds (seconds) of the strategy call latency histogram.
pub const LATENCY_BUCKETS: [f64; 10] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0,
];

/// Counters of one monitor (all monotonic except `queued`).
#[derive(Debug, Default)]
pub struct MonitorStats {
    /// Snapshots selected by this monitor and accepted into its queue.
    pub points_accepted: AtomicU64,
    /// Snapshots evaluated by the strategy.
    pub points_evaluated: AtomicU64,
    /// `warn` verdicts.
    pub verdicts_warn: AtomicU64,
    /// `retrain` verdicts.
    pub verdicts_retrain: AtomicU64,
    /// Signals recorded (retrain + stale).
    pub signals: AtomicU64,
    /// Retrain verdicts suppressed by the cooldown.
    pub suppressed: AtomicU64,
    /// Stale signals.
    pub stale: AtomicU64,
    /// Failed strategy calls.
    pub traps: AtomicU64,
    /// Fuel used in total.
    pub fuel: AtomicU64,
    /// Strategy calls, and their latency histogram (cumulative buckets are
    /// computed when exported).
    pub calls: AtomicU64,
    /// Sum of call latencies in nanoseconds.
    pub call_nanos: AtomicU64,
    /// Calls per latency bucket (non-cumulative; the last is +Inf).
    pub call_buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Batches queued and not yet evaluated.
    pub queued: AtomicUsize,
    /// Models currently stale.
    pub stale_models: AtomicU64,
    /// Guest log lines dropped by the sandbox's rate limit.
    pub log_lines_dropped: AtomicU64,
    /// Guest stdout/stderr bytes dropped by the sandbox's cap.
    pub output_bytes_dropped: AtomicU64,
    /// Snapshots not evaluated because the monitor was quarantined, or its
    /// strategy was failing when the service stopped.
    pub points_skipped: AtomicU64,
    /// Snapshots not queued because the monitor was failing and its queue
    /// was full.
    pub points_shed: AtomicU64,
    /// Consecutive failed calls.
    pub consecutive_failures: AtomicU64,
    /// Whether the monitor is quarantined.
    pub quarantined: std::sync::atomic::AtomicBool,
    /// Strategy swaps refused by validation.
    pub swaps_refused: AtomicU64,
    /// The last failure.
    pub last_error: Mutex<Option<String>>,
}

/// What `/v1/monitors` shows.
#[derive(Debug, Clone, Serialize)]
pub struct MonitorStatus {
    /// Name.
    pub name: String,
    /// `running`, `behind` (queue over half full), `quarantined` or
    /// `stopped`.
    pub status: String,
    /// The strategy.
    pub strategy: StrategyStatus,
    /// Model globs.
    pub models: Vec<String>,
    /// Shadow monitor.
    pub shadow: bool,
    /// Counters.
    pub points_accepted: u64,
    /// Counters.
    pub points_evaluated: u64,
    /// Accepted but not yet evaluated.
    pub lag_points: u64,
    /// Counters.
    pub verdicts_warn: u64,
    /// Counters.
    pub verdicts_retrain: u64,
    /// Counters.
    pub signals: u64,
    /// Counters.
    pub suppressed: u64,
    /// Counters.
    pub traps: u64,
    /// Snapshots not evaluated while quarantined.
    pub points_skipped: u64,
    /// Snapshots shed while failing with a full queue.
    pub points_shed: u64,
    /// Consecutive failed calls.
    pub consecutive_failures: u64,
    /// Batches waiting.
    pub queued_batches: usize,
    /// The last failure.
    pub last_error: Option<String>,
    /// What the last swap or rollback did (state migrated or started fresh).
    pub last_swap: Option<String>,
    /// The version a rollback would restore.
    pub previous_strategy: Option<StrategyStatus>,
    /// Until when (ms since the epoch) a new version rolls back
    /// automatically after `probation_failures` failures.
    pub probation_until_ms: Option<i64>,
    /// For a shadow monitor with `shadows`: how its retrain verdicts agree
    /// with those of the monitor it shadows.
    pub agreement: Option<ShadowAgreement>,
}

/// How a shadow monitor's retrain verdicts (before the cooldown) agree with
/// those of the monitor it shadows, on the snapshots both have seen and the
/// models both select.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowAgreement {
    /// The monitor shadowed.
    pub with: String,
    /// The service's snapshot sequence numbers compared: `[from, to)`.
    pub window: (u64, u64),
    /// Verdicts of the same model at most `tolerance` snapshots apart.
    pub paired: usize,
    /// Retrain verdicts of the shadowed monitor with no partner.
    pub only_primary: usize,
    /// Retrain verdicts of the shadow with no partner.
    pub only_shadow: usize,
    /// `paired / (paired + only_primary + only_shadow)`; 1 when neither fired.
    pub agreement: f64,
    /// Median of shadow minus primary over the pairs, in snapshots
    /// (positive: the shadow fires later).
    pub median_delay: Option<i64>,
    /// The pairing window.
    pub tolerance: u64,
}

/// Compares the shadow monitor `shadow` with `primary` (see
/// [`ShadowAgreement`]).
pub fn agreement(shadow: &Monitor, primary: &Monitor) -> ShadowAgreement {
    use crate::replay::ReplaySignal;
    let (s, p) = (shadow.verdicts.lock(), primary.verdicts.lock());
    let window = (
        s.complete_from.max(p.complete_from),
        s.through.min(p.through),
    );
    let both = |model: &str| shadow.config.selects(model) && primary.config.selects(model);
    let signals = |r: &RecentVerdicts| -> Vec<ReplaySignal> {
        r.verdicts
            .iter()
            .filter(|(m, seq)| (window.0..window.1).contains(seq) && both(m))
            .map(|(m, seq)| ReplaySignal {
                index: *seq,
                model_version: m.clone(),
                kind: VerdictKind::Retrain,
                reason: String::new(),
                score: 0.0,
                timestamp: 0,
            })
            .collect()
    };
    let tolerance = shadow.config.agreement_tolerance;
    let c = crate::replay::compare(&signals(&p), &signals(&s), tolerance);
    let mut delays = c.delays.clone();
    delays.sort_unstable();
    ShadowAgreement {
        with: primary.config.name.clone(),
        window: (window.0, window.1.max(window.0)),
        paired: c.matched,
        only_primary: c.only_a.len(),
        only_shadow: c.only_b.len(),
        agreement: c.agreement,
        median_delay: delays.get(delays.len() / 2).copied(),
        tolerance,
    }
}

/// What is serving now, shared by the worker (which swaps it) and the API.
#[derive(Debug, Clone)]
struct Serving {
    info: StrategyInfo,
    meta: ComponentMeta,
    previous: Option<(StrategyInfo, ComponentMeta)>,
    last_swap: Option<String>,
    probation_until_ms: Option<i64>,
}

fn strategy_status(info: &StrategyInfo, meta: &ComponentMeta) -> StrategyStatus {
    StrategyStatus {
        source: meta.label.clone(),
        name: info.name.clone(),
        version: info.version.clone(),
        sha256: meta.sha256.clone(),
    }
}

/// What a swap or rollback did.
#[derive(Debug, Clone, Serialize)]
pub struct SwapReport {
    /// The strategy that was serving.
    pub old: StrategyStatus,
    /// The strategy serving now.
    pub new: StrategyStatus,
    /// What happened to the detector state.
    pub detail: String,
}

/// Strategy identity in a status.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyStatus {
    /// `builtin:NAME` or path.
    pub source: String,
    /// Self-described name.
    pub name: String,
    /// Version.
    pub version: String,
    /// SHA-256 of the component.
    pub sha256: String,
}

/// A running monitor, as the service sees it.
pub struct Monitor {
    /// Its configuration.
    pub config: MonitorConfig,
    /// Its counters.
    pub stats: Arc<MonitorStats>,
    serving: Arc<Mutex<Serving>>,
    store: Store,
    /// Recent retrain verdicts, for shadow agreement.
    pub verdicts: Arc<Mutex<RecentVerdicts>>,
    capacity: usize,
    tx: Mutex<Option<mpsc::Sender<Message>>>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set by [`stop`](Self::stop): back-off waits end, and a failing
    /// strategy does not hold the shutdown up.
    stopping: Arc<AtomicBool>,
}

impl std::fmt::Debug for Monitor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Monitor")
            .field("name", &self.config.name)
            .finish_non_exhaustive()
    }
}

/// What a monitor's worker receives.
enum Message {
    /// Snapshots to evaluate (the worker selects its models), and the
    /// service-wide sequence number of the first one.
    Batch(Arc<Vec<Observation>>, u64),
    /// Leave quarantine: a fresh instance from the last checkpoint.
    Resume,
    /// Validate a compiled candidate and, if it passes, serve it from the
    /// next batch on (with `config`, else the current configuration).
    Swap {
        component: StrategyComponent,
        config: Option<String>,
        trigger: String,
        reply: mpsc::Sender<Result<SwapReport, String>>,
    },
    /// Serve the previous version again.
    Rollback {
        trigger: String,
        reply: mpsc::Sender<Result<SwapReport, String>>,
    },
}

/// Saved detector states: model and bytes.
type States = Vec<(String, Vec<u8>)>;

/// Retrain verdicts kept per monitor for shadow agreement.
const RECENT_VERDICTS: usize = 10_000;

/// A monitor's recent retrain verdicts (before the cooldown), by the
/// service-wide sequence number of the snapshot, so that a shadow monitor
/// can be compared with the monitor it shadows on the same snapshots.
#[derive(Debug, Default)]
pub struct RecentVerdicts {
    /// `(model, sequence number)`, oldest first.
    pub verdicts: std::collections::VecDeque<(String, u64)>,
    /// Sequence numbers below this were seen (evaluated or skipped).
    pub through: u64,
    /// Sequence number from which the ring is complete (older ones were
    /// dropped).
    pub complete_from: u64,
}

impl RecentVerdicts {
    fn push(&mut self, model: &str, seq: u64) {
        if self.verdicts.len() == RECENT_VERDICTS
            && let Some((_, dropped)) = self.verdicts.pop_front()
        {
            self.complete_from = dropped + 1;
        }
        self.verdicts.push_back((model.to_string(), seq));
    }
}

/// Snapshots kept for dry runs of swap candidates (whole recent batches).
const RECENT_POINTS: usize = 1024;

/// Everything a monitor's worker needs to record signals.
#[derive(Clone, Debug)]
pub struct Outbox {
    /// The store.
    pub store: Store,
    /// Woken when a signal is recorded.
    pub wake: Arc<tokio::sync::Notify>,
}

impl Monitor {
    /// Loads the strategy, instantiates and configures it, restores saved
    /// state, and starts the worker thread.
    ///
    /// # Errors
    ///
    /// [`LoadError`] if the strategy cannot be loaded or configured.
    pub fn start(
        config: MonitorConfig,
        outbox: Outbox,
        capacity: usize,
        checkpoint_every: Duration,
    ) -> Result<Arc<Monitor>, LoadError> {
        let component = StrategyComponent::load(&config.strategy.parse()?)?;
        let json = config.config_json();
        let limits = config.limits.limits();
        let mut instance = component.instantiate(&json, limits.clone())?;
        let info = instance.info().clone();
        let meta = component.meta().clone();
        restore_states(&mut instance, &outbox.store, &config.name);

        let stats = Arc::new(MonitorStats::default());
        let store = outbox.store.clone();
        let verdicts = Arc::new(Mutex::new(RecentVerdicts::default()));
        let stopping = Arc::new(AtomicBool::new(false));
        let serving = Arc::new(Mutex::new(Serving {
            info: info.clone(),
            meta: meta.clone(),
            previous: None,
            last_swap: None,
            probation_until_ms: None,
        }));
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            verdicts: verdicts.clone(),
            stopping: stopping.clone(),
            skipped_at_stop: 0,
            serving: serving.clone(),
            previous: None,
            previous_states: Vec::new(),
            probation: None,
            recent: std::collections::VecDeque::new(),
            recent_points: 0,
            config: config.clone(),
            component,
            json,
            instance,
            outbox,
            stats: stats.clone(),
            info: info.clone(),
            meta: meta.clone(),
            checkpoint_every,
        };
        let thread = std::thread::Builder::new()
            .name(format!("monitor-{}", config.name))
            .spawn(move || worker.run(rx))
            .map_err(|e| LoadError::Engine(format!("cannot start the monitor thread: {e}")))?;
        Ok(Arc::new(Monitor {
            config,
            stats,
            serving,
            store,
            verdicts,
            capacity,
            tx: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            stopping,
        }))
    }

    /// Whether it takes batches (false once it is stopping).
    pub fn accepting(&self) -> bool {
        self.tx.lock().is_some()
    }

    /// Whether the queue has room for one more batch.
    pub fn has_room(&self) -> bool {
        self.stats.queued.load(Ordering::Relaxed) < self.capacity
    }

    /// Queues a batch (the worker selects its models). `selected` is the
    /// number of snapshots this monitor selects in it.
    pub fn enqueue(&self, batch: Arc<Vec<Observation>>, seq: u64, selected: u64) -> bool {
        let tx = self.tx.lock();
        let Some(tx) = tx.as_ref() else { return false };
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        self.stats
            .points_accepted
            .fetch_add(selected, Ordering::Relaxed);
        if tx.send(Message::Batch(batch, seq)).is_err() {
            self.stats.queued.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Takes the monitor out of quarantine (a fresh instance restored from
    /// the last checkpoint). Returns false when it is stopped.
    pub fn resume(&self) -> bool {
        self.tx
            .lock()
            .as_ref()
            .is_some_and(|tx| tx.send(Message::Resume).is_ok())
    }

    /// Asks the worker to validate `component` and serve it from the next
    /// batch on; waits for the outcome (at most `wait`).
    ///
    /// # Errors
    ///
    /// Why the candidate was refused (the running strategy keeps serving).
    pub fn swap(
        &self,
        component: StrategyComponent,
        config: Option<String>,
        trigger: &str,
        wait: Duration,
    ) -> Result<SwapReport, String> {
        let (reply, rx) = mpsc::channel();
        self.send_control(Message::Swap {
            component,
            config,
            trigger: trigger.to_string(),
            reply,
        })?;
        rx.recv_timeout(wait).map_err(|_| {
            "the monitor did not answer in time; the swap may still happen".to_string()
        })?
    }

    /// Asks the worker to serve the previous version again.
    ///
    /// # Errors
    ///
    /// Why it could not (no previous version, or it fails validation).
    pub fn rollback(&self, trigger: &str, wait: Duration) -> Result<SwapReport, String> {
        let (reply, rx) = mpsc::channel();
        self.send_control(Message::Rollback {
            trigger: trigger.to_string(),
            reply,
        })?;
        rx.recv_timeout(wait).map_err(|_| {
            "the monitor did not answer in time; the rollback may still happen".to_string()
        })?
    }

    /// Records a candidate refused before it reached the monitor (it did not
    /// compile): the swap log, the counter, the log.
    pub fn record_refusal(&self, trigger: &str, candidate_sha256: &str, reason: &str) {
        self.stats.swaps_refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(monitor = %self.config.name, trigger, "strategy swap refused: {reason}");
        let old = self.status().strategy;
        let record = super::store::SwapRecord {
            created: 0,
            monitor: self.config.name.clone(),
            trigger: trigger.to_string(),
            outcome: "refused".into(),
            old_sha256: old.sha256,
            old_version: old.version,
            new_sha256: candidate_sha256.to_string(),
            new_version: String::new(),
            detail: reason.to_string(),
        };
        if let Err(e) = self.store.record_swap(&record) {
            tracing::error!(monitor = %self.config.name, "cannot record the refused swap: {e}");
        }
    }

    fn send_control(&self, m: Message) -> Result<(), String> {
        let tx = self.tx.lock();
        let tx = tx
            .as_ref()
            .ok_or_else(|| "the monitor is stopping".to_string())?;
        tx.send(m)
            .map_err(|_| "the monitor is stopping".to_string())
    }

    /// Whether its strategy is failing (last call failed) or quarantined.
    pub fn failing(&self) -> bool {
        self.quarantined() || self.stats.consecutive_failures.load(Ordering::Relaxed) > 0
    }

    /// Counts `n` snapshots not queued because the failing monitor's queue
    /// was full.
    pub fn shed(&self, n: u64) {
        self.stats.points_shed.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether the monitor is quarantined.
    pub fn quarantined(&self) -> bool {
        self.stats.quarantined.load(Ordering::Relaxed)
    }

    /// Stops accepting batches, lets the worker drain its queue and
    /// checkpoint, and waits for it.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.tx.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }

    /// The status shown by the API.
    pub fn status(&self) -> MonitorStatus {
        let s = &self.stats;
        let serving = self.serving.lock().clone();
        let queued = s.queued.load(Ordering::Relaxed);
        let accepted = s.points_accepted.load(Ordering::Relaxed);
        let evaluated = s.points_evaluated.load(Ordering::Relaxed);
        let running = self.tx.lock().is_some();
        MonitorStatus {
            name: self.config.name.clone(),
            status: if !running {
                "stopped".into()
            } else if s.quarantined.load(Ordering::Relaxed) {
                "quarantined".into()
            } else if queued * 2 > self.capacity {
                "behind".into()
            } else {
                "running".into()
            },
            strategy: strategy_status(&serving.info, &serving.meta),
            models: self.config.models.clone(),
            shadow: self.config.shadow,
            points_accepted: accepted,
            points_evaluated: evaluated,
            lag_points: accepted
                .saturating_sub(evaluated + s.points_skipped.load(Ordering::Relaxed)),
            verdicts_warn: s.verdicts_warn.load(Ordering::Relaxed),
            verdicts_retrain: s.verdicts_retrain.load(Ordering::Relaxed),
            signals: s.signals.load(Ordering::Relaxed),
            suppressed: s.suppressed.load(Ordering::Relaxed),
            traps: s.traps.load(Ordering::Relaxed),
            points_skipped: s.points_skipped.load(Ordering::Relaxed),
            points_shed: s.points_shed.load(Ordering::Relaxed),
            consecutive_failures: s.consecutive_failures.load(Ordering::Relaxed),
            queued_batches: queued,
            last_error: s.last_error.lock().clone(),
            last_swap: serving.last_swap.clone(),
            previous_strategy: serving
                .previous
                .as_ref()
                .map(|(i, m)| strategy_status(i, m)),
            probation_until_ms: serving.probation_until_ms,
            agreement: None,
        }
    }
}

fn restore_states(instance: &mut StrategyInstance, store: &Store, monitor: &str) {
    let states = match store.load_states(monitor) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(
                monitor,
                "cannot read saved detector state: {e}; starting fresh"
            );
            return;
        }
    };
    for (model, _sha, bytes) in states {
        match instance.restore(&model, &bytes) {
            Ok(Ok(())) => tracing::info!(monitor, model = %model, "detector state restored"),
            Ok(Err(why)) => {
                tracing::warn!(monitor, model = %model, "saved state not accepted ({why}); starting fresh")
            }
            Err(e) => {
                tracing::error!(monitor, model = %model, "restoring state failed: {e}; starting fresh")
            }
        }
    }
}

struct Worker {
    config: MonitorConfig,
    component: StrategyComponent,
    json: String,
    instance: StrategyInstance,
    outbox: Outbox,
    stats: Arc<MonitorStats>,
    info: StrategyInfo,
    meta: ComponentMeta,
    checkpoint_every: Duration,
    stopping: Arc<AtomicBool>,
    /// Snapshots not evaluated because the strategy was failing when the
    /// service stopped.
    skipped_at_stop: u64,
    serving: Arc<Mutex<Serving>>,
    verdicts: Arc<Mutex<RecentVerdicts>>,
    /// What a rollback restores: component and configuration.
    previous: Option<(StrategyComponent, String)>,
    /// The previous version's detector states when it was swapped out.
    previous_states: States,
    /// A new version's probation: until when, and its failures so far.
    probation: Option<(Instant, u32)>,
    /// The last batches (at least `RECENT_POINTS` snapshots), for dry runs.
    recent: std::collections::VecDeque<Arc<Vec<Observation>>>,
    recent_points: usize,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Message>) {
        let mut selected: HashMap<String, bool> = HashMap::new();
        let mut last_signal: HashMap<String, Instant> = HashMap::new();
        let mut last_seen: HashMap<String, Instant> = HashMap::new();
        let mut stale: HashSet<String> = HashSet::new();
        let mut last_checkpoint = Instant::now();
        let tick = self
            .config
            .stale_after
            .map_or(Duration::from_millis(500), |s| {
                (s / 4).max(Duration::from_millis(10))
            });
        loop {
            match rx.recv_timeout(tick.min(self.checkpoint_every)) {
                Ok(Message::Batch(batch, seq)) => {
                    self.evaluate(
                        &batch,
                        seq,
                        &mut selected,
                        &mut last_signal,
                        &mut last_seen,
                        &mut stale,
                    );
                    self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    self.remember(batch);
                }
                Ok(Message::Swap {
                    component,
                    config,
                    trigger,
                    reply,
                }) => {
                    let result = self.swap(component, config, &trigger, true);
                    let _ = reply.send(result);
                }
                Ok(Message::Rollback { trigger, reply }) => {
                    let result = self.rollback(&trigger);
                    let _ = reply.send(result);
                }
                Ok(Message::Resume) => {
                    if self.stats.quarantined.swap(false, Ordering::Relaxed) {
                        self.stats.consecutive_failures.store(0, Ordering::Relaxed);
                        self.restart();
                        tracing::warn!(monitor = %self.config.name, "monitor resumed from quarantine");
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if let Some(after) = self.config.stale_after {
                self.check_stale(after, &last_seen, &mut stale);
            }
            if last_checkpoint.elapsed() >= self.checkpoint_every {
                self.checkpoint();
                last_checkpoint = Instant::now();
            }
        }
        self.checkpoint();
        if self.skipped_at_stop > 0 {
            tracing::warn!(
                monitor = %self.config.name,
                skipped = self.skipped_at_stop,
                "stopped without evaluating the rest of its queue: its strategy was failing"
            );
        }
        tracing::info!(monitor = %self.config.name, "monitor stopped after draining its queue");
    }

    fn evaluate(
        &mut self,
        batch: &[Observation],
        seq: u64,
        selected: &mut HashMap<String, bool>,
        last_signal: &mut HashMap<String, Instant>,
        last_seen: &mut HashMap<String, Instant>,
        stale: &mut HashSet<String>,
    ) {
        let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
        let mut index: HashMap<&str, usize> = HashMap::new();
        for (i, o) in batch.iter().enumerate() {
            let model = o.snapshot.model_version.as_str();
            let wanted = match selected.get(model) {
                Some(&w) => w,
                None => {
                    let w = self.config.selects(model);
                    selected.insert(model.to_string(), w);
                    w
                }
            };
            if !wanted {
                continue;
            }
            let g = *index.entry(model).or_insert_with(|| {
                groups.push((model, Vec::new()));
                groups.len() - 1
            });
            groups[g].1.push(i);
        }
        let now = Instant::now();
        let mut points = PointBatch::new();
        for (model, positions) in groups {
            if self.stats.quarantined.load(Ordering::Relaxed) {
                self.stats
                    .points_skipped
                    .fetch_add(positions.len() as u64, Ordering::Relaxed);
                continue;
            }
            // Stopping with a failing strategy: draining through it (a
            // deadline per batch, then back-off) could hold the shutdown up
            // for hours, and a failing call yields no verdicts anyway.
            if self.stopping.load(Ordering::Relaxed)
                && self.stats.consecutive_failures.load(Ordering::Relaxed) > 0
            {
                self.stats
                    .points_skipped
                    .fetch_add(positions.len() as u64, Ordering::Relaxed);
                self.skipped_at_stop += positions.len() as u64;
                continue;
            }
            last_seen.insert(model.to_string(), now);
            if stale.remove(model) {
                self.stats.stale_models.fetch_sub(1, Ordering::Relaxed);
            }
            points.clear();
            for &i in &positions {
                points.push(&batch[i]);
            }
            let started = Instant::now();
            let result = self.instance.evaluate(model, &points);
            self.observe_call(started.elapsed());
            let verdicts = match result {
                Ok(v) => v,
                Err(e) => {
                    self.failed(model, &e, positions.iter().map(|&i| &batch[i]));
                    self.stats
                        .points_evaluated
                        .fetch_add(positions.len() as u64, Ordering::Relaxed);
                    continue;
                }
            };
            self.stats.consecutive_failures.store(0, Ordering::Relaxed);
            self.stats
                .points_evaluated
                .fetch_add(positions.len() as u64, Ordering::Relaxed);
            for v in verdicts {
                let obs = &batch[positions[v.index]];
                match v.kind {
                    VerdictKind::Warn => {
                        self.stats.verdicts_warn.fetch_add(1, Ordering::Relaxed);
                    }
                    VerdictKind::Retrain => {
                        self.stats.verdicts_retrain.fetch_add(1, Ordering::Relaxed);
                        self.verdicts
                            .lock()
                            .push(model, seq + positions[v.index] as u64);
                        let now = Instant::now();
                        if let Some(at) = last_signal.get(model)
                            && now.duration_since(*at) < self.config.cooldown
                        {
                            self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        last_signal.insert(model.to_string(), now);
                        let signal = self.signal(model, "retrain", v.reason, obs);
                        self.record(&signal);
                    }
                }
            }
        }
        // Seen through here (verdicts included), for shadow agreement.
        self.verdicts.lock().through = seq + batch.len() as u64;
    }

    /// A failed call: record it with its batch, then restart with back-off,
    /// or quarantine after `max_failures` consecutive failures.
    fn failed<'a>(
        &mut self,
        model: &str,
        e: &crate::runtime::StrategyError,
        batch: impl Iterator<Item = &'a Observation>,
    ) {
        self.stats.traps.fetch_add(1, Ordering::Relaxed);
        let failures = self
            .stats
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            + 1;
        let message = format!("monitor `{}`: {e}", self.config.name);
        tracing::error!(model, "{message}; the batch's verdicts are lost");
        *self.stats.last_error.lock() = Some(message.clone());
        let mut ndjson = String::new();
        for o in batch {
            if ndjson.len() > 1 << 20 {
                ndjson.push_str("(truncated at 1 MiB)\n");
                break;
            }
            ndjson.push_str(&serde_json::to_string(o).unwrap_or_default());
            ndjson.push('\n');
        }
        let record = super::store::FailureRecord {
            created: 0,
            monitor: self.config.name.clone(),
            model: model.to_string(),
            strategy_sha256: self.meta.sha256.clone(),
            fault: e.fault.kind().to_string(),
            error: message.clone(),
            batch: ndjson,
        };
        if let Err(err) = self.outbox.store.record_failure(&record) {
            tracing::error!("cannot record the failure: {err}");
        }
        if let Some((until, ref mut n)) = self.probation
            && Instant::now() < until
        {
            *n += 1;
            if *n >= self.config.probation_failures && self.previous.is_some() {
                let trigger = format!(
                    "rollback (automatic: {n} failures within the probation of a new version)"
                );
                match self.rollback(&trigger) {
                    Ok(_) => return,
                    Err(why) => {
                        tracing::error!(monitor = %self.config.name, "automatic rollback failed: {why}")
                    }
                }
            }
        }
        if failures >= u64::from(self.config.max_failures) {
            self.stats.quarantined.store(true, Ordering::Relaxed);
            tracing::error!(monitor = %self.config.name, failures, "monitor quarantined; resume it with POST /v1/monitors/{}/resume", self.config.name);
            let signal = NewSignal {
                monitor: self.config.name.clone(),
                model_version: model.to_string(),
                kind: "quarantined".into(),
                reason: format!("quarantined after {failures} consecutive failures; last: {e}"),
                score: 0.0,
                timestamp: super::store::now_ms(),
                strategy: self.info.name.clone(),
                strategy_version: self.info.version.clone(),
                strategy_sha256: self.meta.sha256.clone(),
                fuel: self.instance.last_fuel(),
                snapshot: serde_json::Value::Null,
                shadow: self.config.shadow,
            };
            self.record(&signal);
            return;
        }
        let exp = u32::try_from(failures - 1).unwrap_or(u32::MAX).min(16);
        let delay = self
            .config
            .restart_backoff
            .saturating_mul(1 << exp)
            .min(Duration::from_secs(30));
        let until = Instant::now() + delay;
        while !self.stopping.load(Ordering::Relaxed) {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
        self.restart();
    }

    fn observe_call(&self, took: Duration) {
        let s = &self.stats;
        let c = self.instance.counters();
        s.log_lines_dropped.fetch_add(
            c.log_lines_dropped.swap(0, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        s.output_bytes_dropped.fetch_add(
            c.output_bytes_dropped.swap(0, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        s.calls.fetch_add(1, Ordering::Relaxed);
        s.call_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
        s.fuel
            .fetch_add(self.instance.last_fuel(), Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        s.call_buckets[bucket].fetch_add(1, Ordering::Relaxed);
    }

    fn signal(&self, model: &str, kind: &str, reason: String, obs: &Observation) -> NewSignal {
        NewSignal {
            monitor: self.config.name.clone(),
            model_version: model.to_string(),
            kind: kind.to_string(),
            reason,
            score: obs.snapshot.score,
            timestamp: obs.snapshot.timestamp_ms(),
            strategy: self.info.name.clone(),
            strategy_version: self.info.version.clone(),
            strategy_sha256: self.meta.sha256.clone(),
            fuel: self.instance.last_fuel(),
            snapshot: serde_json::to_value(obs).unwrap_or(serde_json::Value::Null),
            shadow: self.config.shadow,
        }
    }

    fn record(&self, signal: &NewSignal) {
        let kinds: Vec<&str> = self.config.actions.iter().map(|a| a.kind()).collect();
        match self.outbox.store.record_signal(signal, &kinds) {
            Ok(id) => {
                self.stats.signals.fetch_add(1, Ordering::Relaxed);
                tracing::info!(monitor = %signal.monitor, model = %signal.model_version, kind = %signal.kind, id, "signal recorded: {}", signal.reason);
                self.outbox.wake.notify_one();
            }
            Err(e) => {
                tracing::error!(monitor = %signal.monitor, "cannot record a signal: {e}");
                *self.stats.last_error.lock() = Some(e.to_string());
            }
        }
    }

    fn check_stale(
        &self,
        after: Duration,
        last_seen: &HashMap<String, Instant>,
        stale: &mut HashSet<String>,
    ) {
        for (model, seen) in last_seen {
            let silent = seen.elapsed();
            if silent > after && !stale.contains(model) {
                stale.insert(model.clone());
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                self.stats.stale_models.fetch_add(1, Ordering::Relaxed);
                let signal = NewSignal {
                    monitor: self.config.name.clone(),
                    model_version: model.clone(),
                    kind: "stale".into(),
                    reason: format!(
                        "no snapshot of `{model}` for {} (stale_after {})",
                        humantime::format_duration(
                            Duration::from_millis(silent.as_millis() as u64)
                        ),
                        humantime::format_duration(after)
                    ),
                    score: 0.0,
                    timestamp: super::store::now_ms(),
                    strategy: self.info.name.clone(),
                    strategy_version: self.info.version.clone(),
                    strategy_sha256: self.meta.sha256.clone(),
                    fuel: 0,
                    snapshot: serde_json::Value::Null,
                    shadow: self.config.shadow,
                };
                self.record(&signal);
            }
        }
    }

    fn checkpoint(&mut self) {
        if self.instance.is_poisoned() {
            return;
        }
        let models: Vec<String> = self.instance.models().map(str::to_string).collect();
        let mut states = Vec::with_capacity(models.len());
        for model in models {
            match self.instance.save(&model) {
                Ok(Some(bytes)) => states.push((model, bytes)),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(monitor = %self.config.name, "checkpoint failed: {e}");
                    return;
                }
            }
        }
        if let Err(e) = self
            .outbox
            .store
            .save_states(&self.config.name, &self.meta.sha256, &states)
        {
            tracing::error!(monitor = %self.config.name, "checkpoint failed: {e}");
        }
    }

    /// Keeps the newest batches, about `RECENT_POINTS` snapshots, for dry
    /// runs (the `Arc`s, not copies).
    fn remember(&mut self, batch: Arc<Vec<Observation>>) {
        self.recent_points += batch.len();
        self.recent.push_back(batch);
        while self.recent.len() > 1 && self.recent_points - self.recent[0].len() >= RECENT_POINTS {
            let old = self.recent.pop_front().expect("non-empty");
            self.recent_points -= old.len();
        }
    }

    /// Validates `component` (instantiate, configure, self-describe, a dry
    /// run over the recent snapshots when `dry_run`), moves the detector
    /// state across where the candidate accepts it, and serves it from the
    /// next batch on. The running strategy keeps serving when it is refused.
    fn swap(
        &mut self,
        component: StrategyComponent,
        config: Option<String>,
        trigger: &str,
        dry_run: bool,
    ) -> Result<SwapReport, String> {
        let json = config.unwrap_or_else(|| self.json.clone());
        let old = strategy_status(&self.info, &self.meta);
        let candidate_status = |info: Option<&StrategyInfo>| StrategyStatus {
            source: component.meta().label.clone(),
            name: info.map(|i| i.name.clone()).unwrap_or_default(),
            version: info.map(|i| i.version.clone()).unwrap_or_default(),
            sha256: component.meta().sha256.clone(),
        };
        let fallback = if trigger.starts_with("rollback") {
            std::mem::take(&mut self.previous_states)
        } else {
            Vec::new()
        };
        let result = self.validate_and_migrate(&component, &json, dry_run, &fallback);
        let (mut instance, detail, old_states) = match result {
            Ok(ok) => ok,
            Err(reason) => {
                self.previous_states = fallback;
                self.stats.swaps_refused.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(monitor = %self.config.name, trigger, "strategy swap refused: {reason}");
                self.record_swap(trigger, "refused", &old, &candidate_status(None), &reason);
                return Err(reason);
            }
        };
        let new = candidate_status(Some(instance.info()));
        let info = instance.info().clone();
        std::mem::swap(&mut self.instance, &mut instance);
        let old_component = std::mem::replace(&mut self.component, component);
        let old_json = std::mem::replace(&mut self.json, json);
        let old_info = std::mem::replace(&mut self.info, info);
        let old_meta = std::mem::replace(&mut self.meta, self.component.meta().clone());
        if self.json != old_json {
            // The stored states describe the old configuration.
            if let Err(e) = self.outbox.store.clear_states(&self.config.name) {
                tracing::error!(monitor = %self.config.name, "cannot forget the old detector state: {e}");
            }
        }
        self.previous = Some((old_component, old_json));
        self.previous_states = old_states;
        let probation = self.config.probation;
        self.probation = (!probation.is_zero()).then(|| (Instant::now() + probation, 0));
        // A swap also ends a quarantine: the new version starts clean.
        self.stats.consecutive_failures.store(0, Ordering::Relaxed);
        if self.stats.quarantined.swap(false, Ordering::Relaxed) {
            tracing::warn!(monitor = %self.config.name, "monitor leaves quarantine with the new strategy");
        }
        {
            let mut serving = self.serving.lock();
            serving.info = self.info.clone();
            serving.meta = self.meta.clone();
            serving.previous = Some((old_info, old_meta));
            serving.last_swap = Some(format!("{trigger}: {detail}"));
            serving.probation_until_ms = self.probation.map(|_| {
                super::store::now_ms() + i64::try_from(probation.as_millis()).unwrap_or(i64::MAX)
            });
        }
        self.checkpoint();
        tracing::warn!(monitor = %self.config.name, trigger, old = %old.sha256, new = %new.sha256, "strategy swapped: {detail}");
        self.record_swap(
            trigger,
            if trigger.starts_with("rollback") {
                "rolled_back"
            } else {
                "swapped"
            },
            &old,
            &new,
            &detail,
        );
        Ok(SwapReport { old, new, detail })
    }

    fn validate_and_migrate(
        &mut self,
        component: &StrategyComponent,
        json: &str,
        dry_run: bool,
        fallback: &[(String, Vec<u8>)],
    ) -> Result<(StrategyInstance, String, States), String> {
        let limits = self.config.limits.limits();
        let mut candidate = component
            .instantiate(json, limits.clone())
            .map_err(|e| format!("candidate refused: {e}"))?;
        if dry_run && self.recent_points > 0 {
            let mut dry = component
                .instantiate(json, limits)
                .map_err(|e| format!("candidate refused: {e}"))?;
            let mut points = PointBatch::new();
            let mut n = 0;
            for batch in &self.recent {
                let mut models: Vec<&str> = Vec::new();
                for o in batch.iter() {
                    let m = o.snapshot.model_version.as_str();
                    if !models.contains(&m) && self.config.selects(m) {
                        models.push(m);
                    }
                }
                for model in models {
                    points.clear();
                    for o in batch.iter().filter(|o| o.snapshot.model_version == model) {
                        points.push(o);
                    }
                    n += points.len();
                    dry.evaluate(model, &points).map_err(|e| {
                        format!("candidate refused: dry run on {n} recent snapshot(s) failed: {e}")
                    })?;
                }
            }
        }
        // Detector state: from the running instance, else (it failed) from
        // the last checkpoint.
        let mut states: Vec<(String, Vec<u8>)> = Vec::new();
        if self.instance.is_poisoned() {
            states = self
                .outbox
                .store
                .load_states(&self.config.name)
                .map_or_else(
                    |_| Vec::new(),
                    |v| v.into_iter().map(|(m, _, b)| (m, b)).collect(),
                );
        } else {
            let models: Vec<String> = self.instance.models().map(str::to_string).collect();
            for model in models {
                if let Ok(Some(bytes)) = self.instance.save(&model) {
                    states.push((model, bytes));
                }
            }
        }
        if json != self.json {
            // Saved state embeds the configuration it was made with.
            let n = states.len();
            return Ok((
                candidate,
                format!("new configuration: detectors start fresh ({n} model(s) had state)"),
                states,
            ));
        }
        let (mut moved, mut fresh) = (0, Vec::new());
        for (model, bytes) in &states {
            match candidate.restore(model, bytes) {
                Ok(Ok(())) => moved += 1,
                Ok(Err(why)) => fresh.push((model.clone(), why)),
                Err(e) => {
                    return Err(format!(
                        "candidate refused: restoring the state of `{model}` failed: {e}"
                    ));
                }
            }
        }
        // A rollback: the version rolled back to had these states when it
        // was swapped out; they fit it where the newer version's do not.
        let mut fallback_used = 0;
        for (model, bytes) in fallback {
            let missing =
                !states.iter().any(|(m, _)| m == model) || fresh.iter().any(|(m, _)| m == model);
            if missing && let Ok(Ok(())) = candidate.restore(model, bytes) {
                fresh.retain(|(m, _)| m != model);
                fallback_used += 1;
            }
        }
        let fresh: Vec<String> = fresh
            .into_iter()
            .map(|(m, why)| format!("{m} ({why})"))
            .collect();
        let moved = moved + fallback_used;
        let detail = match (moved, fresh.len()) {
            (0, 0) => "no detector state to move".to_string(),
            (m, 0) => format!("detector state moved for {m} model(s)"),
            (0, _) => format!("started fresh for {}", fresh.join(", ")),
            (m, _) => format!(
                "detector state moved for {m} model(s); started fresh for {}",
                fresh.join(", ")
            ),
        };
        Ok((candidate, detail, states))
    }

    /// Serves the previous version again (validated, without a dry run).
    fn rollback(&mut self, trigger: &str) -> Result<SwapReport, String> {
        let Some((component, json)) = self.previous.clone() else {
            return Err("no previous strategy to roll back to".into());
        };
        self.swap(component, Some(json), trigger, false)
    }

    fn record_swap(
        &self,
        trigger: &str,
        outcome: &str,
        old: &StrategyStatus,
        new: &StrategyStatus,
        detail: &str,
    ) {
        let record = super::store::SwapRecord {
            created: 0,
            monitor: self.config.name.clone(),
            trigger: trigger.to_string(),
            outcome: outcome.to_string(),
            old_sha256: old.sha256.clone(),
            old_version: old.version.clone(),
            new_sha256: new.sha256.clone(),
            new_version: new.version.clone(),
            detail: detail.to_string(),
        };
        if let Err(e) = self.outbox.store.record_swap(&record) {
            tracing::error!(monitor = %self.config.name, "cannot record the swap: {e}");
        }
    }

    fn restart(&mut self) {
        match self
            .component
            .instantiate(&self.json, self.config.limits.limits())
        {
            Ok(mut fresh) => {
                restore_states(&mut fresh, &self.outbox.store, &self.config.name);
                self.instance = fresh;
            }
            Err(e) => {
                tracing::error!(monitor = %self.config.name, "cannot restart the strategy: {e}")
            }
        }
    }
}
