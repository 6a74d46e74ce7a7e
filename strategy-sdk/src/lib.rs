//! Write a VisuTility retrain strategy in ~30 lines.
//!
//! A strategy decides, point by point, whether a deployed model needs
//! retraining. You write a [`Detector`] for **one** model stream; the SDK does
//! the rest: the WIT glue, one detector per `model_version`, columnar batches,
//! and saving/restoring state so that a restart or a hot swap keeps your
//! window.
//!
//! # A complete strategy
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "drop-detector"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! visutility-strategy = { path = "../strategy-sdk" }
//! serde = { version = "1", features = ["derive"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use visutility_strategy::{export_strategy, Detector, Point, Verdict};
//!
//! /// Configuration, parsed from the monitor's JSON config.
//! #[derive(Deserialize)]
//! #[serde(deny_unknown_fields)]
//! pub struct Config {
//!     /// Retrain when the score falls below this.
//!     pub floor: f64,
//! }
//!
//! /// State of one model stream; saved and restored as JSON.
//! #[derive(Serialize, Deserialize)]
//! pub struct Floor {
//!     floor: f64,
//!     seen: u64,
//! }
//!
//! impl Detector for Floor {
//!     type Config = Config;
//!     const NAME: &'static str = "floor";
//!     const DESCRIPTION: &'static str = "retrain when the score falls below a fixed floor";
//!
//!     fn new(config: &Config, _model: &str) -> Self {
//!         Floor { floor: config.floor, seen: 0 }
//!     }
//!
//!     fn update(&mut self, point: &Point<'_>) -> Verdict {
//!         self.seen += 1;
//!         if point.score < self.floor {
//!             Verdict::retrain(format!("score {:.4} < floor {:.4}", point.score, self.floor))
//!         } else {
//!             Verdict::Healthy
//!         }
//!     }
//! }
//!
//! export_strategy!(Floor);
//! # fn main() {
//! #     let cfg = Config { floor: 0.5 };
//! #     let mut d = Floor::new(&cfg, "m");
//! #     let p = Point::new(0, 0.4, None, 0);
//! #     assert!(matches!(d.update(&p), Verdict::Retrain(_)));
//! # }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and run it
//! with `visutility replay --strategy target/wasm32-wasip2/release/drop_detector.wasm ...`.
//!
//! # What the host guarantees
//!
//! * `configure` is called once per instance, before any detector exists.
//! * Points of one model arrive in order, in batches, to one detector.
//! * Scores are finite; the SDK still refuses non-finite ones (a `warn`
//!   verdict, the detector is not updated) so that a detector never sees NaN.
//!
//! Off `wasm32`, [`export_strategy!`] expands to nothing, so the same crate
//! can be used natively (benchmarks, unit tests).
#![deny(missing_docs)]

use serde::Serialize;
use serde::de::DeserializeOwned;

/// One point of a model stream, as seen by a [`Detector`].
#[derive(Debug, Clone, Copy)]
pub struct Point<'a> {
    /// 0-based position of the point in its batch.
    pub index: usize,
    /// The primary KPI (accuracy, AUC, ...). Always finite.
    pub score: f64,
    /// The loss, if the snapshot carried one.
    pub loss: Option<f64>,
    /// Source timestamp in milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    metrics: Metrics<'a>,
}

#[derive(Debug, Clone, Copy)]
enum Metrics<'a> {
    None,
    Columns(&'a [(String, Vec<f64>)]),
}

impl<'a> Point<'a> {
    /// A point without named metrics (for tests and native use).
    pub fn new(index: usize, score: f64, loss: Option<f64>, timestamp_ms: i64) -> Self {
        Point {
            index,
            score,
            loss,
            timestamp_ms,
            metrics: Metrics::None,
        }
    }

    /// The watched value of this point, if it has one (finite).
    #[inline]
    pub fn value(&self, watch: &Watch) -> Option<f64> {
        let v = match watch {
            Watch::Score => Some(self.score),
            Watch::Loss => self.loss,
            Watch::Metric(name) => self.metric(name),
        };
        v.filter(|v| v.is_finite())
    }

