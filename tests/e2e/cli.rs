//! The CLI, as a user runs it.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{Env, Lcg, guest};

const MODELS: [&str; 3] = ["fraud-v1", "fraud-v2", "churn-7"];

struct Point {
    model: &'static str,
    score: f64,
    ts_ms: i64,
}

/// A seeded multi-model stream, written with both timestamp formats.
fn stream(env: &Env, n: usize, seed: u64) -> (std::path::PathBuf, Vec<Point>) {
    let mut rng = Lcg::new(seed);
    let mut text = String::new();
    let mut points = Vec::new();
    let t0: i64 = 1_780_000_000_000;
    for i in 0..n {
        let model = MODELS[(rng.next_f64() * 3.0) as usize];
        let score = 0.7 + 0.3 * rng.next_f64();
        let ts_ms = t0 + i as i64 * 1000;
        let line = if i % 2 == 0 {
            serde_json::json!({"model_version": model, "score": score, "timestamp": ts_ms, "loss": 1.0 - score})
        } else {
            let ts = visutility_host::format_timestamp(visutility_host::ms_to_system_time(ts_ms));
            serde_json::json!({"model_version": model, "score": score, "timestamp": ts})
        };
        text.push_str(&line.to_string());
        text.push('\n');
        if i % 97 == 0 {
            text.push('\n'); // blank lines are skipped
        }
        points.push(Point {
            model,
            score,
            ts_ms,
        });
    }
    (env.write("stream.ndjson", text), points)
}

fn signals(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect()
}

fn check_against_rule(out: &[Value], points: &[Point], expected: impl Fn(usize) -> bool) {
    let want: Vec<usize> = (0..points.len()).filter(|&i| expected(i)).collect();
    let got: Vec<usize> = out
        .iter()
        .map(|s| s["index"].as_u64().unwrap() as usize)
        .collect();
    assert_eq!(got, want, "fired indices differ from the rule");
    assert!(!want.is_empty(), "the stream must exercise the rule");
    for s in out {
        let obj = s.as_object().unwrap();
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "index",
                "kind",
                "model_version",
                "reason",
                "score",
                "timestamp"
            ]
        );
        let p = &points[s["index"].as_u64().unwrap() as usize];
        assert_eq!(s["model_version"], p.model);
        assert_eq!(s["kind"], "retrain");
        assert_eq!(s["score"].as_f64().unwrap(), p.score);
        assert_eq!(s["timestamp"].as_i64().unwrap(), p.ts_ms);
        assert!(s["reason"].as_str().unwrap().contains("below baseline"));
    }
}

#[test]
fn replay_of_fixed_baseline_matches_the_seed_rule_point_by_point() {
    let env = Env::new();
    let (input, points) = stream(&env, 5000, 7);
    let run = env.run(&[
        "replay",
        "--strategy",
        "builtin:baseline",
        "--config",
        r#"{"baseline": 0.9, "tolerance": 0.05}"#,
        "--input",
        input.to_str().unwrap(),
    ]);
    run.ok();
    check_against_rule(&signals(&run.stdout), &points, |i| {
        points[i].score + 0.05 < 0.9
    });
    assert!(
        run.stderr.contains("replayed 5000 snapshots of 3 model(s)"),
        "{}",
        run.stderr
    );
}

#[test]
fn replay_with_model_filter_and_output_file() {
    let env = Env::new();
    let (input, points) = stream(&env, 2000, 11);
    env.write(
        "cfg.json",
        r#"{"baseline": 0.95, "tolerance": 0.1, "model_version": "fraud-v2"}"#,
    );
    env.run(&[
        "replay",
        "-s",
        "builtin:baseline",
        "-c",
        "@cfg.json",
        "-i",
        input.to_str().unwrap(),
        "-o",
        "out.ndjson",
    ])
    .ok();
    let out = std::fs::read_to_string(env.path("out.ndjson")).unwrap();
    check_against_rule(&signals(&out), &points, |i| {
        points[i].model == "fraud-v2" && points[i].score + 0.1 < 0.95
    });
}

