//! Detections identical to River 0.26 (`river.drift.PageHinkley`,
//! `river.drift.ADWIN`) on committed seeded streams, through the real CLI and
//! the real `.wasm`. Fixtures: `tests/fixtures/river/generate.py`.

use std::path::Path;

use serde_json::Value;

use crate::util::Env;

#[test]
fn page_hinkley_and_adwin_detect_exactly_where_river_does() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/river");
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    assert_eq!(expected["river_version"], "0.26.0");
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 40);
    let env = Env::new();
    let mut mismatches = Vec::new();
    let mut fired = 0;
    for case in cases {
        let stream = dir.join(format!("{}.ndjson", case["stream"].as_str().unwrap()));
        let detector = case["detector"].as_str().unwrap();
        let config = case["config"].to_string();
        let run = env.run(&[
            "replay",
            "--strategy",
            &format!("builtin:{detector}"),
            "--config",
            &config,
            "--input",
            stream.to_str().unwrap(),
        ]);
        run.ok();
        let got: Vec<u64> = run
            .stdout
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["index"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        let want: Vec<u64> = case["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        fired += usize::from(!want.is_empty());
        if got != want {
            mismatches.push(format!(
                "{} {detector} {config}: river {want:?}, ours {got:?}",
                case["stream"]
            ));
        }
    }
    assert!(
        mismatches.is_empty(),
        "detections differ from River:\n{}",
        mismatches.join("\n")
    );
    assert!(fired >= 25, "the fixtures must exercise detections");
}