    /// The named metric `name` of this point, if the snapshot carried it.
    #[inline]
    pub fn metric(&self, name: &str) -> Option<f64> {
        match self.metrics {
            Metrics::None => None,
            // Out of line and by value, so that the point itself never has
            // to live in memory on the per-point path.
            Metrics::Columns(cols) => metric_at(cols, self.index, name),
        }
    }
}

#[inline(never)]
fn metric_at(cols: &[(String, Vec<f64>)], index: usize, name: &str) -> Option<f64> {
    cols.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| v.get(index).copied())
        .filter(|v| !v.is_nan())
}

/// What a detector says about one point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to report. Healthy points do not cross back to the host.
    Healthy,
    /// Worth a look; recorded, but no retraining is triggered.
    Warn(String),
    /// The model should be retrained.
    Retrain(String),
}

impl Verdict {
    /// A `warn` verdict with a human-readable reason.
    pub fn warn(reason: impl Into<String>) -> Self {
        Verdict::Warn(reason.into())
    }

    /// A `retrain` verdict with a human-readable reason.
    pub fn retrain(reason: impl Into<String>) -> Self {
        Verdict::Retrain(reason.into())
    }
}

/// A change detector for one model stream.
///
/// The detector's whole state is `Self`: it is saved with `serde` (in a compact
/// binary encoding that keeps every `f64` bit-exact, infinities included) and
/// restored on restart or hot swap, so keep everything the detector needs to
/// continue in its fields. A state saved by a version of the strategy whose
/// fields differ is refused, and the host starts that stream afresh.
pub trait Detector: Serialize + DeserializeOwned + 'static {
    /// The configuration, parsed from the monitor's JSON config. Use
    /// `#[serde(deny_unknown_fields)]` so that typos are refused.
    type Config: DeserializeOwned + 'static;

    /// Short machine-friendly name, e.g. `baseline`.
    const NAME: &'static str;

    /// One line saying what the strategy detects.
    const DESCRIPTION: &'static str;

    /// JSON Schema of [`Self::Config`], shown by `visutility inspect`.
    fn config_schema() -> Option<String> {
        None
    }

    /// Checks a parsed configuration. The error is shown to the user as is:
    /// name the field and what is wrong with it.
    fn validate(config: &Self::Config) -> Result<(), String> {
        let _ = config;
        Ok(())
    }

    /// A fresh detector for the stream of model `model`.
    fn new(config: &Self::Config, model: &str) -> Self;

    /// Feeds the next point of the stream and says whether it is healthy.
    fn update(&mut self, point: &Point<'_>) -> Verdict;
}

/// Parses and validates a JSON configuration the way the host's `configure`
/// call does. An empty string means `{}`.
///
/// # Errors
///
/// A message naming the problem and, for JSON errors, its line and column.
pub fn parse_config<D: Detector>(config: &str) -> Result<D::Config, String> {
    let text = if config.trim().is_empty() {
        "{}"
    } else {
        config
    };
    let parsed: D::Config = serde_json::from_str(text)
        .map_err(|e| format!("invalid config for strategy `{}`: {e}", D::NAME))?;
    D::validate(&parsed).map_err(|e| format!("invalid config for strategy `{}`: {e}", D::NAME))?;
    Ok(parsed)
}

/// Magic prefix of saved states: format version 1.
const STATE_MAGIC: &[u8; 4] = b"VUS1";

/// Serialises a detector's state the way the host's `save` call does.
pub fn save_state<D: Detector>(detector: &D) -> Vec<u8> {
    let mut out = STATE_MAGIC.to_vec();
    // Serialising plain data into a Vec cannot fail.
    out.extend(postcard::to_allocvec(detector).unwrap_or_default());
    out
}

/// Rebuilds a detector from [`save_state`]'s bytes.
///
/// # Errors
///
/// A message saying why the bytes are not a state of this strategy.
pub fn restore_state<D: Detector>(state: &[u8]) -> Result<D, String> {
    let body = state.strip_prefix(STATE_MAGIC.as_slice()).ok_or_else(|| {
        format!(
            "saved state does not fit strategy `{}`: not a VisuTility state (bad header)",
            D::NAME
        )
    })?;
    postcard::from_bytes(body).map_err(|e| {
        format!(
            "saved state does not fit strategy `{}`: saved by another strategy or an incompatible version ({e})",
            D::NAME
        )
    })
}

