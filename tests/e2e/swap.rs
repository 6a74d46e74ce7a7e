//! Hot swap through the API: validation, state migration, rollback (by hand
//! and automatic), the swap record, and zero loss across swaps under load.

use std::time::Duration;

use serde_json::Value;

use crate::service::{Server, http_with, metric, snap, wait_for};
use crate::util::Env;

const TOKEN: &str = "swap-token";

fn builtin(name: &str) -> Vec<u8> {
    visutility_host::runtime::builtin::get(name)
        .unwrap()
        .to_vec()
}

/// The same component with a custom section appended: other bytes (another
/// SHA-256), the same code, so it accepts the original's state.
fn rebuilt(component: &[u8]) -> Vec<u8> {
    let mut out = component.to_vec();
    let (name, payload) = (b"visutility-test", b"v2");
    out.push(0); // custom section
    out.push((1 + name.len() + payload.len()) as u8);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(payload);
    out
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

fn put(
    server: &Server,
    monitor: &str,
    query: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/wasm")];
    if let Some(a) = &auth {
        headers.push(("Authorization", a));
    }
    let (status, text) = http_with(
        server.addr,
        "PUT",
        &format!("/v1/monitors/{monitor}/strategy{query}"),
        &headers,
        body,
    );
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn serving(server: &Server, monitor: &str) -> String {
    server.get_json(&format!("/v1/monitors/{monitor}"))["strategy"]["sha256"]
        .as_str()
        .unwrap()
        .to_string()
}

fn start(env: &Env, strategy_file: &str, extra: &str) -> Server {
    Server::start(
        env,
        &format!(
            "[[monitor]]\nname = \"m\"\nstrategy = \"{strategy_file}\"\nrestart_backoff = \"10ms\"\n{extra}\n"
        ),
        &[("VISUTILITY_ADMIN_TOKEN", TOKEN)],
    )
}

fn post_points(server: &Server, n: usize, score: f64) {
    let lines: Vec<String> = (0..n).map(|_| snap("a", score)).collect();
    assert_eq!(server.post_ndjson(&lines).0, 202);
}

#[test]
fn swaps_are_validated_move_state_and_roll_back() {
    let env = Env::new();
    let ph = builtin("page-hinkley");
    let ph2 = rebuilt(&ph);
    let path = env.write("ph.wasm", &ph);
    let server = start(&env, path.to_str().unwrap(), "");
    post_points(&server, 100, 0.9);
    wait_for("100 evaluated", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 100.0).then_some(())
    });
    assert_eq!(serving(&server, "m"), sha256(&ph));

    // Refused: no token, not a component, a candidate that fails its dry run.
    assert_eq!(put(&server, "m", "", None, &ph2).0, 401);
    assert_eq!(put(&server, "m", "", Some("wrong"), &ph2).0, 401);
    let (status, body) = put(&server, "m", "", Some(TOKEN), b"not wasm at all");
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("not a WebAssembly binary"),
        "{body}"
    );
    let hostile = std::fs::read(crate::util::guest("hostile")).unwrap();
    let (status, body) = put(
        &server,
        "m",
        "?config=%7B%22mode%22%3A%22panic%22%7D",
        Some(TOKEN),
        &hostile,
    );
    assert_eq!(status, 422, "{body}");
    let reason = body["error"].as_str().unwrap();
    assert!(
        reason.contains("dry run on") && reason.contains("panicked"),
        "{reason}"
    );
    assert_eq!(
        serving(&server, "m"),
        sha256(&ph),
        "a refused candidate leaves the old one serving"
    );

    // A new build of the same strategy: the detector's window moves across.
    let (status, body) = put(&server, "m", "", Some(TOKEN), &ph2);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["swapped"]["detail"],
        "detector state moved for 1 model(s)"
    );
    let status = server.get_json("/v1/monitors/m");
    assert_eq!(status["strategy"]["sha256"], sha256(&ph2));
    assert_eq!(status["previous_strategy"]["sha256"], sha256(&ph));
    assert!(status["probation_until_ms"].as_i64().is_some());

    // Another strategy refuses page-hinkley's state: it starts fresh, and says so.
    let (status, body) = put(&server, "m", "", Some(TOKEN), &builtin("adwin"));
    assert_eq!(status, 200, "{body}");
    let detail = body["swapped"]["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("started fresh for a (saved state does not fit strategy `adwin`"),
        "{detail}"
    );
    assert!(
        server.get_json("/v1/monitors/m")["last_swap"]
            .as_str()
            .unwrap()
            .contains("started fresh")
    );
    post_points(&server, 10, 0.9);
    wait_for("110 evaluated", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 110.0).then_some(())
    });

    // Rollback restores the previous version.
    let (status, text) = http_with(
        server.addr,
        "POST",
        "/v1/monitors/m/rollback",
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    assert_eq!(status, 200, "{text}");
    assert_eq!(serving(&server, "m"), sha256(&ph2));
    // adwin's state does not fit page-hinkley; the state page-hinkley had
    // when it was swapped out does.
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body["swapped"]["detail"],
        "detector state moved for 1 model(s)"
    );

    let swaps = server.get_json("/v1/monitors/m/swaps");
    let outcomes: Vec<&str> = swaps["swaps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        ["rolled_back", "swapped", "swapped", "refused", "refused"]
    );
    assert_eq!(swaps["swaps"][0]["trigger"], "rollback (api)");
    assert_eq!(swaps["swaps"][0]["new_sha256"], sha256(&ph2));
    assert_eq!(
        metric(
            &server,
            "visutility_strategy_swaps_refused_total{monitor=\"m\"}"
        ),
        2.0
    );
}

