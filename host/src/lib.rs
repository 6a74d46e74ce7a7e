//! VisuTility's host: ingests model-health snapshots, runs each team's retrain
//! strategy (a WebAssembly component behind the `visutility:strategy` WIT
//! interface) in a sandbox, and turns its verdicts into retrain signals.
//!
//! # Concepts
//!
//! * A [`MetricSnapshot`] is one health reading of one model
//!   (`model_version`, `score`, optional `loss`, `timestamp`); an
//!   [`Observation`] adds named extra metrics, as on the wire.
//! * A [`MetricPublisher`] fans snapshots out to synchronous
//!   [`MetricObserver`]s and async receivers.
//! * A [`RetrainStrategy`] consumes the stream and emits [`RetrainSignal`]s:
//!   natively ([`BaselineStrategy`]) or as a sandboxed WebAssembly component
//!   ([`WasmStrategy`]).
//! * A [`MonitoringSupervisor`] runs one strategy on a publisher, de-duplicates
//!   its signals per model (cooldown) and watches the stream for stalls.
//!
//! # Example
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::SystemTime;
//! use visutility_host::{MetricPublisher, MetricSnapshot, MonitoringSupervisor, WasmStrategy, METRIC_CHANNEL_BUFFER};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let publisher = Arc::new(MetricPublisher::new(METRIC_CHANNEL_BUFFER));
//! let strategy = WasmStrategy::load("builtin:baseline", r#"{"baseline": 0.95, "tolerance": 0.05}"#)?;
//! let (supervisor, mut signals) = MonitoringSupervisor::new(publisher.clone(), strategy);
//! let _running = supervisor.spawn();
//! publisher.publish(MetricSnapshot {
//!     model_version: "v1".into(),
//!     score: 0.80,
//!     loss: None,
//!     timestamp: SystemTime::now(),
//! })?;
//! let signal = signals.recv().await.expect("a retrain signal");
//! assert_eq!(signal.degraded_snapshot.score, 0.80);
//! # Ok(()) }
//! ```
//!
//! # Layout
//!
//! * `snapshot`: [`MetricSnapshot`], [`Observation`] and the wire format.
//! * `publisher`: [`MetricPublisher`], [`MetricObserver`], [`DynObserver`]:
//!   fan-out, loss counting and the lossless policy.
//! * `strategy`: [`RetrainStrategy`], [`RetrainSignal`], [`BaselineStrategy`],
//!   [`WasmStrategy`].
//! * `supervisor`: [`MonitoringSupervisor`]: strategy task, cooldown,
//!   watchdog, shutdown.
//! * [`runtime`]: the only module that touches wasmtime: engine, component
//!   cache, sandbox, limits, bindings.
//! * [`service`]: `visutility run`: config, SQLite outbox, monitors,
//!   actions, HTTP API.
//! * [`replay`]: back-testing a strategy on a recorded NDJSON stream.
//! * `observer`: [`ConsoleObserver`].
#![deny(missing_docs)]

mod error;
mod observer;
mod publisher;
pub mod replay;
pub mod runtime;
pub mod service;
mod snapshot;
mod strategy;
mod supervisor;

pub use error::MonitoringError;
pub use observer::ConsoleObserver;
pub use publisher::{DynObserver, MetricObserver, MetricPublisher, OverflowPolicy, PublisherStats};
pub use runtime::{Limits, LoadError, StrategyError, StrategyFault};
pub use snapshot::{
    MetricSnapshot, Observation, ObservationRef, SnapshotError, format_timestamp,
    ms_to_system_time, system_time_to_ms,
};
pub use strategy::{
    BaselineStrategy, DEFAULT_MAX_BATCH, RetrainSignal, RetrainStrategy, VerdictEvent, WasmStrategy,
};
pub use supervisor::{
    DEFAULT_COOLDOWN, MonitoringSupervisor, SIGNAL_CHANNEL_BUFFER, ShutdownHandle, SupervisorStats,
    WATCHDOG_INTERVAL,
};

/// Maximum number of buffered `MetricSnapshot`s per Tokio broadcast channel.
pub const METRIC_CHANNEL_BUFFER: usize = 1_024;

/// Paths of the test guests built by `build.rs`. Not part of the API.
#[doc(hidden)]
pub mod __test_support {
    /// The built component of test guest `name` (a directory of
    /// `tests/guests/`).
    pub fn guest_path(name: &str) -> Option<&'static str> {
        crate::runtime::builtin::TEST_GUESTS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| *p)
    }
}
