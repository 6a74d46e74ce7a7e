//! `visutility replay`.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use visutility_host::Limits;
use visutility_host::replay::{ReplayError, as_utf8, replay_text};
use visutility_host::runtime::{StrategyComponent, StrategySource};

use crate::{Failure, read_config};

#[derive(Debug, Args)]
#[command(after_help = "\
Input: one JSON snapshot per line: {\"model_version\":\"m\",\"score\":0.93,\"loss\":0.2,\
\"timestamp\":\"2026-01-01T00:00:00Z\",\"metrics\":{\"psi\":0.1}} (loss, timestamp and metrics optional; \
timestamp as RFC 3339 or integer ms since the epoch).
Output: one JSON object per non-healthy verdict, in input order, with the keys \
index, model_version, kind (\"retrain\" | \"warn\"), reason, score, timestamp (ms).
A malformed input line stops the replay before anything is evaluated, with exit code 2.")]
pub struct ReplayArgs {
    /// The strategy: `builtin:NAME` or a path to a `.wasm` component.
    #[arg(short, long)]
    strategy: String,
    /// Its configuration: inline JSON, or `@file.json`.
    #[arg(short, long)]
    config: Option<String>,
    /// NDJSON snapshots to replay; `-` for stdin.
    #[arg(short, long)]
    input: PathBuf,
    /// Where to write the signals; `-` (the default) for stdout.
    #[arg(short, long, default_value = "-")]
    output: PathBuf,
    /// Fuel per strategy call.
    #[arg(long)]
    fuel: Option<u64>,
    /// Wall-clock deadline per strategy call, e.g. `2s`.
    #[arg(long, value_parser = humantime::parse_duration)]
    deadline: Option<Duration>,
}

pub fn run(args: ReplayArgs) -> Result<(), Failure> {
    let config = read_config(args.config.as_deref())?;
    let source: StrategySource = args.strategy.parse().map_err(Failure::input)?;
    let component = StrategyComponent::load(&source).map_err(Failure::input)?;
    let mut limits = Limits::default();
    if let Some(fuel) = args.fuel {
        limits.fuel = fuel;
    }
    if let Some(deadline) = args.deadline {
        limits.deadline = deadline;
    }
    let mut instance = component.instantiate(&config, limits).map_err(Failure::input)?;

    let started = Instant::now();
    let mut bytes = Vec::new();
    if args.input.as_os_str() == "-" {
        std::io::stdin().lock().read_to_end(&mut bytes).context("cannot read stdin").map_err(Failure::input)?;
    } else {
        File::open(&args.input)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("cannot read input `{}`", args.input.display()))
            .map_err(Failure::input)?;
    }
    let input_name = args.input.display().to_string();
    let located = |e: ReplayError| match e {
        ReplayError::Line { line, message } => Failure::input(anyhow!("{input_name}:{line}: {message}")),
        other => Failure::input(other),
    };
    let text = as_utf8(&bytes).map_err(located)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);

    let mut out: Box<dyn Write> = if args.output.as_os_str() == "-" {
        Box::new(BufWriter::with_capacity(1 << 16, std::io::stdout().lock()))
    } else {
        let f = File::create(&args.output)
            .with_context(|| format!("cannot create output `{}`", args.output.display()))
            .map_err(Failure::input)?;
        Box::new(BufWriter::with_capacity(1 << 16, f))
    };
    let summary = replay_text(&mut instance, text, threads, |signal| {
        serde_json::to_writer(&mut out, signal)?;
        out.write_all(b"\n")
    })
    .map_err(|e| match e {
        ReplayError::Line { .. } => located(e),
        ReplayError::Io(io) => Failure::runtime(io),
        other => Failure::runtime(other),
    })?;
    out.flush().map_err(Failure::runtime)?;
    let counters = instance.counters();
    let (logs, bytes) = (
        counters.log_lines_dropped.load(std::sync::atomic::Ordering::Relaxed),
        counters.output_bytes_dropped.load(std::sync::atomic::Ordering::Relaxed),
    );
    if logs > 0 || bytes > 0 {
        eprintln!("sandbox: dropped {logs} log line(s) over the per-call limit and {bytes} byte(s) of stdout/stderr over the cap");
    }

    let info = instance.info();
    let total = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "replayed {} snapshots of {} model(s) through {} {} in {:.3} s ({:.0} snapshots/s; {:.3} s parsing and \
         evaluating): {} retrain, {} warn",
        summary.points,
        summary.models,
        info.name,
        info.version,
        total,
        summary.points as f64 / total,
        summary.elapsed.as_secs_f64(),
        summary.retrain,
        summary.warn
    );
    Ok(())
}
