//! `visutility run`, driven over loopback HTTP like a user would.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::Env;

/// A running `visutility run`; killed on drop.
pub(crate) struct Server {
    child: Child,
    pub(crate) addr: SocketAddr,
}

impl Server {
    pub(crate) fn start(env: &Env, config: &str, extra_env: &[(&str, &str)]) -> Server {
        env.write(
            "visutility.toml",
            format!(
                "listen = \"127.0.0.1:0\"\ndb = \"signals.db\"\ncheckpoint_every = \"1h\"\n{config}"
            ),
        );
        let mut cmd = env.cmd();
        cmd.args(["run", "--config", "visutility.toml"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start visutility run");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or_else(|| panic!("no listen address in {line:?}"))
            .parse()
            .unwrap();
        Server { child, addr }
    }

    pub(crate) fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> (u16, String) {
        http(self.addr, method, path, content_type, body)
    }

    pub(crate) fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.request("GET", path, "", b"");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }

    pub(crate) fn post_ndjson(&self, lines: &[String]) -> (u16, String) {
        self.request(
            "POST",
            "/v1/snapshots",
            "application/x-ndjson",
            lines.join("\n").as_bytes(),
        )
    }

    fn signals(&self) -> Vec<Value> {
        self.get_json("/v1/signals")["signals"]
            .as_array()
            .unwrap()
            .clone()
    }

    /// Sends `signal` (e.g. `HUP`) to the service.
    pub(crate) fn signal(&self, signal: &str) {
        unsafe_kill(self.child.id(), signal);
    }

    pub(crate) fn terminate(mut self) -> Option<i32> {
        unsafe_kill(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        std::mem::forget(self);
        status.code()
    }

    fn kill9(mut self) {
        unsafe_kill(self.child.id(), "KILL");
        let _ = self.child.wait();
        std::mem::forget(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, signal: &str) {
    let ok = std::process::Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> (u16, String) {
    let headers: &[(&str, &str)] = if content_type.is_empty() {
        &[]
    } else {
        &[("Content-Type", content_type)]
    };
    http_with(addr, method, path, headers, body)
}

/// One request with extra `headers`; the status and the body.
pub(crate) fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

pub(crate) fn snap(model: &str, score: f64) -> String {
    serde_json::json!({"model_version": model, "score": score}).to_string()
}

pub(crate) fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(started.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A one-route HTTP receiver: every request's headers and body.
fn webhook_receiver() -> (SocketAddr, mpsc::Receiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let _ = conn
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let _ = tx.send((head, body));
        }
    });
    (addr, rx)
}

pub(crate) fn metric(server: &Server, sample: &str) -> f64 {
    let (_, text) = server.request("GET", "/metrics", "", b"");
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {sample} in:\n{text}"))
}

#[test]
fn a_retrain_signal_runs_the_exec_action_and_posts_a_signed_webhook() {
    use hmac::Mac;
    let env = Env::new();
    let (hook, received) = webhook_receiver();
    let server = Server::start(
        &env,
        &format!(
            r#"
[[monitor]]
name = "quality"
models = ["fraud-*"]
strategy = "builtin:baseline"
config = {{ baseline = 0.9 }}
[[monitor.action]]
kind = "exec"
argv = ["sh", "-c", "cat > signal.json && echo \"$VISUTILITY_MODEL_VERSION $VISUTILITY_KIND {{monitor}} {{model_version}}\" > env.txt"]
[[monitor.action]]
kind = "webhook"
url = "http://{hook}/retrain"
secret_env = "TEST_WEBHOOK_SECRET"
"#
        ),
        &[("TEST_WEBHOOK_SECRET", "s3cret")],
    );
    let (status, body) = server.post_ndjson(&[
        snap("fraud-v2", 0.95),
        snap("churn-v1", 0.1),
        snap("fraud-v2", 0.70),
    ]);
    assert_eq!(status, 202, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["accepted"], 3);

    let (head, body) = received
        .recv_timeout(Duration::from_secs(20))
        .expect("webhook call");
    let signature = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("x-visutility-signature: ")
                .or_else(|| l.strip_prefix("X-Visutility-Signature: "))
        })
        .expect("signature header")
        .trim()
        .to_string();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
    mac.update(&body);
    assert_eq!(
        signature,
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    );
    let posted: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(posted["model_version"], "fraud-v2");
    assert_eq!(posted["kind"], "retrain");
    assert_eq!(posted["strategy"], "baseline");
    assert_eq!(posted["snapshot"]["score"], 0.7);

    let env_txt = wait_for("exec action", Duration::from_secs(20), || {
        std::fs::read_to_string(env.path("env.txt")).ok()
    });
    assert_eq!(env_txt.trim(), "fraud-v2 retrain quality fraud-v2");
    let stdin: Value =
        serde_json::from_str(&std::fs::read_to_string(env.path("signal.json")).unwrap()).unwrap();
    assert_eq!(stdin["reason"], posted["reason"]);

    let delivered = wait_for("deliveries recorded", Duration::from_secs(10), || {
        let s = server.signals();
        let d = s[0]["deliveries"].as_array().unwrap().clone();
        d.iter().all(|d| d["state"] == "delivered").then_some(d)
    });
    assert_eq!(delivered.len(), 2);
    assert_eq!(delivered[0]["exit_code"], 0);
    // churn-v1 is not selected by `fraud-*`: one signal only.
    assert_eq!(server.signals().len(), 1);
}

#[test]
fn bad_batches_are_refused_whole_and_nothing_else_is_lost() {
    let env = Env::new();
    let server = Server::start(
        &env,
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:baseline\"\nconfig = { baseline = 0.9 }\n",
        &[],
    );
    let (status, body) = server.post_ndjson(&[
        snap("a", 0.5),
        r#"{"model_version":"a","score":NaN}"#.into(),
        snap("a", 0.5),
        r#"{"model_version":"a","scroe":1}"#.into(),
    ]);
    assert_eq!(status, 400, "{body}");
    let err: Value = serde_json::from_str(&body).unwrap();
    let lines: Vec<u64> = err["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_u64().unwrap())
        .collect();
    assert_eq!(lines, [2, 4]);
    assert!(
        err["errors"][1]["reason"]
            .as_str()
            .unwrap()
            .contains("scroe")
    );

    let (status, body) = server.request(
        "POST",
        "/v1/snapshots",
        "application/json",
        br#"[{"model_version":"a","score":0.95},{"model_version":"a","score":1e999}]"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains(r#""index":1"#), "{body}");

    let (status, _) = server.request(
        "POST",
        "/v1/snapshots",
        "application/json",
        br#"{"model_version":"a","score":0.95}"#,
    );
    assert_eq!(status, 202);
    let (status, _) = server.request(
        "POST",
        "/v1/snapshots",
        "application/json",
        br#"[{"model_version":"a","score":0.5},{"model_version":"b","score":0.91}]"#,
    );
    assert_eq!(status, 202);
    wait_for("evaluation", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 3.0).then_some(())
    });
    assert_eq!(metric(&server, "visutility_snapshots_accepted_total"), 3.0);
    assert_eq!(metric(&server, "visutility_snapshots_refused_total"), 6.0);
    let signals = wait_for("signal", Duration::from_secs(10), || {
        Some(server.signals()).filter(|s| !s.is_empty())
    });
    assert_eq!(signals.len(), 1);
    assert_eq!(signals[0]["score"], 0.5);
}

#[test]
fn cooldown_suppresses_repeats_and_counts_them() {
    let env = Env::new();
    let server = Server::start(
        &env,
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:baseline\"\nconfig = { baseline = 0.9 }\ncooldown = \"1h\"\n",
        &[],
    );
    assert_eq!(
        server
            .post_ndjson(&[
                snap("a", 0.5),
                snap("a", 0.4),
                snap("b", 0.3),
                snap("a", 0.2)
            ])
            .0,
        202
    );
    wait_for("evaluation", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 4.0).then_some(())
    });
    let signals = server.signals();
    let mut models: Vec<&str> = signals
        .iter()
        .map(|s| s["model_version"].as_str().unwrap())
        .collect();
    models.sort();
    assert_eq!(models, ["a", "b"]);
    assert_eq!(
        metric(
            &server,
            "visutility_signals_suppressed_total{monitor=\"m\"}"
        ),
        2.0
    );
    assert_eq!(
        metric(
            &server,
            "visutility_verdicts_total{monitor=\"m\",kind=\"retrain\"}"
        ),
        4.0
    );
}

