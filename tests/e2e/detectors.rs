//! The bundled detector library through the real CLI and `.wasm`.

use std::path::Path;

use serde_json::Value;

use crate::util::Env;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/river").join(name).display().to_string()
}

fn replay(env: &Env, strategy: &str, config: &str, input: &str) -> Vec<Value> {
    let run = env.run(&["replay", "-s", strategy, "-c", config, "-i", input]);
    run.ok();
    run.stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn every_detector_catches_the_abrupt_drop_soon_after_it_happens() {
    let env = Env::new();
    // 1000 points around 0.90 (σ 0.02), then 1000 around 0.75.
    for (strategy, config, max_delay) in [
        ("builtin:cusum", r#"{"warmup": 200, "h": 8}"#, 10),
        ("builtin:ewma", r#"{"warmup": 200, "L": 3.5, "warn_L": null}"#, 10),
        ("builtin:bocpd", "{}", 15),
        ("builtin:page-hinkley", r#"{"threshold": 2.0}"#, 20),
        ("builtin:adwin", "{}", 64),
    ] {
        let out = replay(&env, strategy, config, &fixture("abrupt_drop.ndjson"));
        let retrains: Vec<u64> =
            out.iter().filter(|s| s["kind"] == "retrain").map(|s| s["index"].as_u64().unwrap()).collect();
        let first = *retrains.first().unwrap_or_else(|| panic!("{strategy} never fired"));
        assert!((1000..1000 + max_delay).contains(&first), "{strategy}: first retrain at {first}: {retrains:?}");
        let reason = out.iter().find(|s| s["kind"] == "retrain").unwrap()["reason"].as_str().unwrap().to_string();
        assert!(reason.contains('>') && reason.chars().any(|c| c.is_ascii_digit()), "{strategy}: {reason}");
    }
}

#[test]
fn detectors_watch_loss_or_a_named_metric() {
    let env = Env::new();
    let mut lines = String::new();
    for i in 0..400 {
        let drift = if i < 200 { 0.1 } else { 0.6 };
        lines.push_str(&format!(
            "{{\"model_version\":\"m\",\"score\":0.9,\"loss\":{},\"metrics\":{{\"psi\":{}}}}}\n",
            0.2 + 0.001 * (i % 3) as f64,
            drift + 0.001 * (i % 5) as f64
        ));
    }
    let input = env.write("metrics.ndjson", lines);
    let input = input.to_str().unwrap();
    let on_psi = replay(&env, "builtin:cusum", r#"{"watch": "metrics.psi", "warmup": 50}"#, input);
    assert_eq!(on_psi.first().map(|s| s["index"].as_u64().unwrap()), Some(200), "{on_psi:?}");
    assert!(on_psi[0]["reason"].as_str().unwrap().contains("metrics.psi"));
    // The score and the loss are flat: nothing fires on them.
    assert!(replay(&env, "builtin:cusum", r#"{"watch": "loss", "warmup": 50}"#, input).is_empty());
    assert!(replay(&env, "builtin:ewma", r#"{"warmup": 50}"#, input).is_empty());
    let missing = replay(&env, "builtin:bocpd", r#"{"watch": "metrics.absent"}"#, input);
    assert!(missing.is_empty(), "points without the metric are skipped: {missing:?}");
}

#[test]
fn bocpd_handles_a_100k_point_stream() {
    let env = Env::new();
    let mut text = String::with_capacity(100_000 * 40);
    let mut x: u64 = 12345;
    for i in 0..100_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let level = if i < 60_000 { 0.9 } else { 0.8 };
        let v = level + 0.02 * ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5);
        text.push_str(&format!("{{\"model_version\":\"m\",\"score\":{v}}}\n"));
    }
    let input = env.write("long.ndjson", text);
    let out = replay(&env, "builtin:bocpd", "{}", input.to_str().unwrap());
    let hits: Vec<u64> = out.iter().map(|s| s["index"].as_u64().unwrap()).collect();
    assert!(hits.iter().any(|&i| (60_000..60_020).contains(&i)), "{hits:?}");
    assert!(hits.len() <= 10, "too many false alarms: {hits:?}");
}

#[test]
fn strategies_lists_the_whole_library() {
    let env = Env::new();
    let run = env.run(&["strategies"]);
    run.ok();
    for name in ["adwin", "baseline", "bocpd", "cusum", "ewma", "page-hinkley"] {
        assert!(run.stdout.contains(&format!("builtin:{name}")), "{name} missing:\n{}", run.stdout);
    }
}
