//! Back-testing: run a strategy over a recorded NDJSON stream and report
//! where it fired.
//!
//! Input: one snapshot per line in the wire format (blank lines are
//! skipped). The whole input is validated before anything is evaluated, so a
//! malformed line never leaves a partial result that looks complete.
//!
//! Output: one [`ReplaySignal`] per non-healthy verdict, in input order.

use std::collections::HashMap;
use std::io::BufRead;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::runtime::{PointBatch, StrategyError, StrategyInstance, VerdictKind};
use crate::snapshot::Observation;

/// Snapshots evaluated per chunk; each chunk is split into one batch per
/// model.
pub const REPLAY_CHUNK: usize = 1024;

/// One non-healthy verdict of a replay, with exactly the keys of the replay
/// output format.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplaySignal {
    /// 0-based position of the snapshot among the input's snapshots.
    pub index: u64,
    /// The snapshot's model.
    pub model_version: String,
    /// `retrain` or `warn`.
    pub kind: VerdictKind,
    /// The strategy's reason.
    pub reason: String,
    /// The snapshot's score.
    pub score: f64,
    /// The snapshot's timestamp, in ms since the Unix epoch.
    pub timestamp: i64,
}

/// Totals of a replay.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplaySummary {
    /// Snapshots evaluated.
    pub points: u64,
    /// Distinct models.
    pub models: usize,
    /// `retrain` verdicts.
    pub retrain: u64,
    /// `warn` verdicts.
    pub warn: u64,
    /// Time spent evaluating (excluding parsing).
    pub elapsed: Duration,
}

/// Why a replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A malformed input line.
    #[error("line {line}: {message}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// Reading the input or writing the output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The strategy failed.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
}

/// Reads and validates every snapshot of `input`. Snapshots without a
/// timestamp get the time of reading.
///
/// # Errors
///
/// [`ReplayError::Line`] for the first malformed line, naming its number.
pub fn read_observations(input: impl BufRead) -> Result<Vec<Observation>, ReplayError> {
    let received = SystemTime::now();
    let mut out = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| ReplayError::Line { line: i + 1, message: e.to_string() })?;
        if line.trim().is_empty() {
            continue;
        }
        let obs = Observation::from_json(&line, received)
            .map_err(|e| ReplayError::Line { line: i + 1, message: e.to_string() })?;
        out.push(obs);
    }
    Ok(out)
}

/// Evaluates `observations` in order with `instance`, calling `emit` for
/// every non-healthy verdict in input order.
///
/// # Errors
///
/// [`ReplayError::Strategy`] if the strategy fails, [`ReplayError::Io`] if
/// `emit` does.
pub fn replay(
    instance: &mut StrategyInstance,
    observations: &[Observation],
    mut emit: impl FnMut(&ReplaySignal) -> std::io::Result<()>,
) -> Result<ReplaySummary, ReplayError> {
    let started = Instant::now();
    let mut summary = ReplaySummary::default();
    let mut models: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    let mut batch = PointBatch::new();
    let mut fired: Vec<(usize, VerdictKind, String)> = Vec::new();
    let mut seen_models: std::collections::HashSet<&str> = std::collections::HashSet::new();

    for (chunk_no, chunk) in observations.chunks(REPLAY_CHUNK).enumerate() {
        let base = chunk_no * REPLAY_CHUNK;
        for positions in models.values_mut() {
            positions.clear();
        }
        order.clear();
        for (i, obs) in chunk.iter().enumerate() {
            let model = obs.snapshot.model_version.as_str();
            let positions = models.entry(model).or_default();
            if positions.is_empty() {
                order.push(model);
            }
            positions.push(i);
            seen_models.insert(model);
        }
        fired.clear();
        for &model in &order {
            let positions = &models[model];
            batch.clear();
            for &i in positions {
                batch.push(&chunk[i]);
            }
            for v in instance.evaluate(model, &batch)? {
                fired.push((positions[v.index], v.kind, v.reason));
            }
        }
        fired.sort_by_key(|(i, _, _)| *i);
        for (i, kind, reason) in fired.drain(..) {
            let snap = &chunk[i].snapshot;
            match kind {
                VerdictKind::Retrain => summary.retrain += 1,
                VerdictKind::Warn => summary.warn += 1,
            }
            emit(&ReplaySignal {
                index: (base + i) as u64,
                model_version: snap.model_version.clone(),
                kind,
                reason,
                score: snap.score,
                timestamp: snap.timestamp_ms(),
            })?;
        }
        summary.points += chunk.len() as u64;
    }
    summary.models = seen_models.len();
    summary.elapsed = started.elapsed();
    Ok(summary)
}
