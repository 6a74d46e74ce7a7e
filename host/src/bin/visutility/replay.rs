//! `visutility replay`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use clap::Args;
use visutility_host::Limits;
use visutility_host::replay::{ReplayError, read_observations, replay};
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

    let input: Box<dyn BufRead> = if args.input.as_os_str() == "-" {
        Box::new(BufReader::with_capacity(1 << 20, std::io::stdin().lock()))
    } else {
        let f = File::open(&args.input)
            .with_context(|| format!("cannot open input `{}`", args.input.display()))
            .map_err(Failure::input)?;
        Box::new(BufReader::with_capacity(1 << 20, f))
    };
    let input_name = args.input.display().to_string();
    let observations = read_observations(input).map_err(|e| match e {
        ReplayError::Line { line, message } => Failure::input(anyhow!("{input_name}:{line}: {message}")),
        other => Failure::input(other),
    })?;

    let mut out: Box<dyn Write> = if args.output.as_os_str() == "-" {
        Box::new(BufWriter::with_capacity(1 << 16, std::io::stdout().lock()))
    } else {
        let f = File::create(&args.output)
            .with_context(|| format!("cannot create output `{}`", args.output.display()))
            .map_err(Failure::input)?;
        Box::new(BufWriter::with_capacity(1 << 16, f))
    };
    let summary = replay(&mut instance, &observations, |signal| {
        serde_json::to_writer(&mut out, signal)?;
        out.write_all(b"\n")
    })
    .map_err(|e| match e {
        ReplayError::Io(io) => Failure::runtime(io),
        other => Failure::runtime(other),
    })?;
    out.flush().map_err(Failure::runtime)?;

    let info = instance.info();
    let secs = summary.elapsed.as_secs_f64().max(1e-9);
    eprintln!(
        "replayed {} snapshots of {} model(s) through {} {} in {:.3} s ({:.0} snapshots/s): {} retrain, {} warn",
        summary.points,
        summary.models,
        info.name,
        info.version,
        secs,
        summary.points as f64 / secs,
        summary.retrain,
        summary.warn
    );
    Ok(())
}
