//! `visutility replay`.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;
use visutility_host::Limits;
use visutility_host::replay::{
    ReplayError, ReplaySignal, as_utf8, parse_lines, replay, replay_text,
};
use visutility_host::runtime::{StrategyComponent, StrategyInstance, StrategySource};

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
    #[arg(
        short,
        long,
        required_unless_present = "compare",
        conflicts_with = "compare"
    )]
    strategy: Option<String>,
    /// Its configuration: inline JSON, or `@file.json`.
    #[arg(short, long, conflicts_with = "compare")]
    config: Option<String>,
    /// Back-test two strategies side by side on the same stream: where each
    /// fired, how their retrain signals pair up, the delay between them.
    #[arg(long, num_args = 2, value_names = ["A", "B"])]
    compare: Option<Vec<String>>,
    /// With `--compare`: A's configuration (inline JSON or `@file.json`).
    #[arg(long, requires = "compare")]
    config_a: Option<String>,
    /// With `--compare`: B's configuration (inline JSON or `@file.json`).
    #[arg(long, requires = "compare")]
    config_b: Option<String>,
    /// With `--compare`: how many snapshots apart two retrain signals of one
    /// model may be and still count as the same detection.
    #[arg(long, default_value_t = 100, requires = "compare")]
    tolerance: u64,
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

fn instance(
    strategy: &str,
    config: Option<&str>,
    args: &ReplayArgs,
) -> Result<StrategyInstance, Failure> {
    let config = read_config(config)?;
    let source: StrategySource = strategy.parse().map_err(Failure::input)?;
    let component = StrategyComponent::load(&source).map_err(Failure::input)?;
    let mut limits = Limits::default();
    if let Some(fuel) = args.fuel {
        limits.fuel = fuel;
    }
    if let Some(deadline) = args.deadline {
        limits.deadline = deadline;
    }
    component
        .instantiate(&config, limits)
        .map_err(Failure::input)
}

fn read_input(path: &std::path::Path) -> Result<Vec<u8>, Failure> {
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .context("cannot read stdin")
            .map_err(Failure::input)?;
    } else {
        File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("cannot read input `{}`", path.display()))
            .map_err(Failure::input)?;
    }
    Ok(bytes)
}

fn output(path: &std::path::Path) -> Result<Box<dyn Write>, Failure> {
    Ok(if path.as_os_str() == "-" {
        Box::new(BufWriter::with_capacity(1 << 16, std::io::stdout().lock()))
    } else {
        let f = File::create(path)
            .with_context(|| format!("cannot create output `{}`", path.display()))
            .map_err(Failure::input)?;
        Box::new(BufWriter::with_capacity(1 << 16, f))
    })
}

/// Maps a replay error to a failure: a malformed line names `FILE:LINE`
/// (bad input), anything else is a runtime failure.
fn located(input: &std::path::Path) -> impl Fn(ReplayError) -> Failure {
    let name = input.display().to_string();
    move |e| match e {
        ReplayError::Line { line, message } => Failure::input(anyhow!("{name}:{line}: {message}")),
        other @ ReplayError::Strategy(_) => Failure::runtime(other),
        other => Failure::input(other),
    }
}