#[test]
fn a_new_version_failing_in_its_probation_rolls_back_automatically() {
    let env = Env::new();
    let ph = builtin("page-hinkley");
    let path = env.write("ph.wasm", &ph);
    let server = start(
        &env,
        path.to_str().unwrap(),
        "probation = \"10m\"\nprobation_failures = 2\nmax_failures = 100",
    );
    post_points(&server, 20, 0.9);
    wait_for("20 evaluated", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 20.0).then_some(())
    });
    // Passes its dry run (20 recent points), panics from its 31st point on.
    let hostile = std::fs::read(crate::util::guest("hostile")).unwrap();
    let (status, body) = put(
        &server,
        "m",
        "?config=%7B%22mode%22%3A%22panic%22%2C%22at%22%3A30%7D",
        Some(TOKEN),
        &hostile,
    );
    assert_eq!(status, 200, "{body}");
    for _ in 0..3 {
        post_points(&server, 40, 0.9);
    }
    wait_for("automatic rollback", Duration::from_secs(20), || {
        (serving(&server, "m") == sha256(&ph)).then_some(())
    });
    let swaps = server.get_json("/v1/monitors/m/swaps");
    let last = &swaps["swaps"][0];
    assert_eq!(last["outcome"], "rolled_back");
    assert!(
        last["trigger"]
            .as_str()
            .unwrap()
            .contains("automatic: 2 failures"),
        "{last}"
    );
    assert_eq!(server.get_json("/v1/monitors/m")["status"], "running");
}

#[test]
fn no_snapshot_is_lost_or_evaluated_twice_across_swaps_under_load() {
    let env = Env::new();
    let ph = builtin("page-hinkley");
    let ph2 = rebuilt(&ph);
    let path = env.write("ph.wasm", &ph);
    let server = start(&env, path.to_str().unwrap(), "");
    let addr = server.addr;
    let posting = std::thread::spawn(move || {
        let body: Vec<String> = (0..200)
            .map(|i| snap(&format!("model-{}", i % 4), 0.9))
            .collect();
        let body = body.join("\n");
        let mut accepted = 0u64;
        let until = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < until {
            let (status, _) = http_with(
                addr,
                "POST",
                "/v1/snapshots",
                &[("Content-Type", "application/x-ndjson")],
                body.as_bytes(),
            );
            if status == 202 {
                accepted += 200;
            }
        }
        accepted
    });
    let mut swaps = 0;
    while !posting.is_finished() {
        let next = if swaps % 2 == 0 { &ph2 } else { &ph };
        let (status, body) = put(&server, "m", "", Some(TOKEN), next);
        assert_eq!(status, 200, "{body}");
        swaps += 1;
    }
    let accepted = posting.join().unwrap() as f64;
    println!("{swaps} swaps under load, {accepted} snapshots accepted");
    assert!(
        accepted >= 10_000.0,
        "too little load: {accepted} snapshots"
    );
    assert!(swaps >= 5, "only {swaps} swaps");
    wait_for("all evaluated", Duration::from_secs(20), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") >= accepted)
            .then_some(())
    });
    assert_eq!(
        metric(&server, "visutility_points_accepted_total{monitor=\"m\"}"),
        accepted
    );
    assert_eq!(
        metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}"),
        accepted,
        "evaluated twice or lost"
    );
}

