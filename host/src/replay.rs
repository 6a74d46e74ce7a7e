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
use crate::snapshot::{Observation, ObservationRef};

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
pub fn read_observations(mut input: impl BufRead) -> Result<Vec<Observation>, ReplayError> {
    let mut text = Vec::new();
    input.read_to_end(&mut text)?;
    let text = as_utf8(&text)?;
    Ok(parse_lines(text, 1)?.into_iter().map(ObservationRef::into_observation).collect())
}

/// Checks that `bytes` are UTF-8, naming the first line that is not.
///
/// # Errors
///
/// [`ReplayError::Line`] for the line with the first invalid byte.
pub fn as_utf8(bytes: &[u8]) -> Result<&str, ReplayError> {
    std::str::from_utf8(bytes).map_err(|e| ReplayError::Line {
        line: bytes[..e.valid_up_to()].iter().filter(|&&b| b == b'\n').count() + 1,
        message: "not valid UTF-8".into(),
    })
}

/// Parses every line of `text` (blank lines skipped) on up to `threads`
/// threads, borrowing model names from `text`. Snapshots without a timestamp
/// get the time of reading.
///
/// # Errors
///
/// [`ReplayError::Line`] for the first malformed line in input order.
pub fn parse_lines(text: &str, threads: usize) -> Result<Vec<ObservationRef<'_>>, ReplayError> {
    let received = SystemTime::now();
    let threads = threads.max(1);
    // Split at line boundaries into roughly equal parts.
    let mut parts = Vec::with_capacity(threads);
    let mut start = 0;
    for i in 1..=threads {
        let mut end = if i == threads { text.len() } else { (text.len() * i / threads).max(start) };
        if end < text.len() {
            end = text[end..].find('\n').map_or(text.len(), |p| end + p + 1);
        }
        parts.push(&text[start..end]);
        start = end;
    }
    let results: Vec<_> = if parts.len() == 1 {
        vec![parse_part(parts[0], received)]
    } else {
        std::thread::scope(|scope| {
            let handles: Vec<_> = parts.iter().map(|p| scope.spawn(move || parse_part(p, received))).collect();
            handles.into_iter().map(|h| h.join().expect("parser thread panicked")).collect()
        })
    };
    let mut all = Vec::with_capacity(results.iter().map(|(_, r)| r.as_ref().map_or(0, Vec::len)).sum());
    let mut lines_before = 0;
    for (lines, result) in results {
        match result {
            Ok(obs) => all.extend(obs),
            Err((line, message)) => return Err(ReplayError::Line { line: lines_before + line, message }),
        }
        lines_before += lines;
    }
    Ok(all)
}

type PartResult<'a> = (usize, Result<Vec<ObservationRef<'a>>, (usize, String)>);

/// Parses one part: the number of lines it has, and its snapshots or its
/// first error (local line number, message).
fn parse_part(part: &str, received: SystemTime) -> PartResult<'_> {
    let mut out = Vec::with_capacity(part.len() / 64);
    let mut lines = 0;
    for line in part.split_terminator('\n') {
        lines += 1;
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        match ObservationRef::from_json(line, received) {
            Ok(o) => out.push(o),
            Err(e) => return (lines, Err((lines, e.to_string()))),
        }
    }
    (lines, Ok(out))
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
    observations: &[ObservationRef<'_>],
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
            let model: &str = &obs.model_version;
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
                let o = &chunk[i];
                batch.push_parts(o.score, o.loss, o.timestamp_ms(), &o.metrics);
            }
            for v in instance.evaluate(model, &batch)? {
                fired.push((positions[v.index], v.kind, v.reason));
            }
        }
        fired.sort_by_key(|(i, _, _)| *i);
        for (i, kind, reason) in fired.drain(..) {
            let snap = &chunk[i];
            match kind {
                VerdictKind::Retrain => summary.retrain += 1,
                VerdictKind::Warn => summary.warn += 1,
            }
            emit(&ReplaySignal {
                index: (base + i) as u64,
                model_version: snap.model_version.to_string(),
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
