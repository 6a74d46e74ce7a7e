//! `visutility demo`: a newcomer's first command.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Args;
use visutility_host::{
    ConsoleObserver, DynObserver, METRIC_CHANNEL_BUFFER, MetricPublisher, MetricSnapshot,
    MonitoringSupervisor, VerdictEvent, WasmStrategy, format_timestamp,
};

use crate::Failure;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Points in the synthetic stream.
    #[arg(long, default_value_t = 60)]
    points: usize,
    /// Pause between snapshots, e.g. `30ms` (0 for as fast as possible).
    #[arg(long, default_value = "30ms", value_parser = humantime::parse_duration)]
    pace: Duration,
}

const MODEL: &str = "churn-model-v3";
const WARMUP: usize = 20;

/// A model that is healthy (~0.93) for a while, then drifts down.
fn synthetic_score(i: usize, points: usize) -> f64 {
    // Deterministic jitter in [-0.01, 0.01].
    let jitter = (((i * 7919) % 21) as f64 - 10.0) / 1000.0;
    let drift_start = points / 2;
    let drift = if i < drift_start {
        0.0
    } else {
        (i - drift_start) as f64 * 0.006
    };
    0.93 + jitter - drift
}

pub fn run(args: DemoArgs) -> Result<(), Failure> {
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    runtime.block_on(demo(args))
}

async fn demo(args: DemoArgs) -> Result<(), Failure> {
    let points = args.points.max(WARMUP + 1);
    println!("VisuTility demo");
    println!(
        "  model `{MODEL}` streams {points} health snapshots; its score drifts down after point {}.",
        points / 2
    );
    println!(
        "  monitor: builtin:baseline (a WebAssembly strategy in a sandbox), baseline learnt from the first \
         {WARMUP} points, tolerance 0.05, cooldown 10m per model.\n"
    );

    let config = format!(r#"{{"warmup": {WARMUP}, "tolerance": 0.05}}"#);
    let strategy = WasmStrategy::load("builtin:baseline", &config)
        .context("cannot load the bundled baseline strategy")
        .map_err(Failure::runtime)?;
    let mut verdicts = strategy.verdicts();

    let publisher = Arc::new(MetricPublisher::new(METRIC_CHANNEL_BUFFER));
    publisher.attach(DynObserver::new(ConsoleObserver));
    let (supervisor, mut signals) = MonitoringSupervisor::new(publisher.clone(), strategy);
    let stats = supervisor.stats();
    let running = supervisor.spawn();

    // Verdicts (every degraded point, with the strategy's reason) and
    // signals (after the cooldown) are printed as they arrive.
    let printer = tokio::spawn(async move {
        let mut degraded = 0u64;
        let mut signal_count = 0u64;
        let mut verdicts_open = true;
        loop {
            tokio::select! {
                v = verdicts.recv(), if verdicts_open => match v {
                    Ok(VerdictEvent { snapshot, kind, reason }) => {
                        degraded += 1;
                        println!("    {} {}: {reason}", kind.as_str(), snapshot.model_version);
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => verdicts_open = false,
                },
                s = signals.recv() => match s {
                    Some(signal) => {
                        signal_count += 1;
                        let snap = signal.degraded_snapshot;
                        println!(
                            "\n>>> RETRAIN SIGNAL #{signal_count}: model `{}` degraded to score {:.4} at {}\n",
                            snap.model_version, snap.score, format_timestamp(snap.timestamp)
                        );
                    }
                    None => break,
                },
            }
        }
        (degraded, signal_count)
    });

    let start = SystemTime::now() - Duration::from_secs(60 * points as u64);
    for i in 0..points {
        let snapshot = MetricSnapshot {
            model_version: MODEL.into(),
            score: synthetic_score(i, points),
            loss: Some(((1.0 - synthetic_score(i, points)) * 2.0 * 10_000.0).round() / 10_000.0),
            timestamp: start + Duration::from_secs(60 * i as u64),
        };
        publisher.publish(snapshot).map_err(Failure::runtime)?;
        if !args.pace.is_zero() {
            tokio::time::sleep(args.pace).await;
        }
    }
    drop(publisher);
    running
        .await
        .map_err(Failure::runtime)?
        .map_err(Failure::runtime)?;
    let (degraded, signal_count) = printer.await.map_err(Failure::runtime)?;

    println!(
        "\nSummary: {points} snapshots, {degraded} degraded verdicts, {signal_count} retrain signal(s) emitted,"
    );
    println!(
        "         {} repeat(s) suppressed by the cooldown (no retrain storm).",
        stats.suppressed.load(Ordering::Relaxed)
    );
    println!("\nNext:");
    println!("  visutility strategies                     # the bundled strategies");
    println!("  visutility inspect builtin:baseline       # what a strategy component is");
    println!(
        "  visutility replay --strategy builtin:baseline --config '{{\"baseline\":0.9}}' --input stream.ndjson"
    );
    if signal_count == 0 {
        return Err(Failure::runtime(anyhow::anyhow!(
            "the demo stream produced no retrain signal"
        )));
    }
    Ok(())
}
