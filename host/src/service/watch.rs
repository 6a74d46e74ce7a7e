//! Watches the `.wasm` files of monitors whose strategy is a path, and swaps
//! a monitor's strategy when its file changes: only once the file is stable
//! (the same size and modification time on two polls in a row), and through
//! the same validation as an API upload, so a half-written or broken file is
//! refused and the running strategy keeps serving.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use super::monitor::Monitor;
use crate::runtime::{Runtime, StrategyComponent, StrategySource};

/// How long a file-triggered swap waits for the monitor's answer.
const SWAP_WAIT: Duration = Duration::from_secs(30);

/// What identifies a version of a file without reading it.
type Signature = (SystemTime, u64);

struct Watched {
    monitor: Arc<Monitor>,
    path: PathBuf,
    /// The version last acted on (or found at start).
    seen: Option<Signature>,
    /// A newer version seen on the last poll, not yet stable.
    pending: Option<Signature>,
    /// A read error already logged (not repeated every poll).
    reported: bool,
}

fn signature(path: &std::path::Path) -> std::io::Result<Signature> {
    let m = std::fs::metadata(path)?;
    Ok((m.modified()?, m.len()))
}

/// Starts the watcher thread over every monitor with a file strategy; it
/// ends when `stop` is set. `None` when no monitor has one.
pub fn spawn(
    monitors: &[Arc<Monitor>],
    every: Duration,
    stop: Arc<AtomicBool>,
) -> Option<std::thread::JoinHandle<()>> {
    let mut watched: Vec<Watched> = monitors
        .iter()
        .filter_map(|m| match m.config.strategy.parse::<StrategySource>() {
            Ok(StrategySource::File(path)) => Some(Watched {
                monitor: m.clone(),
                seen: signature(&path).ok(),
                path,
                pending: None,
                reported: false,
            }),
            _ => None,
        })
        .collect();
    if watched.is_empty() {
        return None;
    }
    std::thread::Builder::new()
        .name("visutility-watch".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(every);
                for w in &mut watched {
                    poll(w);
                }
            }
        })
        .ok()
}

fn poll(w: &mut Watched) {
    let sig = match signature(&w.path) {
        Ok(s) => s,
        Err(e) => {
            if !w.reported {
                tracing::warn!(monitor = %w.monitor.config.name, path = %w.path.display(), "cannot read the strategy file: {e}; the running strategy keeps serving");
                w.reported = true;
            }
            return;
        }
    };
    w.reported = false;
    if Some(sig) == w.seen {
        w.pending = None;
        return;
    }
    if w.pending != Some(sig) {
        // Changed since the last poll: wait until it stops changing.
        w.pending = Some(sig);
        return;
    }
    w.seen = Some(sig);
    w.pending = None;
    let bytes = match std::fs::read(&w.path) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(monitor = %w.monitor.config.name, path = %w.path.display(), "cannot read the strategy file: {e}");
            return;
        }
    };
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
    if sha == w.monitor.status().strategy.sha256 {
        return;
    }
    let label = w.path.display().to_string();
    let name = &w.monitor.config.name;
    match StrategyComponent::from_bytes(Runtime::shared(), label, &bytes) {
        Ok(component) => match w.monitor.swap(component, None, "file change", SWAP_WAIT) {
            Ok(report) => {
                tracing::warn!(monitor = %name, new = %report.new.sha256, "strategy file changed: now serving {} {}", report.new.name, report.new.version)
            }
            Err(reason) => {
                tracing::error!(monitor = %name, "strategy file changed but {reason}; the running strategy keeps serving")
            }
        },
        Err(e) => {
            let reason = format!("candidate refused: {e}");
            tracing::error!(monitor = %name, "strategy file changed but {reason}; the running strategy keeps serving");
            w.monitor.record_refusal("file change", &sha, &reason);
        }
    }
}