#[test]
fn a_changed_strategy_file_is_swapped_in_and_a_half_written_one_refused() {
    let env = Env::new();
    let ph = builtin("page-hinkley");
    let ph2 = rebuilt(&ph);
    let path = env.write("ph.wasm", &ph);
    let server = start(&env, path.to_str().unwrap(), "");
    post_points(&server, 50, 0.9);
    wait_for("50 evaluated", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 50.0).then_some(())
    });
    let swaps = |server: &Server| {
        server.get_json("/v1/monitors/m/swaps")["swaps"]
            .as_array()
            .unwrap()
            .clone()
    };

    // Half a file: refused once it stops changing; the old one keeps serving.
    std::fs::write(&path, &ph2[..ph2.len() / 2]).unwrap();
    let refused = wait_for("the half file refused", Duration::from_secs(10), || {
        swaps(&server).first().cloned()
    });
    assert_eq!(refused["outcome"], "refused");
    assert_eq!(refused["trigger"], "file change");
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("not a valid component"),
        "{refused}"
    );
    assert_eq!(serving(&server, "m"), sha256(&ph));

    // The whole file: swapped in, with the detector's state.
    std::fs::write(&path, &ph2).unwrap();
    wait_for("the new file serving", Duration::from_secs(10), || {
        (serving(&server, "m") == sha256(&ph2)).then_some(())
    });
    let last = &swaps(&server)[0];
    assert_eq!(last["outcome"], "swapped");
    assert_eq!(last["trigger"], "file change");
    assert_eq!(last["detail"], "detector state moved for 1 model(s)");
    assert_eq!(
        server.get_json("/v1/monitors/m")["strategy"]["source"],
        path.display().to_string()
    );
}