/// Which value of a point a detector watches: `"score"` (the default),
/// `"loss"`, or `"metrics.<name>"` for a named metric.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Watch {
    /// The primary KPI.
    #[default]
    Score,
    /// The loss.
    Loss,
    /// A named entry of `metrics`.
    Metric(String),
}

impl TryFrom<String> for Watch {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "score" => Ok(Watch::Score),
            "loss" => Ok(Watch::Loss),
            other => match other.strip_prefix("metrics.") {
                Some(name) if !name.is_empty() => Ok(Watch::Metric(name.to_string())),
                _ => Err(format!(
                    "`watch` must be \"score\", \"loss\" or \"metrics.<name>\", got {other:?}"
                )),
            },
        }
    }
}

impl From<Watch> for String {
    fn from(w: Watch) -> String {
        match w {
            Watch::Score => "score".into(),
            Watch::Loss => "loss".into(),
            Watch::Metric(name) => format!("metrics.{name}"),
        }
    }
}

impl std::fmt::Display for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(self.clone()))
    }
}

/// Which direction of change a detector reports: `"up"`, `"down"` or
/// `"both"` (the default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Increases only.
    Up,
    /// Decreases only.
    Down,
    /// Both.
    #[default]
    Both,
}

impl Direction {
    /// Whether increases are reported.
    #[inline]
    pub fn up(self) -> bool {
        self != Direction::Down
    }

    /// Whether decreases are reported.
    #[inline]
    pub fn down(self) -> bool {
        self != Direction::Up
    }
}

/// Runs `detector` over columns the way the WASM glue does, calling `emit`
/// with the index, `true` for retrain / `false` for warn, and the reason of
/// every non-healthy point. Public so that native benchmarks measure exactly
/// the guest's loop.
pub fn evaluate_columns<D: Detector>(
    detector: &mut D,
    scores: &[f64],
    losses: &[f64],
    timestamps: &[i64],
    metrics: &[(String, Vec<f64>)],
    mut emit: impl FnMut(usize, bool, String),
) {
    let has_loss = losses.len() == scores.len();
    let metrics = if metrics.is_empty() {
        Metrics::None
    } else {
        Metrics::Columns(metrics)
    };
    for (index, &score) in scores.iter().enumerate() {
        if !score.is_finite() {
            emit(
                index,
                false,
                format!("non-finite score {score} refused; detector not updated"),
            );
            continue;
        }
        let loss = if has_loss {
            Some(losses[index]).filter(|l| !l.is_nan())
        } else {
            None
        };
        let point = Point {
            index,
            score,
            loss,
            timestamp_ms: timestamps.get(index).copied().unwrap_or(0),
            metrics,
        };
        match detector.update(&point) {
            Verdict::Healthy => {}
            Verdict::Warn(reason) => emit(index, false, reason),
            Verdict::Retrain(reason) => emit(index, true, reason),
        }
    }
}

/// Small building blocks for detectors.
pub mod stats {
    use serde::{Deserialize, Serialize};

    /// Running mean and variance (Welford), exact enough for warm-ups.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
    pub struct Welford {
        n: u64,
        mean: f64,
        m2: f64,
    }

    impl Welford {
        /// Adds one value.
        #[inline]
        pub fn push(&mut self, x: f64) {
            self.n += 1;
            let d = x - self.mean;
            self.mean += d / self.n as f64;
            self.m2 += d * (x - self.mean);
        }

        /// Values seen.
        #[inline]
        pub fn count(&self) -> u64 {
            self.n
        }

        /// The mean (0 before any value).
        #[inline]
        pub fn mean(&self) -> f64 {
            self.mean
        }

        /// The sample standard deviation (n - 1), 0 with fewer than 2 values.
        #[inline]
        pub fn std(&self) -> f64 {
            if self.n < 2 {
                0.0
            } else {
                (self.m2 / (self.n - 1) as f64).sqrt()
            }
        }
    }