#[test]
fn a_silent_model_yields_one_stale_signal_per_stall() {
    let env = Env::new();
    let server = Server::start(
        &env,
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:baseline\"\nconfig = { baseline = 0.1 }\nstale_after = \"300ms\"\n",
        &[],
    );
    assert_eq!(server.post_ndjson(&[snap("quiet-model", 0.9)]).0, 202);
    let stale = wait_for("stale signal", Duration::from_secs(10), || {
        Some(server.signals()).filter(|s| s.iter().any(|s| s["kind"] == "stale"))
    });
    assert!(
        stale[0]["reason"]
            .as_str()
            .unwrap()
            .contains("no snapshot of `quiet-model`"),
        "{stale:?}"
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        server
            .signals()
            .iter()
            .filter(|s| s["kind"] == "stale")
            .count(),
        1,
        "once per stall"
    );
    assert_eq!(
        metric(&server, "visutility_stale_models{monitor=\"m\"}"),
        1.0
    );
    // It speaks again, then stalls again: a second stale signal.
    assert_eq!(server.post_ndjson(&[snap("quiet-model", 0.9)]).0, 202);
    wait_for("second stall", Duration::from_secs(10), || {
        (server
            .signals()
            .iter()
            .filter(|s| s["kind"] == "stale")
            .count()
            == 2)
            .then_some(())
    });
}