pub fn run(args: ReplayArgs) -> Result<(), Failure> {
    if let Some(pair) = &args.compare {
        return compare(&args, &pair[0], &pair[1]);
    }
    let strategy = args.strategy.as_deref().unwrap_or_default();
    let mut instance = instance(strategy, args.config.as_deref(), &args)?;

    let started = Instant::now();
    let bytes = read_input(&args.input)?;
    let located = located(&args.input);
    let text = as_utf8(&bytes).map_err(&located)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);

    let mut out = output(&args.output)?;
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
        counters
            .log_lines_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
        counters
            .output_bytes_dropped
            .load(std::sync::atomic::Ordering::Relaxed),
    );
    if logs > 0 || bytes > 0 {
        eprintln!(
            "sandbox: dropped {logs} log line(s) over the per-call limit and {bytes} byte(s) of stdout/stderr over the cap"
        );
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

/// `replay --compare A B`: both strategies over the same parsed stream.
fn compare(args: &ReplayArgs, a: &str, b: &str) -> Result<(), Failure> {
    let mut instances = [
        instance(a, args.config_a.as_deref(), args)?,
        instance(b, args.config_b.as_deref(), args)?,
    ];
    let bytes = read_input(&args.input)?;
    let located = located(&args.input);
    let text = as_utf8(&bytes).map_err(&located)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let observations = parse_lines(text, threads).map_err(&located)?;
    let mut signals: [Vec<ReplaySignal>; 2] = [Vec::new(), Vec::new()];
    for (instance, out) in instances.iter_mut().zip(signals.iter_mut()) {
        replay(instance, &observations, |s| {
            out.push(s.clone());
            Ok(())
        })
        .map_err(&located)?;
    }
    let c = visutility_host::replay::compare(&signals[0], &signals[1], args.tolerance);

    if args.output.as_os_str() != "-" {
        let mut out = output(&args.output)?;
        for (label, list) in ["A", "B"].iter().zip(&signals) {
            for s in list {
                let mut v = serde_json::to_value(s).map_err(Failure::runtime)?;
                v["strategy"] = serde_json::Value::String((*label).into());
                serde_json::to_writer(&mut out, &v).map_err(Failure::runtime)?;
                out.write_all(b"\n").map_err(Failure::runtime)?;
            }
        }
        out.flush().map_err(Failure::runtime)?;
    }

    let list = |xs: &mut dyn Iterator<Item = u64>| {
        let all: Vec<u64> = xs.collect();
        let mut text = all
            .iter()
            .take(20)
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        if all.len() > 20 {
            text.push_str(&format!(", … ({} more)", all.len() - 20));
        }
        if all.is_empty() {
            "nowhere".to_string()
        } else {
            text
        }
    };
    let mut stdout = std::io::stdout().lock();
    let mut say = |line: String| writeln!(stdout, "{line}").map_err(Failure::runtime);
    say(format!(
        "{} snapshots, {} model(s)",
        observations.len(),
        observations
            .iter()
            .map(|o| o.model_version.as_ref())
            .collect::<std::collections::HashSet<&str>>()
            .len()
    ))?;
    for (i, (label, spec)) in [("A", a), ("B", b)].into_iter().enumerate() {
        let info = instances[i].info();
        say(format!(
            "{label}  {spec} ({} {}): {} retrain, {} warn",
            info.name,
            info.version,
            [c.retrain.0, c.retrain.1][i],
            [c.warn.0, c.warn.1][i]
        ))?;
        say(format!(
            "   retrain at: {}",
            list(
                &mut signals[i]
                    .iter()
                    .filter(|s| s.kind == visutility_host::runtime::VerdictKind::Retrain)
                    .map(|s| s.index)
            )
        ))?;
    }
    let total = c.matched + c.only_a.len() + c.only_b.len();
    say(format!(
        "agreement: {} of {total} detection(s) paired within {} snapshots ({:.1}%); only A: {}; only B: {}",
        c.matched,
        c.tolerance,
        c.agreement * 100.0,
        list(&mut c.only_a.iter().copied()),
        list(&mut c.only_b.iter().copied())
    ))?;
    if c.delays.is_empty() {
        say("delay: no paired detections".to_string())?;
    } else {
        let mut d = c.delays.clone();
        d.sort_unstable();
        let median = d[d.len() / 2];
        let mean = d.iter().sum::<i64>() as f64 / d.len() as f64;
        let who = match median {
            0 => "at the same snapshot as A".to_string(),
            m if m > 0 => format!("{m} snapshot(s) after A"),
            m => format!("{} snapshot(s) before A", -m),
        };
        say(format!(
            "delay (B − A over paired detections): median {median:+}, mean {mean:+.1}, range {:+}..{:+}: B fires {who}",
            d[0],
            d[d.len() - 1]
        ))?;
    }
    let first = |i: usize| {
        signals[i]
            .iter()
            .find(|s| s.kind == visutility_host::runtime::VerdictKind::Retrain)
            .map(|s| s.index)
    };
    match (first(0), first(1)) {
        (Some(x), Some(y)) => say(format!(
            "first retrain: A at {x}, B at {y} ({:+} snapshots)",
            y as i64 - x as i64
        ))?,
        (x, y) => say(format!(
            "first retrain: A at {}, B at {}",
            x.map_or("never".into(), |v| v.to_string()),
            y.map_or("never".into(), |v| v.to_string())
        ))?,
    }
    Ok(())
}
