//! The only module that touches wasmtime: the engine, the compiled-component
//! cache, the linker, the sandbox and the strategy bindings.
//!
//! * [`Runtime`]: one engine (fuel + epoch interruption), one pre-built
//!   linker, an epoch ticker thread and an on-disk cache of compiled
//!   components.
//! * [`StrategyComponent`]: a loaded, checked and pre-linked component;
//!   instantiate it as often as needed.
//! * [`StrategyInstance`]: one sandboxed instance with one detector per model
//!   stream; every call runs under the [`Limits`].

mod bindings;
mod component;
mod instance;
mod sandbox;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use wasmtime::component::Linker;
use wasmtime::{Config, Engine};

pub use component::{ComponentMeta, LoadError, StrategyComponent, StrategySource};
pub use instance::{
    MAX_REASON_BYTES, MAX_STATE_BYTES, PointBatch, StrategyInfo, StrategyInstance, Verdict,
    VerdictKind,
};
pub use sandbox::{LOG_LINES_PER_CALL, LOG_MESSAGE_MAX, OUTPUT_MAX_PER_CALL, SandboxCounters};

use sandbox::HostState;

/// The WIT package version this host speaks (`visutility:strategy@X.Y.Z`).
pub const WIT_VERSION: &str = "0.1.0";

/// Per-call limits of a strategy instance. Every call (`configure`,
/// `evaluate`, `save`, ...) gets the full budget afresh.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Fuel per call (roughly one unit per WebAssembly instruction).
    /// Default 1,000,000,000: about half a second of guest CPU.
    pub fuel: u64,
    /// Wall-clock deadline per call. Default 2 s.
    pub deadline: Duration,
    /// Linear memory cap per instance, in bytes. Default 64 MiB.
    pub memory_bytes: usize,
    /// Table elements cap. Default 100,000.
    pub table_elements: usize,
    /// Instances (core + component) per store. Default 32.
    pub instances: usize,
    /// Seed of the guest's random numbers, so that replays are
    /// deterministic. Default 0.
    pub random_seed: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            fuel: 1_000_000_000,
            deadline: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            table_elements: 100_000,
            instances: 32,
            random_seed: 0,
        }
    }
}

/// How the [`Runtime`] is built.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` disables the cache.
    pub cache_dir: Option<PathBuf>,
    /// Granularity of deadlines. Default 5 ms.
    pub epoch_tick: Duration,
    /// Guest stack limit in bytes. Default 1 MiB.
    pub max_wasm_stack: usize,
    /// Canonicalise the NaNs produced by guest float arithmetic, so that a
    /// strategy that inspects the bits of a NaN it computed sees the same
    /// bits on every CPU architecture. Default off: replays are already
    /// byte-identical run after run on one architecture (WebAssembly float
    /// arithmetic is otherwise deterministic, and clocks and randomness are
    /// virtual), and canonicalisation costs 1.3-1.8x on float-heavy
    /// detectors (BENCHMARKS.md). Turn it on (`--canonicalize-nans`,
    /// `canonicalize_nans = true`) when replays must match bit for bit
    /// across x86-64 and aarch64 hosts.
    pub nan_canonicalization: bool,
    /// Meter fuel, the deterministic CPU bound of [`Limits::fuel`]. Default
    /// on; off leaves only the wall-clock deadline (for measurements).
    pub fuel_metering: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            cache_dir: default_cache_dir(),
            epoch_tick: Duration::from_millis(5),
            max_wasm_stack: 1 << 20,
            nan_canonicalization: false,
            fuel_metering: true,
        }
    }
}

/// `$VISUTILITY_CACHE_DIR`, else `$XDG_CACHE_HOME/visutility`, else
/// `$HOME/.cache/visutility`. `VISUTILITY_CACHE_DIR=off` disables the cache.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("VISUTILITY_CACHE_DIR") {
        if dir == "off" {
            return None;
        }
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("visutility"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("visutility"))
}

static SHARED: OnceLock<Runtime> = OnceLock::new();