#[test]
fn kill_9_mid_delivery_then_restart_delivers_what_was_pending_once() {
    let env = Env::new();
    // The first attempt hangs (its process outlives the killed server but
    // never writes); later attempts succeed.
    let config = r#"
[[monitor]]
name = "m"
strategy = "builtin:baseline"
config = { baseline = 0.9 }
[[monitor.action]]
kind = "exec"
argv = ["sh", "-c", "if [ ! -f started ]; then touch started; exec sleep 30; fi; echo $VISUTILITY_SIGNAL_ID >> delivered.txt"]
"#;
    let server = Server::start(&env, config, &[]);
    assert_eq!(server.post_ndjson(&[snap("a", 0.5)]).0, 202);
    wait_for("first attempt", Duration::from_secs(20), || {
        env.path("started").exists().then_some(())
    });
    server.kill9();
    assert!(!env.path("delivered.txt").exists());

    let server = Server::start(&env, config, &[]);
    let text = wait_for("redelivery", Duration::from_secs(20), || {
        std::fs::read_to_string(env.path("delivered.txt")).ok()
    });
    assert_eq!(text, "1\n");
    wait_for("delivered state", Duration::from_secs(10), || {
        (server.signals()[0]["deliveries"][0]["state"] == "delivered").then_some(())
    });
    assert_eq!(server.terminate(), Some(0));

    // Acknowledged deliveries are never repeated.
    let server = Server::start(&env, config, &[]);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        std::fs::read_to_string(env.path("delivered.txt")).unwrap(),
        "1\n"
    );
    drop(server);
}

