//! Delivers recorded signals to their actions (`log`, `exec`, `webhook`),
//! at least once, with exponential back-off and jitter between attempts.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::config::ActionConfig;
use super::store::{DueDelivery, SignalRecord, Store, now_ms};

/// First retry delay; doubled per attempt up to [`MAX_BACKOFF`].
pub const BASE_BACKOFF: Duration = Duration::from_millis(500);
/// Longest delay between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// The signature header of webhook requests.
pub const SIGNATURE_HEADER: &str = "X-Visutility-Signature";

/// The delivery loop's inputs.
#[derive(Debug)]
pub struct Deliverer {
    /// The store.
    pub store: Store,
    /// Actions per monitor name (replaced on config reload).
    pub actions: Arc<parking_lot::RwLock<HashMap<String, Vec<ActionConfig>>>>,
    /// Woken when a signal is recorded.
    pub wake: Arc<tokio::sync::Notify>,
    /// HTTP client for webhooks.
    pub http: reqwest::Client,
}

impl Deliverer {
    /// Delivers due actions until `shutdown`; an action in flight finishes
    /// first, the rest stay pending in the store for the next start.
    pub async fn run(self, shutdown: CancellationToken) {
        loop {
            let due = match self.store.due_deliveries(now_ms(), 32) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!("cannot read the outbox: {e}");
                    Vec::new()
                }
            };
            let idle = due.is_empty();
            for d in due {
                if shutdown.is_cancelled() {
                    return;
                }
                self.deliver(d).await;
            }
            if idle {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.wake.notified() => {}
                    () = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            }
        }
    }

    async fn deliver(&self, d: DueDelivery) {
        let monitor = &d.signal.signal.monitor;
        let action = self
            .actions
            .read()
            .get(monitor)
            .and_then(|a| a.get(d.action as usize))
            .cloned();
        let Some(action) = action else {
            let _ = self.store.finish_attempt(
                d.signal_id,
                d.action,
                Err(format!(
                    "monitor `{monitor}` has no action #{} any more",
                    d.action
                )),
                None,
                None,
            );
            return;
        };
        let body = serde_json::to_vec(&d.signal).unwrap_or_default();
        let (outcome, exit_code) = match &action {
            ActionConfig::Log => {
                tracing::warn!(target: "visutility::signal", signal = %String::from_utf8_lossy(&body), "{} signal for `{}`: {}", d.signal.signal.kind, d.signal.signal.model_version, d.signal.signal.reason);
                (Ok(()), None)
            }
            ActionConfig::Exec { argv, timeout, .. } => {
                run_exec(argv, *timeout, &d.signal, &body).await
            }
            ActionConfig::Webhook {
                url,
                secret_env,
                timeout,
                ..
            } => (
                post_webhook(&self.http, url, secret_env.as_deref(), *timeout, &body).await,
                None,
            ),
        };
        let attempts = d.attempts as u32 + 1;
        let next = match &outcome {
            Err(_) if attempts < action.max_attempts() => {
                Some(now_ms() + backoff(attempts).as_millis() as i64)
            }
            _ => None,
        };
        if let Err(e) = &outcome {
            tracing::warn!(monitor = %monitor, signal = d.signal_id, action = action.kind(), attempts, "delivery failed: {e}");
        }
        if let Err(e) = self
            .store
            .finish_attempt(d.signal_id, d.action, outcome, exit_code, next)
        {
            tracing::error!("cannot record a delivery: {e}");
        }
    }
}

/// Delay before attempt `attempts + 1`: exponential with ±25% jitter.
pub fn backoff(attempts: u32) -> Duration {
    let exp = BASE_BACKOFF
        .saturating_mul(1 << attempts.min(20))
        .min(MAX_BACKOFF);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = 0.75 + f64::from(nanos % 1000) / 2000.0;
    exp.mul_f64(jitter)
}

fn fill(arg: &str, s: &SignalRecord) -> String {
    arg.replace("{model_version}", &s.signal.model_version)
        .replace("{monitor}", &s.signal.monitor)
}

async fn run_exec(
    argv: &[String],
    timeout: Duration,
    s: &SignalRecord,
    body: &[u8],
) -> (Result<(), String>, Option<i32>) {
    let args: Vec<String> = argv.iter().map(|a| fill(a, s)).collect();
    let mut cmd = tokio::process::Command::new(&args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .env("VISUTILITY_SIGNAL_ID", s.id.to_string())
        .env("VISUTILITY_MONITOR", &s.signal.monitor)
        .env("VISUTILITY_MODEL_VERSION", &s.signal.model_version)
        .env("VISUTILITY_KIND", &s.signal.kind)
        .env("VISUTILITY_REASON", &s.signal.reason)
        .env("VISUTILITY_SCORE", s.signal.score.to_string())
        .env("VISUTILITY_TIMESTAMP_MS", s.signal.timestamp.to_string());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return (Err(format!("cannot run `{}`: {e}", args[0])), None),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body).await;
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Err(_) => (
            Err(format!(
                "`{}` timed out after {}",
                args[0],
                humantime::format_duration(timeout)
            )),
            None,
        ),
        Ok(Err(e)) => (Err(format!("`{}` failed: {e}", args[0])), None),
        Ok(Ok(out)) => {
            let code = out.status.code();
            if out.status.success() {
                (Ok(()), code)
            } else {
                let stderr = String::from_utf8_lossy(&out.stderr);
                let tail: String = stderr
                    .chars()
                    .rev()
                    .take(300)
                    .collect::<String>()
                    .chars()
                    .rev()
                    .collect();
                (
                    Err(format!(
                        "`{}` exited with {}: {}",
                        args[0],
                        out.status,
                        tail.trim()
                    )),
                    code,
                )
            }
        }
    }
}

/// `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn post_webhook(
    http: &reqwest::Client,
    url: &str,
    secret_env: Option<&str>,
    timeout: Duration,
    body: &[u8],
) -> Result<(), String> {
    let mut req = http
        .post(url)
        .timeout(timeout)
        .header("Content-Type", "application/json")
        .body(body.to_vec());
    if let Some(var) = secret_env {
        let secret = std::env::var(var)
            .map_err(|_| format!("environment variable `{var}` (secret_env) is not set"))?;
        req = req.header(SIGNATURE_HEADER, signature(secret.as_bytes(), body));
    }
    let resp = req.send().await.map_err(|e| format!("POST {url}: {e}"))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("POST {url}: HTTP {}", resp.status()))
    }
}
