//! Hostile strategies: contained, named, and unable to reach the host.

use std::time::{Duration, Instant};

use visutility_host::Limits;
use visutility_host::runtime::{PointBatch, StrategyComponent, StrategyFault, StrategySource};

use crate::util::{Env, guest};

fn input(env: &Env, n: usize) -> String {
    let text: String = (0..n)
        .map(|i| {
            format!(
                "{{\"model_version\":\"m\",\"score\":0.9,\"timestamp\":{}}}\n",
                1_780_000_000_000i64 + i as i64 * 1000
            )
        })
        .collect();
    env.write("in.ndjson", text).display().to_string()
}

#[test]
fn an_infinite_loop_in_configure_ends_with_an_error_naming_the_call() {
    let env = Env::new();
    let started = Instant::now();
    let run = env.run(&[
        "replay",
        "-s",
        guest("hostile"),
        "-c",
        r#"{"mode":"configure-loop"}"#,
        "-i",
        &input(&env, 1),
        "--fuel",
        "50000000",
    ]);
    run.fails_with(2, "failed in `configure`: out of fuel");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn log_and_output_spam_is_capped_and_counted() {
    let env = Env::new();
    for (mode, needle) in [
        ("log-spam", "log line(s) over the per-call limit"),
        ("print-spam", "byte(s) of stdout/stderr over the cap"),
    ] {
        let run = env.run(&[
            "replay",
            "-s",
            guest("hostile"),
            "-c",
            &format!(r#"{{"mode":"{mode}"}}"#),
            "-i",
            &input(&env, 2),
        ]);
        run.ok();
        assert!(run.stderr.contains(needle), "{mode}: {}", run.stderr);
        assert!(
            run.stderr.len() < 200_000,
            "{mode}: {} bytes of stderr reached the host's log",
            run.stderr.len()
        );
    }
}

#[test]
fn huge_reasons_are_truncated_and_a_verdict_per_point_is_fine() {
    let env = Env::new();
    let run = env.run(&[
        "replay",
        "-s",
        guest("hostile"),
        "-c",
        r#"{"mode":"huge-reason"}"#,
        "-i",
        &input(&env, 3),
    ]);
    run.ok();
    let lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(lines.len(), 3);
    assert!(
        lines
            .iter()
            .all(|l| l.len() < 5000 && l.contains("more bytes truncated")),
        "{}",
        &lines[0][..200]
    );
    let run = env.run(&[
        "replay",
        "-s",
        guest("hostile"),
        "-c",
        r#"{"mode":"every-point"}"#,
        "-i",
        &input(&env, 3000),
    ]);
    run.ok();
    assert_eq!(run.stdout.lines().count(), 3000);
}

#[test]
fn oversized_saved_state_is_refused() {
    let component =
        StrategyComponent::load(&StrategySource::File(guest("hostile").into())).unwrap();
    // Room for the 17 MiB state and its serialised copies: what is tested is
    // the host's cap on saved state, not the memory cap.
    let limits = Limits {
        memory_bytes: 256 << 20,
        ..Limits::default()
    };
    let mut inst = component
        .instantiate(r#"{"mode":"huge-state"}"#, limits)
        .unwrap();
    let mut b = PointBatch::new();
    b.push_score(0.9, 0);
    inst.evaluate("m", &b).unwrap();
    let err = inst.save("m").unwrap_err();
    assert!(
        matches!(err.fault, StrategyFault::Contract(ref m) if m.contains("exceeds the cap")),
        "{err}"
    );
}

#[test]
fn environment_clock_and_randomness_reveal_nothing_and_replays_are_byte_identical() {
    let env = Env::new();
    let path = input(&env, 2500);
    let first = env.run(&[
        "replay",
        "-s",
        guest("hostile"),
        "-c",
        r#"{"mode":"snoop"}"#,
        "-i",
        &path,
    ]);
    first.ok();
    let second = env.run(&[
        "replay",
        "-s",
        guest("hostile"),
        "-c",
        r#"{"mode":"snoop"}"#,
        "-i",
        &path,
    ]);
    second.ok();
    assert_eq!(first.stdout, second.stdout, "replay must be deterministic");
    let line: serde_json::Value =
        serde_json::from_str(first.stdout.lines().next().unwrap()).unwrap();
    let reason = line["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("env=0 args=0 "),
        "the guest saw the host's environment: {reason}"
    );
    assert!(reason.contains("home=None"), "{reason}");
    // The wall clock is virtual: the newest snapshot timestamp of the batch.
    let now: i64 = reason
        .split("now_ms=")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1_780_000_000_000..1_780_000_000_000 + 2_500_000).contains(&now),
        "{reason}"
    );
}

#[test]
fn canonicalize_nans_makes_nan_bits_canonical_and_replays_stay_identical_without_it() {
    let env = Env::new();
    let path = input(&env, 64);
    let nan_bits = |extra: &[&str]| {
        let mut args = vec![
            "replay",
            "-s",
            guest("hostile"),
            "-c",
            r#"{"mode":"nan-bits"}"#,
            "-i",
            &path,
        ];
        args.extend_from_slice(extra);
        let run = env.run(&args);
        run.ok();
        let line: serde_json::Value =
            serde_json::from_str(run.stdout.lines().next().expect("a verdict")).unwrap();
        (line["reason"].as_str().unwrap().to_string(), run.stdout)
    };
    let (canonical, _) = nan_bits(&["--canonicalize-nans"]);
    assert_eq!(
        canonical, "nan_bits=7ff8000000000000",
        "the canonical quiet NaN"
    );
    // Off (the default), a run is still byte-identical to the next one.
    let (plain, first) = nan_bits(&[]);
    let (_, second) = nan_bits(&[]);
    assert_eq!(first, second);
    // x86-64 computes 0/0 as the negative "indefinite" NaN: the bits
    // canonicalisation exists to hide across architectures.
    #[cfg(target_arch = "x86_64")]
    assert_eq!(plain, "nan_bits=fff8000000000000");
    let _ = plain;
}

#[test]
fn files_sockets_and_foreign_wit_versions_are_refused_at_load() {
    let env = Env::new();
    let path = input(&env, 1);
    let run = env.run(&["replay", "-s", guest("escape"), "-i", &path]);
    run.fails_with(2, "which the sandbox does not grant");
    assert!(
        run.stderr.contains("wasi:filesystem") || run.stderr.contains("wasi:sockets"),
        "{}",
        run.stderr
    );
    env.run(&["replay", "-s", guest("wit-old"), "-i", &path])
        .fails_with(2, "built against `visutility:strategy@0.0.1` but this host speaks `visutility:strategy@0.1.0`");
}