    /// Checks a target/sigma/warm-up triple as [`Reference`] uses it.
    ///
    /// # Errors
    ///
    /// A message naming the field.
    pub fn check_reference(
        target: Option<f64>,
        sigma: Option<f64>,
        warmup: u32,
    ) -> Result<(), String> {
        if target.is_some_and(|t| !t.is_finite()) {
            return Err("`target` must be a finite number".into());
        }
        if sigma.is_some_and(|s| !(s.is_finite() && s > 0.0)) {
            return Err("`sigma` must be a finite number > 0".into());
        }
        if (target.is_none() || sigma.is_none()) && warmup < 2 {
            return Err("`warmup` must be at least 2 to learn the target and sigma".into());
        }
        Ok(())
    }

    /// A target mean and standard deviation, given in the config or learnt
    /// from the first `warmup` values.
    #[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
    pub struct Reference {
        target: Option<f64>,
        sigma: Option<f64>,
        warmup: u32,
        min_sigma: f64,
        seen: Welford,
    }

    impl Reference {
        /// `target`/`sigma` fixed when given; the missing ones are learnt from
        /// the first `warmup` values; `sigma` is never below `min_sigma`.
        pub fn new(target: Option<f64>, sigma: Option<f64>, warmup: u32, min_sigma: f64) -> Self {
            Reference {
                target,
                sigma,
                warmup,
                min_sigma,
                seen: Welford::default(),
            }
        }

        /// Feeds a value; returns `Some((mean, sigma))` once both are known
        /// (the value that completes the warm-up is not evaluated).
        #[inline]
        pub fn observe(&mut self, x: f64) -> Option<(f64, f64)> {
            if let (Some(t), Some(s)) = (self.target, self.sigma) {
                return Some((t, s.max(self.min_sigma)));
            }
            self.seen.push(x);
            if self.seen.count() >= u64::from(self.warmup) {
                self.target.get_or_insert(self.seen.mean());
                self.sigma
                    .get_or_insert(self.seen.std().max(self.min_sigma));
            }
            None
        }

        /// The learnt or given reference, once known.
        #[inline]
        pub fn get(&self) -> Option<(f64, f64)> {
            Some((self.target?, self.sigma?.max(self.min_sigma)))
        }
    }
}

/// Writes to the host's log (tagged with the monitor and strategy). Off
/// `wasm32` it writes to stderr.
pub mod log {
    /// Severity of a log message.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Level {
        /// Very verbose diagnostics.
        Trace,
        /// Diagnostics.
        Debug,
        /// Normal operation.
        Info,
        /// Something unexpected that was handled.
        Warn,
        /// Something that could not be handled.
        Error,
    }

    /// Logs `message` at `level`.
    pub fn log(level: Level, message: &str) {
        #[cfg(target_arch = "wasm32")]
        {
            use crate::wit::visutility::strategy::types::Level as L;
            let l = match level {
                Level::Trace => L::Trace,
                Level::Debug => L::Debug,
                Level::Info => L::Info,
                Level::Warn => L::Warn,
                Level::Error => L::Error,
            };
            crate::wit::visutility::strategy::host::log(l, message);
        }
        #[cfg(not(target_arch = "wasm32"))]
        eprintln!("[{level:?}] {message}");
    }

    /// Logs at info level.
    pub fn info(message: &str) {
        log(Level::Info, message)
    }

    /// Logs at warn level.
    pub fn warn(message: &str) {
        log(Level::Warn, message)
    }

    /// Logs at debug level.
    pub fn debug(message: &str) {
        log(Level::Debug, message)
    }
}

/// The generated WIT bindings. Not part of the SDK's API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
#[allow(missing_docs)]
pub mod wit {
    wit_bindgen::generate!({
        world: "retrain-strategy",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_retrain_strategy",
        default_bindings_module: "visutility_strategy::wit",
    });
}