#[test]
fn a_shadow_monitor_shows_its_agreement_and_never_acts() {
    let env = Env::new();
    let server = Server::start(
        &env,
        r#"
[[monitor]]
name = "prod"
strategy = "builtin:baseline"
config = { baseline = 0.9 }
cooldown = "0s"

[[monitor]]
name = "cand"
strategy = "builtin:baseline"
config = { baseline = 0.8 }
cooldown = "0s"
shadow = true
shadows = "prod"
agreement_tolerance = 0
[[monitor.action]]
kind = "exec"
argv = ["sh", "-c", "touch shadow-acted"]
"#,
        &[],
    );
    // Both fire on 0.70 (5 points); only prod fires on 0.82 (5 points).
    let mut lines: Vec<String> = (0..10).map(|_| snap("a", 0.95)).collect();
    lines.extend((0..5).map(|_| snap("a", 0.70)));
    lines.extend((0..5).map(|_| snap("a", 0.82)));
    assert_eq!(server.post_ndjson(&lines).0, 202);
    let agreement = wait_for("both evaluated", Duration::from_secs(10), || {
        let a = server.get_json("/v1/monitors/cand")["agreement"].clone();
        (a["window"][1] == 20).then_some(a)
    });
    assert_eq!(agreement["with"], "prod");
    assert_eq!(agreement["paired"], 5);
    assert_eq!(agreement["only_primary"], 5);
    assert_eq!(agreement["only_shadow"], 0);
    assert_eq!(agreement["agreement"], 0.5);
    assert_eq!(agreement["median_delay"], 0);
    assert!(server.get_json("/v1/monitors/prod")["agreement"].is_null());
    // Shadow signals are recorded as such, and run no action.
    let signals = server.get_json("/v1/signals?monitor=cand")["signals"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(signals.len(), 5);
    assert!(signals.iter().all(|s| s["shadow"] == true), "{signals:?}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !env.path("shadow-acted").exists(),
        "a shadow monitor ran an action"
    );
}

const HEADER: &str = "listen = \"127.0.0.1:0\"\ndb = \"signals.db\"\ncheckpoint_every = \"1h\"\n";

fn baseline_monitor(name: &str, baseline: f64) -> String {
    format!(
        "[[monitor]]\nname = \"{name}\"\nstrategy = \"builtin:baseline\"\nconfig = {{ baseline = {baseline} }}\ncooldown = \"0s\"\n\n"
    )
}

fn reload(server: &Server, token: Option<&str>) -> (u16, Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    let (status, text) = http_with(server.addr, "POST", "/v1/reload", &headers, b"");
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn names(server: &Server) -> Vec<String> {
    server.get_json("/v1/monitors")["monitors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn config_reload_adds_removes_and_restarts_changed_monitors_only() {
    let env = Env::new();
    let config = [
        baseline_monitor("keep", 0.9),
        baseline_monitor("change", 0.9),
        baseline_monitor("drop", 0.9),
    ]
    .concat();
    let server = Server::start(&env, &config, &[("VISUTILITY_ADMIN_TOKEN", TOKEN)]);
    let evaluated = |name: &str| {
        metric(
            &server,
            &format!("visutility_points_evaluated_total{{monitor=\"{name}\"}}"),
        )
    };
    post_points(&server, 10, 0.95);
    wait_for("10 evaluated each", Duration::from_secs(10), || {
        (evaluated("keep") == 10.0 && evaluated("drop") == 10.0).then_some(())
    });

    let reloaded = [
        HEADER,
        &baseline_monitor("keep", 0.9),
        &baseline_monitor("change", 0.5),
        &baseline_monitor("new", 0.9),
    ]
    .concat();
    env.write("visutility.toml", &reloaded);
    assert_eq!(reload(&server, None).0, 401);
    let (status, body) = reload(&server, Some(TOKEN));
    assert_eq!(status, 200, "{body}");
    let r = &body["reloaded"];
    assert_eq!(r["added"], serde_json::json!(["new"]));
    assert_eq!(r["removed"], serde_json::json!(["drop"]));
    assert_eq!(r["restarted"], serde_json::json!(["change"]));
    assert_eq!(r["unchanged"], serde_json::json!(["keep"]));
    assert_eq!(
        r["started_fresh"],
        serde_json::json!(["change"]),
        "its saved state had the old baseline"
    );
    assert_eq!(names(&server), ["keep", "change", "new"]);
    // Untouched: its counters go on; restarted: a new instance.
    assert_eq!(evaluated("keep"), 10.0);
    assert_eq!(evaluated("change"), 0.0);
    // The new configuration is in force: 0.8 is degraded for 0.9, not for 0.5.
    post_points(&server, 1, 0.8);
    wait_for("evaluated after reload", Duration::from_secs(10), || {
        (evaluated("change") == 1.0 && evaluated("new") == 1.0).then_some(())
    });
    let retrains = |name: &str| {
        metric(
            &server,
            &format!("visutility_verdicts_total{{monitor=\"{name}\",kind=\"retrain\"}}"),
        )
    };
    assert_eq!(
        (retrains("keep"), retrains("change"), retrains("new")),
        (1.0, 0.0, 1.0)
    );

    // A broken file changes nothing.
    env.write(
        "visutility.toml",
        format!("{HEADER}[[monitor]]\nname = \"x\"\nstrategy = \"builtin:nope\"\n"),
    );
    let (status, body) = reload(&server, Some(TOKEN));
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("builtin:nope"),
        "{body}"
    );
    env.write(
        "visutility.toml",
        format!("{HEADER}[[monitor]]\nname = \"x\"\ncooldown = \"soon\"\n"),
    );
    assert_eq!(reload(&server, Some(TOKEN)).0, 422);
    assert_eq!(names(&server), ["keep", "change", "new"]);

    // SIGHUP reloads too.
    env.write(
        "visutility.toml",
        [reloaded.as_str(), &baseline_monitor("hup", 0.9)].concat(),
    );
    server.signal("HUP");
    wait_for("the SIGHUP reload", Duration::from_secs(10), || {
        (names(&server).len() == 4).then_some(())
    });
    assert_eq!(names(&server), ["keep", "change", "new", "hup"]);
    assert_eq!(
        evaluated("keep"),
        11.0,
        "unchanged monitors stay untouched (their counters go on)"
    );
    assert_eq!(server.terminate(), Some(0));
}
