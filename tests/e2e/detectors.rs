//! The bundled detector library through the real CLI and `.wasm`.

use std::path::Path;

use serde_json::Value;

use crate::util::Env;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/river")
        .join(name)
        .display()
        .to_string()
}

fn replay(env: &Env, strategy: &str, config: &str, input: &str) -> Vec<Value> {
    let run = env.run(&["replay", "-s", strategy, "-c", config, "-i", input]);
    run.ok();
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn every_detector_catches_the_abrupt_drop_soon_after_it_happens() {
    let env = Env::new();
    // 1000 points around 0.90 (σ 0.02), then 1000 around 0.75.
    for (strategy, config, max_delay) in [
        ("builtin:cusum", r#"{"warmup": 200, "h": 8}"#, 10),
        (
            "builtin:ewma",
            r#"{"warmup": 200, "L": 3.5, "warn_L": null}"#,
            10,
        ),
        ("builtin:bocpd", "{}", 15),
        ("builtin:page-hinkley", r#"{"threshold": 2.0}"#, 20),
        ("builtin:adwin", "{}", 64),
    ] {
        let out = replay(&env, strategy, config, &fixture("abrupt_drop.ndjson"));
        let retrains: Vec<u64> = out
            .iter()
            .filter(|s| s["kind"] == "retrain")
            .map(|s| s["index"].as_u64().unwrap())
            .collect();
        let first = *retrains
            .first()
            .unwrap_or_else(|| panic!("{strategy} never fired"));
        assert!(
            (1000..1000 + max_delay).contains(&first),
            "{strategy}: first retrain at {first}: {retrains:?}"
        );
        let reason = out.iter().find(|s| s["kind"] == "retrain").unwrap()["reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            reason.contains('>') && reason.chars().any(|c| c.is_ascii_digit()),
            "{strategy}: {reason}"
        );
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
    let on_psi = replay(
        &env,
        "builtin:cusum",
        r#"{"watch": "metrics.psi", "warmup": 50}"#,
        input,
    );
    assert_eq!(
        on_psi.first().map(|s| s["index"].as_u64().unwrap()),
        Some(200),
        "{on_psi:?}"
    );
    assert!(
        on_psi[0]["reason"]
            .as_str()
            .unwrap()
            .contains("metrics.psi")
    );
    // The score and the loss are flat: nothing fires on them.
    assert!(
        replay(
            &env,
            "builtin:cusum",
            r#"{"watch": "loss", "warmup": 50}"#,
            input
        )
        .is_empty()
    );
    assert!(replay(&env, "builtin:ewma", r#"{"warmup": 50}"#, input).is_empty());
    let missing = replay(
        &env,
        "builtin:bocpd",
        r#"{"watch": "metrics.absent"}"#,
        input,
    );
    assert!(
        missing.is_empty(),
        "points without the metric are skipped: {missing:?}"
    );
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
    assert!(
        hits.iter().any(|&i| (60_000..60_020).contains(&i)),
        "{hits:?}"
    );
    assert!(hits.len() <= 10, "too many false alarms: {hits:?}");
}

#[test]
fn strategies_lists_the_whole_library() {
    let env = Env::new();
    let run = env.run(&["strategies"]);
    run.ok();
    for name in [
        "adwin",
        "baseline",
        "bocpd",
        "cusum",
        "ewma",
        "page-hinkley",
    ] {
        assert!(
            run.stdout.contains(&format!("builtin:{name}")),
            "{name} missing:\n{}",
            run.stdout
        );
    }
}

#[test]
fn replay_compare_lists_both_strategies_and_pairs_their_detections() {
    let env = Env::new();
    let input = fixture("abrupt_drop.ndjson");
    let indices = |strategy: &str| -> Vec<u64> {
        let run = env.run(&["replay", "-s", strategy, "-i", &input]);
        run.ok();
        run.stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["index"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    };
    let (ph, adwin) = (indices("builtin:page-hinkley"), indices("builtin:adwin"));
    assert!(!ph.is_empty() && !adwin.is_empty());
    let gap = ph[0].abs_diff(adwin[0]);
    let out = env.path("both.ndjson").display().to_string();
    let tolerance = (gap + 1).to_string();
    let run = env.run(&[
        "replay",
        "--compare",
        "builtin:page-hinkley",
        "builtin:adwin",
        "-i",
        &input,
        "--tolerance",
        &tolerance,
        "--output",
        &out,
    ]);
    run.ok();
    let join = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
    assert!(
        run.stdout.contains(&format!(
            "A  builtin:page-hinkley (page-hinkley 0.1.0): {} retrain",
            ph.len()
        )),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("   retrain at: {}", join(&ph))),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("   retrain at: {}", join(&adwin))),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains(&format!(
            "first retrain: A at {}, B at {} ({:+} snapshots)",
            ph[0],
            adwin[0],
            adwin[0] as i64 - ph[0] as i64
        )),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("agreement: 1 of"), "{}", run.stdout);
    // Both signal lists, tagged.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let tagged = |tag: &str| {
        lines
            .iter()
            .filter(|l| l["strategy"] == tag)
            .map(|l| l["index"].as_u64().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(tagged("A"), ph);
    assert_eq!(tagged("B"), adwin);
    // A tighter window pairs nothing.
    let run = env.run(&[
        "replay",
        "--compare",
        "builtin:page-hinkley",
        "builtin:adwin",
        "-i",
        &input,
        "--tolerance",
        "0",
    ]);
    assert!(
        run.ok().stdout.contains("delay: no paired detections") || ph[0] == adwin[0],
        "{}",
        run.stdout
    );
    // Bad use is refused.
    env.run(&["replay", "--compare", "builtin:adwin", "-i", &input])
        .fails_with(2, "2 values required");
    env.run(&[
        "replay",
        "--compare",
        "builtin:adwin",
        "builtin:nope",
        "-i",
        &input,
    ])
    .fails_with(2, "unknown strategy `builtin:nope`");
}