#[test]
fn detector_state_survives_a_restart() {
    let env = Env::new();
    let config =
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:baseline\"\nconfig = { warmup = 10 }\n";
    let server = Server::start(&env, config, &[]);
    assert_eq!(
        server
            .post_ndjson(&(0..6).map(|_| snap("a", 0.9)).collect::<Vec<_>>())
            .0,
        202
    );
    wait_for("evaluation", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 6.0).then_some(())
    });
    assert_eq!(
        server.terminate(),
        Some(0),
        "SIGTERM exits 0 after checkpointing"
    );

    // Mid-warm-up: 4 more points complete it, so 0.5 is judged against 0.9.
    // A detector that had lost its state would still be warming up.
    let server = Server::start(&env, config, &[]);
    let mut batch: Vec<String> = (0..4).map(|_| snap("a", 0.9)).collect();
    batch.push(snap("a", 0.5));
    assert_eq!(server.post_ndjson(&batch).0, 202);
    let signals = wait_for("signal", Duration::from_secs(10), || {
        Some(server.signals()).filter(|s| !s.is_empty())
    });
    assert!(
        signals[0]["reason"]
            .as_str()
            .unwrap()
            .contains("below baseline 0.9000"),
        "{signals:?}"
    );
}

#[test]
fn metrics_scrape_follows_the_prometheus_text_format() {
    let env = Env::new();
    let server = Server::start(
        &env,
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:adwin\"\n",
        &[],
    );
    assert_eq!(
        server
            .post_ndjson(
                &(0..100)
                    .map(|i| snap("a", 0.5 + f64::from(i % 7) / 100.0))
                    .collect::<Vec<_>>()
            )
            .0,
        202
    );
    wait_for("evaluation", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_evaluated_total{monitor=\"m\"}") == 100.0).then_some(())
    });
    let (status, text) = server.request("GET", "/metrics", "", b"");
    assert_eq!(status, 200);
    let mut typed = std::collections::HashMap::new();
    let mut samples = 0;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            typed.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample {line:?}"));
        assert!(
            value.parse::<f64>().is_ok() || value == "+Inf",
            "bad value in {line:?}"
        );
        let name = series.split('{').next().unwrap();
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad name {name:?}"
        );
        if let Some(labels) = series.strip_prefix(name)
            && !labels.is_empty()
        {
            assert!(
                labels.starts_with('{') && labels.ends_with('}'),
                "bad labels {line:?}"
            );
            for pair in labels[1..labels.len() - 1].split(',') {
                let (k, v) = pair.split_once('=').unwrap();
                assert!(
                    !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                    "bad label {pair:?}"
                );
            }
        }
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .filter(|b| typed.get(*b).is_some_and(|k| k == "histogram"))
            .unwrap_or(name);
        assert!(typed.contains_key(base), "sample before its TYPE: {line:?}");
        samples += 1;
    }
    assert!(samples > 20);
    let count = metric(
        &server,
        "visutility_strategy_call_seconds_count{monitor=\"m\"}",
    );
    let inf = metric(
        &server,
        "visutility_strategy_call_seconds_bucket{monitor=\"m\",le=\"+Inf\"}",
    );
    assert!(count >= 1.0 && count == inf);
    assert!(metric(&server, "visutility_strategy_fuel_total{monitor=\"m\"}") > 0.0);
    let (status, _) = server.request("GET", "/healthz", "", b"");
    assert_eq!(status, 200);
    let (status, _) = server.request("GET", "/readyz", "", b"");
    assert_eq!(status, 200);
    let monitors = server.get_json("/v1/monitors");
    assert_eq!(monitors["monitors"][0]["strategy"]["name"], "adwin");
    assert_eq!(server.get_json("/v1/monitors/m")["points_evaluated"], 100);
    assert_eq!(server.request("GET", "/v1/monitors/nope", "", b"").0, 404);
}

