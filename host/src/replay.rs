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
    Ok(parse_lines(text, 1)?
        .into_iter()
        .map(ObservationRef::into_observation)
        .collect())
}

/// Checks that `bytes` are UTF-8, naming the first line that is not.
///
/// # Errors
///
/// [`ReplayError::Line`] for the line with the first invalid byte.
pub fn as_utf8(bytes: &[u8]) -> Result<&str, ReplayError> {
    std::str::from_utf8(bytes).map_err(|e| ReplayError::Line {
        line: bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1,
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
        let mut end = if i == threads {
            text.len()
        } else {
            (text.len() * i / threads).max(start)
        };
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
            let handles: Vec<_> = parts
                .iter()
                .map(|p| scope.spawn(move || parse_part(p, received)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("parser thread panicked"))
                .collect()
        })
    };
    let mut all = Vec::with_capacity(
        results
            .iter()
            .map(|(_, r)| r.as_ref().map_or(0, Vec::len))
            .sum(),
    );
    let mut lines_before = 0;
    for (lines, result) in results {
        match result {
            Ok(obs) => all.extend(obs),
            Err((line, message)) => {
                return Err(ReplayError::Line {
                    line: lines_before + line,
                    message,
                });
            }
        }
        lines_before += lines;
    }
    Ok(all)
}

/// Lines per parsing work item of [`replay_text`].
const PARSE_CHUNK_LINES: usize = 16 * 1024;