/// Glue used by [`export_strategy!`]. Not part of the SDK's API.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __private {
    use std::any::Any;
    use std::cell::RefCell;
    use std::rc::Rc;

    use crate::Detector;
    use crate::wit::exports::visutility::strategy::strategy::{self as exp, GuestDetector};
    use crate::wit::visutility::strategy::types::{Batch, Info, Severity, Verdict as WitVerdict};

    pub use crate::wit::exports::visutility::strategy::strategy::Guest;

    thread_local! {
        static CONFIG: RefCell<Option<Rc<dyn Any>>> = const { RefCell::new(None) };
    }

    fn config<D: Detector>() -> Result<Rc<D::Config>, String> {
        let any = CONFIG.with(|c| c.borrow().clone());
        match any {
            Some(any) => any
                .downcast::<D::Config>()
                .map_err(|_| "internal: configuration has the wrong type".to_string()),
            None => {
                // The host always configures first; a bare instance uses `{}`.
                let parsed = Rc::new(crate::parse_config::<D>("{}")?);
                CONFIG.with(|c| *c.borrow_mut() = Some(parsed.clone() as Rc<dyn Any>));
                Ok(parsed)
            }
        }
    }

    pub fn describe<D: Detector>(version: &str) -> Info {
        Info {
            name: D::NAME.to_string(),
            version: version.to_string(),
            description: D::DESCRIPTION.to_string(),
            config_schema: D::config_schema(),
        }
    }

    pub fn configure<D: Detector>(config: String) -> Result<(), String> {
        let parsed = crate::parse_config::<D>(&config)?;
        CONFIG.with(|c| *c.borrow_mut() = Some(Rc::new(parsed) as Rc<dyn Any>));
        Ok(())
    }

    /// One model stream's detector behind the WIT resource.
    #[allow(missing_debug_implementations)]
    pub struct Stream<D: Detector> {
        inner: RefCell<D>,
    }

    impl<D: Detector> GuestDetector for Stream<D> {
        fn new(model: String) -> Self {
            // `configure` validated the config; `{}` failing here means the
            // strategy requires configuration the host did not give.
            let cfg = config::<D>().unwrap_or_else(|e| panic!("{e}"));
            Stream {
                inner: RefCell::new(D::new(&cfg, &model)),
            }
        }

        fn evaluate(&self, points: Batch) -> Vec<WitVerdict> {
            let mut detector = self.inner.borrow_mut();
            let metrics: Vec<(String, Vec<f64>)> = points
                .metrics
                .into_iter()
                .map(|c| (c.name, c.values))
                .collect();
            let mut out = Vec::new();
            crate::evaluate_columns(
                &mut *detector,
                &points.scores,
                &points.losses,
                &points.timestamps,
                &metrics,
                |index, retrain, reason| {
                    out.push(WitVerdict {
                        index: index as u32,
                        severity: if retrain {
                            Severity::Retrain
                        } else {
                            Severity::Warn
                        },
                        reason,
                    })
                },
            );
            out
        }

        fn save(&self) -> Vec<u8> {
            crate::save_state(&*self.inner.borrow())
        }

        fn restore(_model: String, state: Vec<u8>) -> Result<exp::Detector, String> {
            let d: D = crate::restore_state(&state)?;
            Ok(exp::Detector::new(Stream {
                inner: RefCell::new(d),
            }))
        }
    }
}

/// Exports a [`Detector`] as the strategy of this component.
///
/// Use it once per crate, at the top level: `export_strategy!(MyDetector);`.
/// The strategy's version is the crate's `CARGO_PKG_VERSION`. Off `wasm32`
/// this expands to nothing.
#[macro_export]
macro_rules! export_strategy {
    ($detector:ty) => {
        #[cfg(target_arch = "wasm32")]
        #[doc(hidden)]
        pub mod __visutility_export {
            use super::*;
            pub struct Component;
            impl $crate::__private::Guest for Component {
                type Detector = $crate::__private::Stream<$detector>;
                fn describe() -> $crate::wit::visutility::strategy::types::Info {
                    $crate::__private::describe::<$detector>(env!("CARGO_PKG_VERSION"))
                }
                fn configure(config: ::std::string::String) -> ::std::result::Result<(), ::std::string::String> {
                    $crate::__private::configure::<$detector>(config)
                }
            }
            $crate::wit::__export_retrain_strategy!(Component with_types_in $crate::wit);
        }
    };
}