#[test]
fn run_check_validates_the_config_and_its_strategies() {
    let env = Env::new();
    env.write("good.toml", "canonicalize_nans = true\n[[monitor]]\nname = \"m\"\nstrategy = \"builtin:cusum\"\nconfig = { k = 0.5 }\n");
    let run = env.run(&["run", "--config", "good.toml", "--check"]);
    run.ok();
    assert!(
        run.stdout.contains("configuration ok: 1 monitor(s)"),
        "{}",
        run.stdout
    );
    env.write("bad-nans.toml", "canonicalize_nans = \"yes\"\n");
    env.run(&["run", "--config", "bad-nans.toml", "--check"])
        .fails_with(2, "canonicalize_nans");
    env.write(
        "bad-key.toml",
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:cusum\"\ncooldown = \"later\"\n",
    );
    env.run(&["run", "--config", "bad-key.toml", "--check"])
        .fails_with(2, "config `bad-key.toml`");
    env.write(
        "bad-strategy-config.toml",
        "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:cusum\"\nconfig = { k = -1 }\n",
    );
    env.run(&["run", "--config", "bad-strategy-config.toml", "--check"])
        .fails_with(2, "monitor `m`");
    env.write("secret.toml", "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:cusum\"\n[[monitor.action]]\nkind = \"webhook\"\nurl = \"http://x\"\nsecret = \"p\"\n");
    env.run(&["run", "--config", "secret.toml", "--check"])
        .fails_with(2, "secret_env");
}

#[test]
fn failed_deliveries_are_retried_with_backoff_and_recorded() {
    // A webhook that fails its first call, then accepts.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    let (tx, calls) = mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 65536];
            let _ = conn.read(&mut buf);
            let status = if n == 0 {
                "500 Internal Server Error"
            } else {
                "204 No Content"
            };
            let _ = conn.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
            let _ = tx.send(Instant::now());
        }
    });
    let env = Env::new();
    let server = Server::start(
        &env,
        &format!(
            r#"
[[monitor]]
name = "m"
strategy = "builtin:baseline"
config = {{ baseline = 0.9 }}
[[monitor.action]]
kind = "webhook"
url = "http://{hook}/x"
[[monitor.action]]
kind = "exec"
argv = ["sleep", "5"]
timeout = "200ms"
max_attempts = 2
"#
        ),
        &[],
    );
    assert_eq!(server.post_ndjson(&[snap("a", 0.5)]).0, 202);
    let first = calls.recv_timeout(Duration::from_secs(20)).unwrap();
    let second = calls.recv_timeout(Duration::from_secs(20)).unwrap();
    let gap = second - first;
    assert!(
        gap >= Duration::from_millis(300),
        "retried after {gap:?}: no back-off"
    );
    let deliveries = wait_for("final states", Duration::from_secs(20), || {
        let d = server.signals()[0]["deliveries"]
            .as_array()
            .unwrap()
            .clone();
        (d[0]["state"] == "delivered" && d[1]["state"] == "failed").then_some(d)
    });
    assert_eq!(deliveries[0]["attempts"], 2);
    assert!(deliveries[0]["last_error"].is_null());
    assert_eq!(deliveries[1]["attempts"], 2);
    assert!(
        deliveries[1]["last_error"]
            .as_str()
            .unwrap()
            .contains("timed out"),
        "{deliveries:?}"
    );
    assert_eq!(
        metric(&server, "visutility_deliveries{state=\"failed\"}"),
        1.0
    );
}

/// A config with a healthy `good` monitor (fixed baseline 0.9) and a monitor
/// `name` running the hostile test guest with `rest` (its config, limits,
/// actions).
fn beside_good(name: &str, rest: &str) -> String {
    let hostile = crate::util::guest("hostile");
    format!(
        "[[monitor]]\nname = \"good\"\nstrategy = \"builtin:baseline\"\nconfig = {{ baseline = 0.9 }}\n\n\
         [[monitor]]\nname = \"{name}\"\nstrategy = \"{hostile}\"\n{rest}\n"
    )
}