#[test]
fn replay_with_warmup_learns_each_models_baseline() {
    let env = Env::new();
    let (input, points) = stream(&env, 3000, 3);
    let run = env.run(&[
        "replay",
        "-s",
        "builtin:baseline",
        "-c",
        r#"{"warmup": 10, "tolerance": 0.02}"#,
        "-i",
        input.to_str().unwrap(),
    ]);
    run.ok();
    // The rule, computed here the same way: the mean of each model's first 10
    // scores is its baseline.
    let mut seen = std::collections::HashMap::<&str, (u32, f64, Option<f64>)>::new();
    let mut fire = vec![false; points.len()];
    for (i, p) in points.iter().enumerate() {
        let e = seen.entry(p.model).or_insert((0, 0.0, None));
        match e.2 {
            None => {
                e.0 += 1;
                e.1 += p.score;
                if e.0 == 10 {
                    e.2 = Some(e.1 / 10.0);
                }
            }
            Some(b) => fire[i] = p.score + 0.02 < b,
        }
    }
    check_against_rule(&signals(&run.stdout), &points, |i| fire[i]);
}

#[test]
fn replay_from_stdin_works() {
    let env = Env::new();
    let input =
        "{\"model_version\":\"m\",\"score\":0.5}\n{\"model_version\":\"m\",\"score\":0.99}\n";
    let mut child = env
        .cmd()
        .args([
            "replay",
            "-s",
            "builtin:baseline",
            "-c",
            r#"{"baseline":0.9}"#,
            "-i",
            "-",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines = signals(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["index"], 0);
}

#[test]
fn malformed_lines_stop_the_replay_with_the_line_number() {
    let env = Env::new();
    let good = r#"{"model_version":"m","score":0.1}"#;
    let cases = [
        (
            r#"{"model_version":"m","scroe":0.5}"#,
            "unknown field `scroe`",
        ),
        (
            r#"{"model_version":"m","score":NaN}"#,
            "expected value at column 30",
        ),
        (r#"{"model_version":"m","score":"0.5"}"#, "invalid type"),
        (
            r#"{"model_version":"m","score":0.5,"timestamp":"yesterday"}"#,
            "not RFC 3339",
        ),
        (
            r#"{"model_version":"m","score":0.5,"metrics":{"psi":"x"}}"#,
            "invalid type",
        ),
        (r#"{"score":0.5}"#, "missing field `model_version`"),
        (r#"not json"#, "expected"),
    ];
    for (bad, needle) in cases {
        let input = env.write("bad.ndjson", format!("{good}\n{good}\n{bad}\n{good}\n"));
        let run = env.run(&[
            "replay",
            "-s",
            "builtin:baseline",
            "-c",
            r#"{"baseline":0.9}"#,
            "-i",
            input.to_str().unwrap(),
        ]);
        run.fails_with(2, needle);
        assert!(
            run.stderr.contains("bad.ndjson:3:"),
            "line number missing: {}",
            run.stderr
        );
        assert!(
            run.stdout.is_empty(),
            "nothing may be printed as if it succeeded: {}",
            run.stdout
        );
    }
}

#[test]
fn bad_strategy_files_say_what_is_wrong() {
    let env = Env::new();
    let input = env.write("in.ndjson", "{\"model_version\":\"m\",\"score\":0.5}\n");
    let baseline = visutility_host::runtime::builtin::get("baseline").unwrap();
    let next = guest("wit-next");
    let cases: Vec<(String, &str)> = vec![
        (
            env.write("random.wasm", b"\x13\x37not wasm at all")
                .display()
                .to_string(),
            "not a WebAssembly binary",
        ),
        (
            env.write("core.wasm", b"\0asm\x01\0\0\0")
                .display()
                .to_string(),
            "is a core WebAssembly module, not a component",
        ),
        (
            env.write("truncated.wasm", &baseline[..baseline.len() / 2])
                .display()
                .to_string(),
            "is not a valid component",
        ),
        (
            env.write("empty-component.wasm", b"\0asm\x0d\0\x01\0")
                .display()
                .to_string(),
            "targets another world",
        ),
        (guest("wrong-world").to_string(), "targets another world"),
        (
            next.to_string(),
            "built against `visutility:strategy@0.2.0` but this host speaks `visutility:strategy@0.1.0`",
        ),
        (
            env.path("missing.wasm").display().to_string(),
            "cannot read strategy",
        ),
        (
            "builtin:nope".to_string(),
            "unknown strategy `builtin:nope`; bundled strategies: adwin, baseline, bocpd, cusum, ewma, page-hinkley",
        ),
    ];
    for (strategy, needle) in cases {
        env.run(&["replay", "-s", &strategy, "-i", input.to_str().unwrap()])
            .fails_with(2, needle);
        env.run(&["inspect", &strategy]).fails_with(2, needle);
    }
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let env = Env::new();
    let input = env.write("in.ndjson", "{\"model_version\":\"m\",\"score\":0.5}\n");
    let run = env.run(&[
        "replay",
        "-s",
        "builtin:baseline",
        "-c",
        r#"{"baseline":0.9,"tolerence":1}"#,
        "-i",
        input.to_str().unwrap(),
    ]);
    run.fails_with(2, "unknown field `tolerence`");
    env.run(&["validate", "builtin:baseline", "-c", "{}"])
        .fails_with(2, "set `baseline`");
    env.run(&["validate", "builtin:baseline", "-c", r#"{"warmup": 5}"#])
        .ok();
}

#[test]
fn inspect_describes_the_bundled_baseline() {
    let env = Env::new();
    let run = env.run(&["inspect", "builtin:baseline"]);
    run.ok();
    for needle in [
        "name:         baseline",
        "visutility:strategy@0.1.0",
        "wasi:cli/",
        "\"warmup\"",
        "sha256:",
    ] {
        assert!(
            run.stdout.contains(needle),
            "inspect lacks {needle:?}:\n{}",
            run.stdout
        );
    }
    let json: Value = serde_json::from_str(
        &env.run(&["inspect", "builtin:baseline", "--json"])
            .ok()
            .stdout,
    )
    .unwrap();
    assert_eq!(json["name"], "baseline");
    assert_eq!(json["wit_version"], "0.1.0");
    assert_eq!(
        json["size"].as_u64().unwrap() as usize,
        visutility_host::runtime::builtin::get("baseline")
            .unwrap()
            .len()
    );
    assert!(json["imports"].as_array().unwrap().iter().all(|i| {
        let i = i.as_str().unwrap();
        i.starts_with("wasi:io/")
            || i.starts_with("wasi:cli/")
            || i.starts_with("visutility:strategy/")
    }));
    assert_eq!(json["config_schema"]["additionalProperties"], false);
}

#[test]
fn inspect_and_replay_a_freshly_built_strategy() {
    let env = Env::new();
    let path = guest("threshold");
    let run = env.run(&["inspect", path]);
    run.ok();
    assert!(
        run.stdout.contains("name:         threshold"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("version:      0.3.1"), "{}", run.stdout);
    assert!(
        run.stdout.contains("visutility:strategy/host@0.1.0"),
        "it logs, so it imports the host: {}",
        run.stdout
    );

    // Named metrics reach the strategy; points without the metric are healthy.
    let input = env.write(
        "m.ndjson",
        [
            r#"{"model_version":"m","score":0.9,"metrics":{"psi":0.05}}"#,
            r#"{"model_version":"m","score":0.9,"metrics":{"psi":0.15}}"#,
            r#"{"model_version":"m","score":0.9}"#,
            r#"{"model_version":"m","score":0.9,"metrics":{"psi":0.25,"kl":9}}"#,
        ]
        .join("\n"),
    );
    let run = env.run(&[
        "replay",
        "-s",
        path,
        "-c",
        r#"{"watch":"psi","warn_above":0.1,"retrain_above":0.2}"#,
        "-i",
        input.to_str().unwrap(),
    ]);
    run.ok();
    let out = signals(&run.stdout);
    let got: Vec<(u64, &str)> = out
        .iter()
        .map(|s| (s["index"].as_u64().unwrap(), s["kind"].as_str().unwrap()))
        .collect();
    assert_eq!(got, vec![(1, "warn"), (3, "retrain")]);
    assert!(
        out[1]["reason"]
            .as_str()
            .unwrap()
            .contains("psi 0.25 > 0.2")
    );
}

#[test]
fn runaway_strategies_end_with_an_error_naming_the_strategy_and_cause() {
    let env = Env::new();
    let input = env.write(
        "in.ndjson",
        "{\"model_version\":\"m\",\"score\":0.5}\n".repeat(3),
    );
    let hostile = guest("hostile");
    let cases = [
        (
            r#"{"mode":"loop"}"#,
            vec!["--fuel", "50000000"],
            "out of fuel",
        ),
        (
            r#"{"mode":"loop"}"#,
            vec!["--fuel", "100000000000000", "--deadline", "300ms"],
            "deadline of 300ms exceeded",
        ),
        (
            r#"{"mode":"panic","at":1}"#,
            vec![],
            "trap: wasm `unreachable` instruction executed; the guest panicked at tests/guests/hostile/src/lib.rs",
        ),
        (r#"{"mode":"grow"}"#, vec![], "memory cap exceeded"),
        (r#"{"mode":"recurse"}"#, vec![], "stack overflow"),
    ];
    for (config, extra, needle) in cases {
        let started = Instant::now();
        let mut args = vec![
            "replay",
            "-s",
            hostile,
            "-c",
            config,
            "-i",
            input.to_str().unwrap(),
        ];
        args.extend(extra);
        let run = env.run(&args);
        run.fails_with(1, needle);
        assert!(
            run.stderr.contains("strategy `") && run.stderr.contains("hostile"),
            "{}",
            run.stderr
        );
        assert!(
            run.stderr.contains("failed in `evaluate`"),
            "{}",
            run.stderr
        );
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{config} took {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn strategies_lists_the_bundled_baseline() {
    let env = Env::new();
    let run = env.run(&["strategies"]);
    run.ok();
    assert!(run.stdout.contains("builtin:baseline"), "{}", run.stdout);
    assert!(run.stdout.contains("tolerance"), "{}", run.stdout);
}

#[test]
fn demo_shows_snapshots_and_a_retrain_signal_quickly() {
    let env = Env::new();
    let started = Instant::now();
    let run = env.run(&["demo"]);
    let took = started.elapsed();
    run.ok();
    assert!(took < Duration::from_secs(10), "demo took {took:?}");
    let snapshot_lines: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.contains("] Model=churn-model-v3 Score="))
        .collect();
    assert_eq!(snapshot_lines.len(), 60, "{}", run.stdout);
    // `[2026-12-03T18:40:00.000Z] Model=...`: RFC 3339 time.
    let ts = &snapshot_lines[0][1..snapshot_lines[0].find(']').unwrap()];
    assert!(humantime::parse_rfc3339(ts).is_ok(), "not RFC 3339: {ts}");
    assert!(
        run.stdout.contains(">>> RETRAIN SIGNAL #1"),
        "{}",
        run.stdout
    );
    assert!(
        !run.stdout.contains("RETRAIN SIGNAL #2"),
        "the cooldown must prevent a storm:\n{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("suppressed by the cooldown"),
        "{}",
        run.stdout
    );
}

#[test]
fn every_subcommand_has_help() {
    let env = Env::new();
    for sub in ["demo", "replay", "inspect", "validate", "strategies"] {
        let run = env.run(&[sub, "--help"]);
        run.ok();
        assert!(
            run.stdout.contains("Usage: visutility"),
            "{sub}: {}",
            run.stdout
        );
    }
}

#[test]
fn long_replays_keep_indices_across_parse_chunks_and_locate_late_errors() {
    let env = Env::new();
    // 40,000 lines: several parallel parsing work items.
    let (input, points) = stream(&env, 40_000, 21);
    let run = env.run(&[
        "replay",
        "-s",
        "builtin:baseline",
        "-c",
        r#"{"baseline": 0.8, "tolerance": 0.05}"#,
        "-i",
        input.to_str().unwrap(),
    ]);
    run.ok();
    check_against_rule(&signals(&run.stdout), &points, |i| {
        points[i].score + 0.05 < 0.8
    });

    let mut text = std::fs::read_to_string(&input).unwrap();
    // Blank lines were added every 97 points: find the 35,000th line and break it.
    let offset = text.match_indices('\n').nth(34_998).unwrap().0 + 1;
    text.insert_str(offset, "{\"model_version\":\"m\",\"score\":\"high\"}\n");
    let bad = env.write("late-error.ndjson", text);
    let run = env.run(&[
        "replay",
        "-s",
        "builtin:baseline",
        "-c",
        r#"{"baseline": 0.8}"#,
        "-i",
        bad.to_str().unwrap(),
    ]);
    run.fails_with(2, "late-error.ndjson:35000: invalid type");
    assert!(
        run.stdout.is_empty(),
        "no output before the whole input is valid"
    );
}
