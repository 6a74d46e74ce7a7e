//! `visutility loadgen`: posts NDJSON batches to a running `visutility run`
//! and reports snapshots/s, request latency percentiles, and whether every
//! accepted snapshot was evaluated.

use std::time::{Duration, Instant};

use anyhow::{Context, anyhow};
use clap::Args;

use crate::Failure;

#[derive(Debug, Args)]
pub struct LoadgenArgs {
    /// Base URL of the service.
    #[arg(long, default_value = "http://127.0.0.1:7878")]
    url: String,
    /// How long to send.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Snapshots per request.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Distinct models in the stream.
    #[arg(long, default_value_t = 16)]
    models: usize,
    /// Report this monitor's own evaluation rate, and check zero loss for
    /// it alone (other monitors, e.g. one with a failing strategy, may still
    /// have points queued).
    #[arg(long)]
    monitor: Option<String>,
}

pub fn run(args: LoadgenArgs) -> Result<(), Failure> {
    let rt = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    rt.block_on(load(args))
}

fn body(batch: usize, models: usize, seed: usize) -> Vec<u8> {
    let mut out = String::with_capacity(batch * 72);
    let t0: i64 = 1_780_000_000_000;
    for i in 0..batch {
        let n = seed * batch + i;
        let score = 0.9 + ((n * 7919) % 1000) as f64 / 100_000.0;
        out.push_str(&format!(
            "{{\"model_version\":\"model-{:03}\",\"score\":{score},\"timestamp\":{}}}\n",
            n % models.max(1),
            t0 + n as i64
        ));
    }
    out.into_bytes()
}

/// Points evaluated and accepted, summed over every monitor or for
/// `monitor` alone.
async fn evaluated_and_accepted(
    client: &reqwest::Client,
    url: &str,
    monitor: Option<&str>,
) -> anyhow::Result<(f64, f64)> {
    let text = client
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let label = monitor.map(|m| format!("{{monitor=\"{m}\"}} "));
    let mut evaluated = 0.0;
    let mut accepted = 0.0;
    let mut found = false;
    for line in text.lines() {
        let value = || {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let ours = |prefix: &str| match &label {
            Some(l) => line
                .strip_prefix(prefix)
                .is_some_and(|rest| rest.starts_with(l.as_str())),
            None => line.starts_with(prefix) && line[prefix.len()..].starts_with('{'),
        };
        if ours("visutility_points_evaluated_total") {
            evaluated += value();
            found = true;
        }
        if ours("visutility_points_accepted_total") {
            accepted += value();
        }
    }
    if let (Some(m), false) = (monitor, found) {
        return Err(anyhow!("no monitor `{m}` in /metrics"));
    }
    Ok((evaluated, accepted))
}

async fn load(args: LoadgenArgs) -> Result<(), Failure> {
    let url = args.url.trim_end_matches('/').to_string();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.connections)
        .build()
        .map_err(Failure::runtime)?;
    let (evaluated0, accepted0) = evaluated_and_accepted(&client, &url, args.monitor.as_deref())
        .await
        .context("cannot reach the service's /metrics")
        .map_err(Failure::input)?;
    let bodies: Vec<bytes::Bytes> = (0..8)
        .map(|s| body(args.batch, args.models, s).into())
        .collect();
    let deadline = Instant::now() + args.duration;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.connections.max(1) {
        let (client, url, bodies) = (client.clone(), url.clone(), bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let (mut sent, mut busy) = (0u64, 0u64);
            let mut i = c;
            while Instant::now() < deadline {
                let t = Instant::now();
                let resp = client
                    .post(format!("{url}/v1/snapshots"))
                    .header("Content-Type", "application/x-ndjson")
                    .body(bodies[i % bodies.len()].clone())
                    .send()
                    .await
                    .map_err(|e| anyhow!("POST failed: {e}"))?;
                let status = resp.status();
                let _ = resp.bytes().await;
                latencies.push(t.elapsed());
                match status.as_u16() {
                    202 => sent += 1,
                    503 => {
                        busy += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => return Err(anyhow!("unexpected HTTP {other}")),
                }
                i += 1;
            }
            Ok::<_, anyhow::Error>((latencies, sent, busy))
        }));
    }
    let mut latencies = Vec::new();
    let (mut requests, mut busy) = (0u64, 0u64);
    for t in tasks {
        let (l, s, b) = t
            .await
            .map_err(Failure::runtime)?
            .map_err(Failure::runtime)?;
        latencies.extend(l);
        requests += s;
        busy += b;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let snapshots = requests * args.batch as u64;
    if let Some(m) = &args.monitor {
        let (after, _) = evaluated_and_accepted(&client, &url, Some(m))
            .await
            .map_err(Failure::runtime)?;
        println!(
            "monitor `{m}` evaluated {:.0} snapshots/s during the run",
            (after - evaluated0) / elapsed
        );
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };

    // Zero loss: every accepted snapshot must be evaluated.
    let wait_until = Instant::now() + Duration::from_secs(60);
    let (evaluated, accepted) = loop {
        let (e, a) = evaluated_and_accepted(&client, &url, args.monitor.as_deref())
            .await
            .map_err(Failure::runtime)?;
        if e - evaluated0 >= a - accepted0 || Instant::now() > wait_until {
            break (e - evaluated0, a - accepted0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "sent {snapshots} snapshots in {requests} requests of {} over {} connection(s) in {elapsed:.2} s: {:.0} snapshots/s",
        args.batch,
        args.connections,
        snapshots as f64 / elapsed
    );
    println!(
        "request latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {busy} answered 503 (back-pressure)",
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    let which = args
        .monitor
        .as_ref()
        .map_or("monitors".to_string(), |m| format!("monitor `{m}`"));
    println!(
        "{which}: {accepted:.0} points accepted, {evaluated:.0} evaluated ({} lost)",
        (accepted - evaluated).max(0.0)
    );
    if evaluated < accepted {
        return Err(Failure::runtime(anyhow!(
            "{} accepted points were not evaluated",
            accepted - evaluated
        )));
    }
    Ok(())
}
