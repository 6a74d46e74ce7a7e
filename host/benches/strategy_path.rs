//! The strategy path, measured side by side in one process:
//!
//! 1. per-point evaluation time of the same detector natively and as a WASM
//!    component through the host's real path (`PointBatch` +
//!    `StrategyInstance::evaluate`), at batch sizes 1, 64 and 1024, and the
//!    WASM/native ratio;
//! 2. cold compile vs cache load vs instantiation of a component;
//! 3. resident memory added by 1,000 live monitors (instances with state).
//!
//! Run: `cargo bench -p visutility-host --bench strategy_path` (add
//! `-- --quick` for a short run). Figures are ratios against a reference run
//! in the same process; absolute times on a shared machine mean little.

use std::hint::black_box;
use std::time::{Duration, Instant};

use visutility_host::Limits;
use visutility_host::runtime::{
    PointBatch, Runtime, RuntimeConfig, StrategyComponent, StrategySource,
};
use visutility_strategy::{Detector, evaluate_columns, parse_config};

struct Case {
    name: &'static str,
    builtin: &'static str,
    config: &'static str,
    native: fn(&str, &[f64], &[i64], usize) -> usize,
}

/// Runs detector `D` natively over `scores` in batches of `batch`, through
/// the SDK's own column loop (exactly what the guest runs). Returns the
/// number of verdicts.
fn native<D: Detector>(config: &str, scores: &[f64], ts: &[i64], batch: usize) -> usize {
    let cfg = parse_config::<D>(config).expect("valid config");
    let mut d = D::new(&cfg, "bench-model");
    let mut fired = 0;
    for (s, t) in scores.chunks(batch).zip(ts.chunks(batch)) {
        evaluate_columns(&mut d, s, &[], t, &[], |i, _, reason| {
            fired += 1;
            black_box((i, reason));
        });
    }
    fired
}

fn wasm(
    component: &StrategyComponent,
    config: &str,
    scores: &[f64],
    ts: &[i64],
    batch: usize,
) -> usize {
    let mut inst = component
        .instantiate(config, Limits::default())
        .expect("instantiate");
    let mut points = PointBatch::new();
    let mut fired = 0;
    for (s, t) in scores.chunks(batch).zip(ts.chunks(batch)) {
        // Both paths start from the same columns in memory: the host copies
        // them into its batch, then across the boundary.
        points.clear();
        points.extend_scores(s, t);
        fired += inst
            .evaluate("bench-model", &points)
            .expect("evaluate")
            .len();
    }
    fired
}

/// Best of `reps` runs of each of `a` and `b`, taken in turns so that both
/// see the same machine (the least disturbed run of each counts).
fn best_pair(
    reps: usize,
    mut a: impl FnMut() -> usize,
    mut b: impl FnMut() -> usize,
) -> ((Duration, usize), (Duration, usize)) {
    let (mut ba, mut bb) = ((Duration::MAX, 0), (Duration::MAX, 0));
    for _ in 0..reps {
        let t = Instant::now();
        let out = black_box(a());
        ba = (ba.0.min(t.elapsed()), out);
        let t = Instant::now();
        let out = black_box(b());
        bb = (bb.0.min(t.elapsed()), out);
    }
    (ba, bb)
}