/// Parses and evaluates `text` at once: parsing threads work ahead while this
/// thread evaluates, in input order. Signals are held back until the whole
/// input is known to be valid, so a malformed line still produces no output
/// at all.
///
/// # Errors
///
/// [`ReplayError::Line`] for the first malformed line in input order (nothing
/// was passed to `emit`), [`ReplayError::Strategy`] if the strategy fails,
/// [`ReplayError::Io`] if `emit` does.
pub fn replay_text(
    instance: &mut StrategyInstance,
    text: &str,
    threads: usize,
    mut emit: impl FnMut(&ReplaySignal) -> std::io::Result<()>,
) -> Result<ReplaySummary, ReplayError> {
    use std::sync::atomic::{AtomicUsize, Ordering};

    let received = SystemTime::now();
    // Work items at line boundaries, with the number of lines before each.
    let mut items: Vec<(usize, &str)> = Vec::new();
    let (mut start, mut line_no, mut in_item) = (0, 0, 0);
    for (pos, _) in text.match_indices('\n') {
        in_item += 1;
        if in_item == PARSE_CHUNK_LINES {
            items.push((line_no, &text[start..=pos]));
            line_no += in_item;
            in_item = 0;
            start = pos + 1;
        }
    }
    if start < text.len() {
        items.push((line_no, &text[start..]));
    }

    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let mut signals: Vec<ReplaySignal> = Vec::new();
    let mut totals = ReplaySummary::default();
    let mut models: std::collections::HashSet<String> = std::collections::HashSet::new();
    let outcome: Result<(), ReplayError> = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel::<(usize, PartResult<'_>)>();
        for _ in 0..threads.max(1) {
            let tx = tx.clone();
            let (items, next) = (&items, &next);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((_, part)) = items.get(i) else { break };
                    if tx.send((i, parse_part(part, received))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let mut pending = std::collections::BTreeMap::new();
        let mut want = 0;
        let mut failure: Option<ReplayError> = None;
        let mut base = 0u64;
        for (i, result) in rx {
            pending.insert(i, result);
            while let Some((_, result)) = pending.remove(&want) {
                let (line_offset, _) = items[want];
                want += 1;
                if failure.is_some() {
                    continue;
                }
                match result {
                    Err((line, message)) => {
                        failure = Some(ReplayError::Line {
                            line: line_offset + line,
                            message,
                        });
                        // Stop the parsers early; later items are moot.
                        next.store(items.len(), Ordering::Relaxed);
                    }
                    Ok(obs) => {
                        let mut part_signals = Vec::new();
                        let summary = replay(instance, &obs, |s| {
                            part_signals.push(s.clone());
                            Ok(())
                        });
                        match summary {
                            Ok(summary) => {
                                totals.points += summary.points;
                                totals.retrain += summary.retrain;
                                totals.warn += summary.warn;
                                for o in &obs {
                                    if !models.contains(o.model_version.as_ref()) {
                                        models.insert(o.model_version.to_string());
                                    }
                                }
                                for mut s in part_signals {
                                    s.index += base;
                                    signals.push(s);
                                }
                                base += obs.len() as u64;
                            }
                            Err(e) => {
                                failure = Some(e);
                                next.store(items.len(), Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
    });
    outcome?;
    totals.models = models.len();
    totals.elapsed = started.elapsed();
    for s in &signals {
        emit(s)?;
    }
    Ok(totals)
}

/// How two strategies' signals line up on one stream (`replay --compare`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Comparison {
    /// Retrain signals of A and of B.
    pub retrain: (usize, usize),
    /// Warn signals of A and of B.
    pub warn: (usize, usize),
    /// Retrain signals paired across A and B: same model, at most
    /// `tolerance` snapshots apart.
    pub matched: usize,
    /// Input indices of A's retrain signals with no partner in B.
    pub only_a: Vec<u64>,
    /// Input indices of B's retrain signals with no partner in A.
    pub only_b: Vec<u64>,
    /// The pairing window, in snapshots of the input.
    pub tolerance: u64,
    /// B's index minus A's, for each pair (positive: B fired later).
    pub delays: Vec<i64>,
    /// `matched / (matched + only A + only B)`; 1 when neither fired.
    pub agreement: f64,
}

/// Pairs A's and B's retrain signals per model, in order: each A signal takes
/// the earliest unpaired B signal of its model within `tolerance` snapshots.
pub fn compare(a: &[ReplaySignal], b: &[ReplaySignal], tolerance: u64) -> Comparison {
    let retrain = |s: &[ReplaySignal]| -> HashMap<String, Vec<u64>> {
        let mut by_model: HashMap<String, Vec<u64>> = HashMap::new();
        for x in s.iter().filter(|x| x.kind == VerdictKind::Retrain) {
            by_model
                .entry(x.model_version.clone())
                .or_default()
                .push(x.index);
        }
        by_model
    };
    let count = |s: &[ReplaySignal], k: VerdictKind| s.iter().filter(|x| x.kind == k).count();
    let (ra, rb) = (retrain(a), retrain(b));
    let mut models: Vec<&String> = ra.keys().chain(rb.keys()).collect();
    models.sort();
    models.dedup();
    let (mut matched, mut only_a, mut only_b, mut delays) = (0, Vec::new(), Vec::new(), Vec::new());
    for m in models {
        let (xs, ys) = (
            ra.get(m).map_or(&[][..], Vec::as_slice),
            rb.get(m).map_or(&[][..], Vec::as_slice),
        );
        let mut j = 0;
        for &x in xs {
            while j < ys.len() && ys[j] + tolerance < x {
                only_b.push(ys[j]);
                j += 1;
            }
            if j < ys.len() && ys[j] <= x + tolerance {
                matched += 1;
                delays.push(ys[j] as i64 - x as i64);
                j += 1;
            } else {
                only_a.push(x);
            }
        }
        only_b.extend_from_slice(&ys[j..]);
    }
    only_a.sort_unstable();
    only_b.sort_unstable();
    let total = matched + only_a.len() + only_b.len();
    Comparison {
        retrain: (
            count(a, VerdictKind::Retrain),
            count(b, VerdictKind::Retrain),
        ),
        warn: (count(a, VerdictKind::Warn), count(b, VerdictKind::Warn)),
        matched,
        only_a,
        only_b,
        tolerance,
        delays,
        agreement: if total == 0 {
            1.0
        } else {
            matched as f64 / total as f64
        },
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(index: u64, model: &str, kind: VerdictKind) -> ReplaySignal {
        ReplaySignal {
            index,
            model_version: model.into(),
            kind,
            reason: String::new(),
            score: 0.0,
            timestamp: 0,
        }
    }

    #[test]
    fn compare_pairs_per_model_within_the_tolerance() {
        use VerdictKind::{Retrain, Warn};
        let a = [
            sig(100, "m", Retrain),
            sig(500, "m", Retrain),
            sig(120, "n", Retrain),
            sig(130, "n", Warn),
        ];
        // 130 pairs with m@100 (+30); m@900 is too far from 500; n@125 is
        // another model's stream than m's, pairs with n@120 (+5).
        let b = [
            sig(130, "m", Retrain),
            sig(900, "m", Retrain),
            sig(125, "n", Retrain),
            sig(9, "o", Retrain),
        ];
        let c = compare(&a, &b, 50);
        assert_eq!(c.retrain, (3, 4));
        assert_eq!(c.warn, (1, 0));
        assert_eq!(c.matched, 2);
        assert_eq!(c.only_a, [500]);
        assert_eq!(c.only_b, [9, 900]);
        assert_eq!(c.delays, [30, 5]);
        assert!((c.agreement - 2.0 / 5.0).abs() < 1e-12);
    }

    #[test]
    fn compare_takes_each_partner_once_and_counts_nothing_fired_as_agreement() {
        use VerdictKind::Retrain;
        let a = [sig(10, "m", Retrain), sig(11, "m", Retrain)];
        let b = [sig(12, "m", Retrain)];
        let c = compare(&a, &b, 5);
        assert_eq!(
            (c.matched, c.only_a.as_slice(), c.only_b.len()),
            (1, &[11u64][..], 0)
        );
        assert_eq!(compare(&[], &[], 5).agreement, 1.0);
    }
}