/// The wasmtime engine and everything shared by all strategies.
pub struct Runtime {
    engine: Engine,
    linker: Linker<HostState>,
    config: RuntimeConfig,
    ticker_stop: Arc<AtomicBool>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Builds the engine and linker and starts the epoch ticker.
    ///
    /// # Errors
    ///
    /// [`LoadError::Engine`] if wasmtime rejects the configuration.
    pub fn new(config: RuntimeConfig) -> Result<Self, LoadError> {
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            .consume_fuel(config.fuel_metering)
            .epoch_interruption(true)
            .max_wasm_stack(config.max_wasm_stack)
            .cranelift_nan_canonicalization(config.nan_canonicalization)
            .parallel_compilation(true);
        // `VISUTILITY_PERFMAP=1` writes /tmp/perf-<pid>.map so that `perf
        // record` / `perf report` name the guest's functions.
        if std::env::var_os("VISUTILITY_PERFMAP").is_some_and(|v| v == "1") {
            wasm.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&wasm).map_err(|e| LoadError::Engine(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| LoadError::Engine(e.to_string()))?;
        bindings::RetrainStrategy::add_to_linker::<
            HostState,
            wasmtime::component::HasSelf<HostState>,
        >(&mut linker, |s| s)
        .map_err(|e| LoadError::Engine(e.to_string()))?;

        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = ticker_stop.clone();
            let tick = config.epoch_tick;
            std::thread::Builder::new()
                .name("visutility-epoch".into())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| LoadError::Engine(format!("cannot start the epoch ticker: {e}")))?;
        }
        Ok(Runtime {
            engine,
            linker,
            config,
            ticker_stop,
        })
    }

    /// The process-wide runtime: the one [`init_shared`](Self::init_shared)
    /// built, else one with the default configuration.
    ///
    /// # Panics
    ///
    /// If the engine cannot be built (an unsupported CPU).
    pub fn shared() -> &'static Runtime {
        SHARED.get_or_init(|| {
            Runtime::new(RuntimeConfig::default()).expect("cannot build the wasmtime engine")
        })
    }

    /// Builds the process-wide runtime with `config`. Call it before anything
    /// loads a strategy.
    ///
    /// # Errors
    ///
    /// [`LoadError::Engine`] if wasmtime rejects the configuration, or if
    /// the shared runtime already exists with another configuration.
    pub fn init_shared(config: RuntimeConfig) -> Result<&'static Runtime, LoadError> {
        if let Some(existing) = SHARED.get() {
            if existing.config.nan_canonicalization == config.nan_canonicalization
                && existing.config.fuel_metering == config.fuel_metering
            {
                return Ok(existing);
            }
            return Err(LoadError::Engine(
                "the shared runtime was already built with another configuration".into(),
            ));
        }
        let runtime = Runtime::new(config)?;
        Ok(SHARED.get_or_init(|| runtime))
    }

    /// This runtime's configuration.
    pub fn config(&self) -> &RuntimeConfig {
        &self.config
    }

    pub(crate) fn fuel_metering(&self) -> bool {
        self.config.fuel_metering
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub(crate) fn linker(&self) -> &Linker<HostState> {
        &self.linker
    }

    /// Milliseconds per epoch tick.
    pub(crate) fn ticks_for(&self, deadline: Duration) -> u64 {
        let tick = self.config.epoch_tick.as_nanos().max(1);
        (deadline.as_nanos().div_ceil(tick)).max(1) as u64
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Relaxed);
    }
}

/// The strategies compiled into this binary.
pub mod builtin {
    include!(concat!(env!("OUT_DIR"), "/guests.rs"));

    /// The component bytes of `builtin:<name>`.
    pub fn get(name: &str) -> Option<&'static [u8]> {
        BUILTINS.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    /// Names of the bundled strategies.
    pub fn names() -> impl Iterator<Item = &'static str> {
        BUILTINS.iter().map(|(n, _)| *n)
    }
}

/// Why a strategy call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StrategyFault {
    /// The call used its whole fuel budget.
    #[error("out of fuel (budget {budget} per call)")]
    OutOfFuel {
        /// The per-call budget.
        budget: u64,
    },
    /// The call ran past its wall-clock deadline.
    #[error("deadline of {deadline:?} exceeded")]
    Deadline {
        /// The per-call deadline.
        deadline: Duration,
    },
    /// The guest tried to grow memory or a table beyond its cap.
    #[error("{resource} cap exceeded (memory cap {limit_bytes} bytes)")]
    MemoryCap {
        /// `memory` or `table`.
        resource: &'static str,
        /// The memory cap.
        limit_bytes: usize,
    },
    /// The guest's stack overflowed.
    #[error("stack overflow")]
    StackOverflow,
    /// Any other trap (panic, `unreachable`, out-of-bounds access...).
    #[error("trap: {0}")]
    Trap(String),
    /// The strategy returned something the contract forbids (e.g. a verdict
    /// index outside the batch).
    #[error("contract violation: {0}")]
    Contract(String),
    /// The instance failed before and was discarded.
    #[error("instance is unusable after an earlier failure")]
    Poisoned,
}

impl StrategyFault {
    /// A stable snake_case name of the fault kind, for metrics and records.
    pub fn kind(&self) -> &'static str {
        match self {
            StrategyFault::OutOfFuel { .. } => "out_of_fuel",
            StrategyFault::Deadline { .. } => "deadline",
            StrategyFault::MemoryCap { .. } => "memory_cap",
            StrategyFault::StackOverflow => "stack_overflow",
            StrategyFault::Trap(_) => "trap",
            StrategyFault::Contract(_) => "contract",
            StrategyFault::Poisoned => "poisoned",
        }
    }
}

/// A failed strategy call, naming the strategy and the call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("strategy `{strategy}` failed in `{call}`: {fault}")]
pub struct StrategyError {
    /// The strategy's label (`builtin:NAME` or its path).
    pub strategy: String,
    /// The exported function that failed.
    pub call: &'static str,
    /// What went wrong.
    pub fault: StrategyFault,
}