/// Best of `reps` runs (the least disturbed by the rest of the machine).
fn best(reps: usize, mut f: impl FnMut() -> usize) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut out = 0;
    for _ in 0..reps {
        let t = Instant::now();
        out = black_box(f());
        best = best.min(t.elapsed());
    }
    (best, out)
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// A score stream with noise and two level shifts, so that detectors do
/// real work and fire now and then.
fn stream(n: usize) -> (Vec<f64>, Vec<i64>) {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let scores = (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let noise = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
            let level = match (i / 50_000) % 3 {
                0 => 0.92,
                1 => 0.80,
                _ => 0.88,
            };
            level + 0.05 * noise
        })
        .collect();
    let ts = (0..n as i64)
        .map(|i| 1_780_000_000_000 + i * 1000)
        .collect();
    (scores, ts)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let n = if quick { 1 << 16 } else { 1 << 20 };
    let reps = if quick { 2 } else { 15 };
    let (scores, ts) = stream(n);

    let cache = tempfile::tempdir().expect("temp dir");
    let runtime: &'static Runtime = Box::leak(Box::new(
        Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.path().to_path_buf()),
            ..RuntimeConfig::default()
        })
        .expect("runtime"),
    ));

    println!(
        "# strategy evaluation: per-point time, native vs WASM (best of {reps}, {n} points)\n"
    );
    println!("| detector | batch | native ns/pt | wasm ns/pt | wasm/native | verdicts |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: |");
    let cases = [
        Case {
            name: "baseline",
            builtin: "baseline",
            // A healthy stream for the baseline (it never fires): what is
            // measured is the boundary, not string formatting.
            config: r#"{"baseline": 0.85, "tolerance": 0.1}"#,
            native: native::<visutility_baseline::Baseline>,
        },
        Case {
            name: "page-hinkley",
            builtin: "page-hinkley",
            config: r#"{"threshold": 5.0}"#,
            native: native::<visutility_page_hinkley::PageHinkley>,
        },
        Case {
            name: "adwin",
            builtin: "adwin",
            config: "{}",
            native: native::<visutility_adwin::Adwin>,
        },
    ];
    // `-- --profile NAME [native] [--batch N]`: only NAME's WASM (or native)
    // path at batch N (default 1024) for ~5 s, to run under `perf record` (with
    // `VISUTILITY_PERFMAP=1` so that perf names the guest's functions).
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--profile") {
        let case = cases
            .iter()
            .find(|c| Some(c.name) == args.get(i + 1).map(String::as_str))
            .expect("--profile NAME");
        let native = args.get(i + 2).is_some_and(|a| a == "native");
        let batch = args
            .iter()
            .position(|a| a == "--batch")
            .and_then(|j| args.get(j + 1))
            .map_or(1024, |b| b.parse().expect("--batch N"));
        let component =
            StrategyComponent::load_with(runtime, &StrategySource::Builtin(case.builtin.into()))
                .expect("load");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if native {
                black_box((case.native)(case.config, &scores, &ts, batch));
            } else {
                black_box(wasm(&component, case.config, &scores, &ts, batch));
            }
        }
        return;
    }
    for case in &cases {
        let component =
            StrategyComponent::load_with(runtime, &StrategySource::Builtin(case.builtin.into()))
                .expect("load");
        for batch in [1usize, 64, 1024] {
            // One call per point is slow; fewer points keep the run short.
            let m = if batch == 1 { n / 8 } else { n };
            let (s, t) = (&scores[..m], &ts[..m]);
            let ((tn, vn), (tw, vw)) = best_pair(
                reps,
                || (case.native)(case.config, s, t, batch),
                || wasm(&component, case.config, s, t, batch),
            );
            assert_eq!(vn, vw, "{}: native and WASM verdicts differ", case.name);
            let per = |d: Duration| d.as_nanos() as f64 / m as f64;
            println!(
                "| {} | {batch} | {:.2} | {:.2} | {:.2}x | {vn} |",
                case.name,
                per(tn),
                per(tw),
                tw.as_secs_f64() / tn.as_secs_f64()
            );
        }
    }

    // The host's side of filling batches point by point, as ingestion does
    // from parsed snapshots (not part of the figures above, which copy
    // columns).
    let (tf, _) = best(reps, || {
        let mut points = PointBatch::new();
        let mut total = 0;
        for (s, t) in scores.chunks(1024).zip(ts.chunks(1024)) {
            points.clear();
            for (&score, &timestamp) in s.iter().zip(t) {
                points.push_score(score, timestamp);
            }
            total += black_box(&points).len();
        }
        total
    });
    println!(
        "\nfilling batches of 1024 point by point (as ingestion does): {:.2} ns/pt",
        tf.as_nanos() as f64 / n as f64
    );

    println!(
        "\n# what the sandbox costs: page-hinkley and adwin at batch 1024, per engine setting\n"
    );
    println!("| detector | setting | wasm ns/pt | wasm/native |");
    println!("| --- | --- | ---: | ---: |");
    let variants: [(&str, bool, bool); 4] = [
        (
            "default (fuel metering, no NaN canonicalisation)",
            true,
            false,
        ),
        (
            "fuel + NaN canonicalisation (`--canonicalize-nans`)",
            true,
            true,
        ),
        ("no fuel metering", false, false),
        ("NaN canonicalisation, no fuel metering", false, true),
    ];
    for case in &cases[1..] {
        for (label, fuel, nan) in variants {
            let rt: &'static Runtime = Box::leak(Box::new(
                Runtime::new(RuntimeConfig {
                    cache_dir: None,
                    fuel_metering: fuel,
                    nan_canonicalization: nan,
                    ..RuntimeConfig::default()
                })
                .expect("runtime"),
            ));
            let component =
                StrategyComponent::load_with(rt, &StrategySource::Builtin(case.builtin.into()))
                    .expect("load");
            let ((tn, _), (tw, _)) = best_pair(
                reps,
                || (case.native)(case.config, &scores, &ts, 1024),
                || wasm(&component, case.config, &scores, &ts, 1024),
            );
            println!(
                "| {} | {label} | {:.2} | {:.2}x |",
                case.name,
                tw.as_nanos() as f64 / n as f64,
                tw.as_secs_f64() / tn.as_secs_f64()
            );
        }
    }

    println!("\n# load and instantiation of builtin:baseline\n");
    let cold_rt: &'static Runtime = Box::leak(Box::new(
        Runtime::new(RuntimeConfig {
            cache_dir: Some(cache.path().join("cold")),
            ..RuntimeConfig::default()
        })
        .expect("runtime"),
    ));
    let source = StrategySource::Builtin("baseline".into());
    let cold = StrategyComponent::load_with(cold_rt, &source).expect("cold load");
    assert!(!cold.meta().from_cache);
    let (cached_time, _) = best(reps, || {
        let c = StrategyComponent::load_with(cold_rt, &source).expect("cached load");
        assert!(c.meta().from_cache);
        black_box(c.meta().load_time.as_nanos() as usize)
    });
    let cached = StrategyComponent::load_with(cold_rt, &source).expect("cached load");
    let (inst_time, _) = best(reps * 4, || {
        let i = cached
            .instantiate(r#"{"baseline": 0.9}"#, Limits::default())
            .expect("instantiate");
        black_box(i.info().name.len())
    });
    let compile = cold.meta().load_time;
    println!("| step | time | ratio |");
    println!("| --- | ---: | ---: |");
    println!(
        "| cold compile ({} KB component) | {:.1} ms | {:.0}x cache load |",
        cold.meta().size / 1024,
        ms(compile),
        compile.as_secs_f64() / cached_time.as_secs_f64()
    );
    println!(
        "| load from cache (reference) | {:.2} ms | 1x |",
        ms(cached_time)
    );
    println!(
        "| instantiate + describe + configure | {:.3} ms | {:.2}x cache load |",
        ms(inst_time),
        inst_time.as_secs_f64() / cached_time.as_secs_f64()
    );

    println!("\n# memory: 1,000 live monitors\n");
    println!("| strategy | RSS added | per monitor |");
    println!("| --- | ---: | ---: |");
    for (name, config) in [("baseline", r#"{"warmup": 10}"#), ("adwin", "{}")] {
        let component =
            StrategyComponent::load_with(runtime, &StrategySource::Builtin(name.into()))
                .expect("load");
        let before = rss_bytes();
        let mut monitors = Vec::with_capacity(1000);
        let mut points = PointBatch::new();
        for &s in &scores[..256] {
            points.push_score(s, 0);
        }
        for _ in 0..1000 {
            let mut inst = component
                .instantiate(config, Limits::default())
                .expect("instantiate");
            inst.evaluate("bench-model", &points).expect("evaluate");
            monitors.push(inst);
        }
        let added = rss_bytes().saturating_sub(before);
        println!(
            "| {name} | {:.1} MiB | {:.1} KiB |",
            added as f64 / (1 << 20) as f64,
            added as f64 / 1000.0 / 1024.0
        );
        drop(monitors);
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