#[test]
fn a_failing_strategy_is_recorded_restarted_then_quarantined_and_resumable() {
    let env = Env::new();
    let server = Server::start(
        &env,
        &beside_good(
            "bad",
            r#"config = { mode = "panic" }
max_failures = 3
restart_backoff = "10ms"
[[monitor.action]]
kind = "exec"
argv = ["sh", "-c", "cat > quarantine.json"]"#,
        ),
        &[("VISUTILITY_ADMIN_TOKEN", "tok")],
    );
    for _ in 0..3 {
        assert_eq!(
            server.post_ndjson(&[snap("a", 0.95), snap("a", 0.96)]).0,
            202
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = wait_for("quarantine", Duration::from_secs(20), || {
        Some(server.get_json("/v1/monitors/bad")).filter(|s| s["status"] == "quarantined")
    });
    assert_eq!(status["traps"], 3);
    let last_error = status["last_error"].as_str().unwrap();
    assert!(
        last_error.contains("monitor `bad`")
            && last_error.contains("hostile")
            && last_error.contains("trap"),
        "{last_error}"
    );
    assert_eq!(
        metric(&server, "visutility_monitor_quarantined{monitor=\"bad\"}"),
        1.0
    );

    // The batch that caused each failure is kept for debugging.
    let failures = server.get_json("/v1/failures?monitor=bad");
    let failures = failures["failures"].as_array().unwrap();
    assert_eq!(failures.len(), 3);
    assert_eq!(failures[0]["fault"], "trap");
    assert_eq!(failures[0]["batch"].as_str().unwrap().lines().count(), 2);

    // Quarantine is a signal through the outbox and its actions.
    let notice: Value = serde_json::from_str(&wait_for(
        "quarantine action",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(env.path("quarantine.json"))
                .ok()
                .filter(|s| !s.is_empty())
        },
    ))
    .unwrap();
    assert_eq!(notice["kind"], "quarantined");

    // The other monitor is unaffected; a quarantined one skips (counted).
    assert_eq!(server.post_ndjson(&[snap("a", 0.5)]).0, 202);
    wait_for("good evaluates", Duration::from_secs(10), || {
        (metric(
            &server,
            "visutility_points_evaluated_total{monitor=\"good\"}",
        ) == 7.0)
            .then_some(())
    });
    wait_for("bad skips", Duration::from_secs(10), || {
        (metric(&server, "visutility_points_skipped_total{monitor=\"bad\"}") == 1.0).then_some(())
    });

    // Resume needs the admin token.
    assert_eq!(
        server.request("POST", "/v1/monitors/bad/resume", "", b"").0,
        401
    );
    let (status, body) = http_with_auth(server.addr, "/v1/monitors/bad/resume", "tok");
    assert_eq!(status, 202, "{body}");
    wait_for("resumed", Duration::from_secs(10), || {
        (server.get_json("/v1/monitors/bad")["status"] == "running").then_some(())
    });
    assert_eq!(
        metric(&server, "visutility_monitor_quarantined{monitor=\"bad\"}"),
        0.0
    );
}

#[test]
fn shutdown_is_not_held_up_by_a_failing_strategy_in_back_off() {
    let env = Env::new();
    let server = Server::start(
        &env,
        &beside_good(
            "looping",
            r#"config = { mode = "loop" }
limits = { deadline = "100ms" }
max_failures = 1000
restart_backoff = "20s""#,
        ),
        &[],
    );
    for i in 0..5 {
        assert_eq!(
            server.post_ndjson(&[snap("a", 0.95), snap("a", 0.96)]).0,
            202,
            "request {i}"
        );
    }
    wait_for("the first failure", Duration::from_secs(20), || {
        (metric(
            &server,
            "visutility_strategy_traps_total{monitor=\"looping\"}",
        ) >= 1.0)
            .then_some(())
    });
    wait_for("good evaluates", Duration::from_secs(10), || {
        (metric(
            &server,
            "visutility_points_evaluated_total{monitor=\"good\"}",
        ) == 10.0)
            .then_some(())
    });
    // The looping monitor now waits 20 s before its next try, with batches
    // queued behind it; stopping must not wait for them.
    let started = std::time::Instant::now();
    assert_eq!(server.terminate(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "shutdown took {:?}",
        started.elapsed()
    );
}

fn http_with_auth(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    http_with(
        addr,
        "POST",
        path,
        &[("Authorization", &format!("Bearer {token}"))],
        b"",
    )
}
