//! `MonitoringError`: the error of the seed's publish/subscribe core.

use tokio::sync::broadcast;

use crate::runtime::StrategyError;
use crate::snapshot::MetricSnapshot;

/// Unified error type for the monitoring core.
#[derive(Debug, thiserror::Error)]
pub enum MonitoringError {
    /// Kept from the seed for compatibility; `publish` no longer fails when
    /// nobody listens, so the host itself never returns it.
    #[error("failed to publish metric snapshot: {0}")]
    PublishError(#[from] broadcast::error::SendError<MetricSnapshot>),

    /// An async receiver failed (the publisher was dropped).
    #[error("failed to receive metric snapshot: {0}")]
    RecvError(#[from] broadcast::error::RecvError),

    /// A supervisor task panicked or was cancelled.
    #[error("internal task join error: {0}")]
    JoinError(#[from] tokio::task::JoinError),

    /// Lossless publisher: a receiver's buffer is full; retry or use
    /// `publish_wait`.
    #[error("publisher buffer of {capacity} snapshots is full (lossless mode); retry later")]
    Backpressure {
        /// The per-receiver buffer size.
        capacity: usize,
    },

    /// A WebAssembly strategy failed.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
}
