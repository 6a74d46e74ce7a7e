//! Built-in observers.

use crate::publisher::MetricObserver;
use crate::snapshot::{MetricSnapshot, format_timestamp};

/// Console-based observer useful for local debugging and smoke tests.
///
/// Prints `[<RFC 3339 time>] Model=<model> Score=<score> Loss=<loss>` per
/// snapshot, as the seed does.
#[derive(Debug, Clone, Copy, Default)]
pub struct ConsoleObserver;

impl ConsoleObserver {
    /// The line printed for `metric`.
    pub fn format(metric: &MetricSnapshot) -> String {
        format!(
            "[{}] Model={} Score={:.4} Loss={:?}",
            format_timestamp(metric.timestamp),
            metric.model_version,
            metric.score,
            metric.loss
        )
    }
}

impl MetricObserver for ConsoleObserver {
    fn on_metric(&self, metric: &MetricSnapshot) {
        println!("{}", Self::format(metric));
    }
}
