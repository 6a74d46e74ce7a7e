//! The HTTP API (axum): ingestion, monitors, signals, metrics, health.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use serde::Deserialize;
use serde_json::json;

use super::Service;
use super::monitor::LATENCY_BUCKETS;
use super::store::SignalQuery;
use crate::snapshot::{Observation, ObservationRef};

/// Most snapshots one request may carry.
pub const MAX_SNAPSHOTS_PER_REQUEST: usize = 1_000_000;
/// Most bad entries listed in a 400 answer (all are counted).
const MAX_LISTED_ERRORS: usize = 100;

/// The API's routes over `service`.
pub fn router(service: Arc<Service>) -> Router {
    let limit = service.config.max_body_bytes;
    Router::new()
        .route("/v1/snapshots", post(ingest))
        .route("/v1/monitors", get(monitors))
        .route("/v1/monitors/{name}", get(monitor))
        .route("/v1/monitors/{name}/resume", post(resume))
        .route("/v1/monitors/{name}/strategy", put(put_strategy))
        .route("/v1/monitors/{name}/rollback", post(rollback))
        .route("/v1/monitors/{name}/swaps", get(swaps))
        .route("/v1/reload", post(reload))
        .route("/v1/signals", get(signals))
        .route("/v1/failures", get(failures))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(service)
}

fn error(status: StatusCode, body: serde_json::Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn ingest(State(service): State<Arc<Service>>, headers: HeaderMap, body: Bytes) -> Response {
    if service.shutting_down() {
        return unavailable("the service is shutting down", 5);
    }
    let ndjson = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.starts_with("application/x-ndjson") || ct.starts_with("application/jsonl")
        });
    let service2 = service.clone();
    // Parsing a large body is CPU work: keep it off the async workers.
    let parsed = tokio::task::spawn_blocking(move || parse_body(&body, ndjson, &service2)).await;
    let observations = match parsed {
        Ok(Ok(obs)) => obs,
        Ok(Err(resp)) => return *resp,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"error": e.to_string()}),
            );
        }
    };
    let count = observations.len();
    if count == 0 {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": "no snapshot in the request body"}),
        );
    }
    match service.route(observations) {
        Ok(()) => {
            service
                .metrics
                .accepted
                .fetch_add(count as u64, Ordering::Relaxed);
            (StatusCode::ACCEPTED, axum::Json(json!({"accepted": count}))).into_response()
        }
        Err(busy) => {
            service
                .metrics
                .rejected_busy
                .fetch_add(count as u64, Ordering::Relaxed);
            unavailable(
                &format!(
                    "monitor `{busy}` is behind or restarting; nothing of this request was accepted, retry it"
                ),
                1,
            )
        }
    }
}

fn unavailable(message: &str, retry_after: u32) -> Response {
    let mut resp = error(StatusCode::SERVICE_UNAVAILABLE, json!({"error": message}));
    resp.headers_mut()
        .insert(header::RETRY_AFTER, retry_after.into());
    resp
}

/// Parses an object, an array, or NDJSON; any bad entry refuses the whole
/// body with every bad entry's position and reason.
fn parse_body(
    body: &[u8],
    ndjson: bool,
    service: &Service,
) -> Result<Vec<Observation>, Box<Response>> {
    let refuse = |errors: Vec<serde_json::Value>, total: usize| {
        service
            .metrics
            .refused
            .fetch_add(total as u64, Ordering::Relaxed);
        let shown: Vec<_> = errors.iter().take(MAX_LISTED_ERRORS).cloned().collect();
        Box::new(error(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("{} bad snapshot(s); nothing of this request was accepted", errors.len()), "errors": shown}),
        ))
    };
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(e) => {
            let line = body[..e.valid_up_to()]
                .iter()
                .filter(|&&b| b == b'\n')
                .count()
                + 1;
            return Err(refuse(
                vec![json!({"line": line, "reason": "not valid UTF-8"})],
                1,
            ));
        }
    };
    let received = SystemTime::now();
    let trimmed = text.trim_start();
    if !ndjson && trimmed.starts_with('[') {
        // Each element is parsed on its own, so that an error names its index.
        let values: Vec<&serde_json::value::RawValue> =
            serde_json::from_str(text).map_err(|e| {
                refuse(
                    vec![json!({"reason": format!("not a JSON array of objects: {e}")})],
                    1,
                )
            })?;
        if values.len() > MAX_SNAPSHOTS_PER_REQUEST {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("{} snapshots; at most {MAX_SNAPSHOTS_PER_REQUEST} per request", values.len())}),
            )));
        }
        let total = values.len();
        let mut out = Vec::with_capacity(total);
        let mut errors = Vec::new();
        for (index, v) in values.into_iter().enumerate() {
            match ObservationRef::from_json(v.get(), received) {
                Ok(o) => out.push(o.into_observation()),
                Err(e) => errors.push(json!({"index": index, "reason": e.to_string()})),
            }
        }
        return if errors.is_empty() {
            Ok(out)
        } else {
            Err(refuse(errors, total))
        };
    }
    // One object, or NDJSON (one object per line).
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut total = 0;
    for (i, line) in text.split('\n').enumerate() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            continue;
        }
        total += 1;
        if total > MAX_SNAPSHOTS_PER_REQUEST {
            return Err(Box::new(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({"error": format!("more than {MAX_SNAPSHOTS_PER_REQUEST} snapshots per request")}),
            )));
        }
        match ObservationRef::from_json(line, received) {
            Ok(o) => out.push(o.into_observation()),
            Err(e) => errors.push(json!({"line": i + 1, "reason": e.to_string()})),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(refuse(errors, total))
    }
}

async fn monitors(State(service): State<Arc<Service>>) -> Response {
    let list: Vec<_> = service
        .monitors()
        .iter()
        .map(|m| service.status_of(m))
        .collect();
    axum::Json(json!({ "monitors": list })).into_response()
}

async fn monitor(State(service): State<Arc<Service>>, Path(name): Path<String>) -> Response {
    match service.monitors().iter().find(|m| m.config.name == name) {
        Some(m) => axum::Json(service.status_of(m)).into_response(),
        None => error(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no monitor named `{name}`")}),
        ),
    }
}

/// Checks `Authorization: Bearer <token>` against the admin token.
fn admin(service: &Service, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let var = &service.config.admin_token_env;
    let Some(token) = std::env::var(var).ok().filter(|t| !t.is_empty()) else {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            json!({"error": format!("admin endpoints are disabled: set the environment variable `{var}` to a token")}),
        )));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison of equal-length tokens.
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        Ok(())
    } else {
        Err(Box::new(error(
            StatusCode::UNAUTHORIZED,
            json!({"error": "missing or wrong admin bearer token"}),
        )))
    }
}

async fn resume(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = admin(&service, &headers) {
        return *resp;
    }
    match service.monitors().iter().find(|m| m.config.name == name) {
        None => error(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no monitor named `{name}`")}),
        ),
        Some(m) if !m.quarantined() => error(
            StatusCode::CONFLICT,
            json!({"error": format!("monitor `{name}` is not quarantined")}),
        ),
        Some(m) => {
            if m.resume() {
                (StatusCode::ACCEPTED, axum::Json(json!({"resumed": name}))).into_response()
            } else {
                error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({"error": format!("monitor `{name}` is stopped")}),
                )
            }
        }
    }
}

/// How long an API call waits for a monitor to validate and swap.
const SWAP_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapParams {
    /// The candidate's configuration (JSON); absent: the monitor's current one.
    config: Option<String>,
}

/// `PUT /v1/monitors/{name}/strategy`: the body is a component. Compiled off
/// the monitor's thread, validated by the monitor, then served from the next
/// batch on; refused with the reason otherwise (the running one keeps
/// serving).
async fn put_strategy(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    Query(p): Query<SwapParams>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(resp) = admin(&service, &headers) {
        return *resp;
    }
    let Some(monitor) = service
        .monitors()
        .iter()
        .find(|m| m.config.name == name)
        .cloned()
    else {
        return error(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no monitor named `{name}`")}),
        );
    };
    if let Some(c) = &p.config
        && let Err(e) = serde_json::from_str::<serde_json::Value>(c)
    {
        return error(
            StatusCode::BAD_REQUEST,
            json!({"error": format!("`config` is not JSON: {e}")}),
        );
    }
    let label = format!("upload to `{name}`");
    let outcome = tokio::task::spawn_blocking(move || {
        let component = match crate::runtime::StrategyComponent::from_bytes(
            crate::runtime::Runtime::shared(),
            label,
            &body,
        ) {
            Ok(c) => c,
            Err(e) => {
                let reason = format!("candidate refused: {e}");
                monitor.record_refusal(
                    "api",
                    &hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&body)),
                    &reason,
                );
                return Err((StatusCode::BAD_REQUEST, reason));
            }
        };
        monitor
            .swap(component, p.config, "api", SWAP_WAIT)
            .map_err(|e| (StatusCode::UNPROCESSABLE_ENTITY, e))
    })
    .await;
    swap_response(&service, &name, outcome)
}

fn swap_response(
    service: &Service,
    name: &str,
    outcome: Result<
        Result<super::monitor::SwapReport, (StatusCode, String)>,
        tokio::task::JoinError,
    >,
) -> Response {
    match outcome {
        Ok(Ok(report)) => axum::Json(json!({ "monitor": name, "swapped": report })).into_response(),
        Ok(Err((status, reason))) => error(
            status,
            json!({ "error": reason, "serving": service.monitors().iter().find(|m| m.config.name == name).map(|m| m.status().strategy) }),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
    }
}

/// `POST /v1/reload`: re-read the configuration file (admin).
async fn reload(State(service): State<Arc<Service>>, headers: HeaderMap) -> Response {
    if let Err(resp) = admin(&service, &headers) {
        return *resp;
    }
    let s = service.clone();
    match tokio::task::spawn_blocking(move || s.reload()).await {
        Ok(Ok(report)) => axum::Json(json!({ "reloaded": report })).into_response(),
        Ok(Err(e)) => error(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({"error": format!("configuration not reloaded: {e}")}),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
    }
}

/// `POST /v1/monitors/{name}/rollback`: serve the previous version again.
async fn rollback(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(resp) = admin(&service, &headers) {
        return *resp;
    }
    let Some(monitor) = service
        .monitors()
        .iter()
        .find(|m| m.config.name == name)
        .cloned()
    else {
        return error(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no monitor named `{name}`")}),
        );
    };
    let outcome = tokio::task::spawn_blocking(move || {
        monitor
            .rollback("rollback (api)", SWAP_WAIT)
            .map_err(|e| (StatusCode::CONFLICT, e))
    })
    .await;
    swap_response(&service, &name, outcome)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwapsParams {
    limit: Option<usize>,
}

/// `GET /v1/monitors/{name}/swaps`: swaps, refusals and rollbacks, newest first.
async fn swaps(
    State(service): State<Arc<Service>>,
    Path(name): Path<String>,
    Query(p): Query<SwapsParams>,
) -> Response {
    if !service.monitors().iter().any(|m| m.config.name == name) {
        return error(
            StatusCode::NOT_FOUND,
            json!({"error": format!("no monitor named `{name}`")}),
        );
    }
    let store = service.store.clone();
    store_query("swaps", move || {
        store.swaps(Some(&name), p.limit.unwrap_or(20))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FailuresParams {
    monitor: Option<String>,
    limit: Option<usize>,
}

async fn failures(
    State(service): State<Arc<Service>>,
    Query(p): Query<FailuresParams>,
) -> Response {
    let store = service.store.clone();
    store_query("failures", move || {
        store.failures(p.monitor.as_deref(), p.limit.unwrap_or(20))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignalsParams {
    monitor: Option<String>,
    model: Option<String>,
    since: Option<String>,
    limit: Option<usize>,
}

async fn signals(State(service): State<Arc<Service>>, Query(p): Query<SignalsParams>) -> Response {
    let since = match p.since.as_deref().map(parse_since) {
        None => None,
        Some(Ok(ms)) => Some(ms),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, json!({"error": e})),
    };
    let q = SignalQuery {
        monitor: p.monitor,
        model: p.model,
        since,
        limit: p.limit,
    };
    let store = service.store.clone();
    store_query("signals", move || store.signals(&q)).await
}

/// Runs a store query off the async threads; answers `{key: [...]}`, or
/// 500 with the error.
async fn store_query<T: serde::Serialize + Send + 'static>(
    key: &'static str,
    query: impl FnOnce() -> Result<Vec<T>, super::store::StoreError> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(query).await {
        Ok(Ok(list)) => axum::Json(json!({ key: list })).into_response(),
        Ok(Err(e)) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!({"error": e.to_string()}),
        ),
    }
}

/// `since`: integer ms, RFC 3339, or a duration ago like `15m`.
fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(crate::snapshot::system_time_to_ms(t));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(super::store::now_ms() - d.as_millis() as i64);
    }
    Err(format!(
        "`since` must be ms since the epoch, RFC 3339, or a duration like `15m`; got {s:?}"
    ))
}

async fn ready(State(service): State<Arc<Service>>) -> Response {
    if service.shutting_down() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if let Some(m) = service.monitors().iter().find(|m| !m.has_room()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("monitor `{}` is behind\n", m.config.name),
        )
            .into_response();
    }
    (StatusCode::OK, "ready\n").into_response()
}

async fn metrics(State(service): State<Arc<Service>>) -> Response {
    let store = service.store.clone();
    let deliveries = tokio::task::spawn_blocking(move || store.delivery_counts())
        .await
        .ok()
        .and_then(Result::ok);
    let mut out = String::new();
    let m = &service.metrics;
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "visutility_snapshots_accepted_total",
        "Snapshots accepted by ingestion.",
        m.accepted.load(Ordering::Relaxed),
    );
    counter(
        "visutility_snapshots_refused_total",
        "Snapshots refused as invalid.",
        m.refused.load(Ordering::Relaxed),
    );
    counter(
        "visutility_snapshots_rejected_busy_total",
        "Snapshots rejected with 503 because a monitor was behind.",
        m.rejected_busy.load(Ordering::Relaxed),
    );
    type Field = fn(&super::monitor::MonitorStats) -> u64;
    let per_monitor: [(&str, &str, &str, Field); 15] = [
        (
            "visutility_strategy_swaps_refused_total",
            "counter",
            "Strategy swaps refused by validation.",
            |s| s.swaps_refused.load(Ordering::Relaxed),
        ),
        (
            "visutility_points_shed_total",
            "counter",
            "Snapshots not queued for a failing monitor whose queue was full.",
            |s| s.points_shed.load(Ordering::Relaxed),
        ),
        (
            "visutility_strategy_log_lines_dropped_total",
            "counter",
            "Guest log lines dropped by the rate limit.",
            |s| s.log_lines_dropped.load(Ordering::Relaxed),
        ),
        (
            "visutility_strategy_output_bytes_dropped_total",
            "counter",
            "Guest stdout/stderr bytes dropped by the cap.",
            |s| s.output_bytes_dropped.load(Ordering::Relaxed),
        ),
        (
            "visutility_monitor_quarantined",
            "gauge",
            "1 when the monitor is quarantined.",
            |s| u64::from(s.quarantined.load(Ordering::Relaxed)),
        ),
        (
            "visutility_points_skipped_total",
            "counter",
            "Snapshots not evaluated: quarantined, or failing when the service stopped.",
            |s| s.points_skipped.load(Ordering::Relaxed),
        ),
        (
            "visutility_points_accepted_total",
            "counter",
            "Snapshots queued for a monitor.",
            |s| s.points_accepted.load(Ordering::Relaxed),
        ),
        (
            "visutility_points_evaluated_total",
            "counter",
            "Snapshots evaluated by a monitor's strategy.",
            |s| s.points_evaluated.load(Ordering::Relaxed),
        ),
        (
            "visutility_signals_suppressed_total",
            "counter",
            "Retrain verdicts suppressed by the cooldown.",
            |s| s.suppressed.load(Ordering::Relaxed),
        ),
        (
            "visutility_signals_recorded_total",
            "counter",
            "Signals recorded in the outbox.",
            |s| s.signals.load(Ordering::Relaxed),
        ),
        (
            "visutility_strategy_traps_total",
            "counter",
            "Failed strategy calls.",
            |s| s.traps.load(Ordering::Relaxed),
        ),
        (
            "visutility_strategy_fuel_total",
            "counter",
            "Fuel used by strategy calls.",
            |s| s.fuel.load(Ordering::Relaxed),
        ),
        (
            "visutility_monitor_lag_points",
            "gauge",
            "Snapshots accepted but not yet evaluated (or skipped).",
            |s| {
                s.points_accepted.load(Ordering::Relaxed).saturating_sub(
                    s.points_evaluated.load(Ordering::Relaxed)
                        + s.points_skipped.load(Ordering::Relaxed),
                )
            },
        ),
        (
            "visutility_monitor_queued_batches",
            "gauge",
            "Batches waiting in a monitor's queue.",
            |s| s.queued.load(Ordering::Relaxed) as u64,
        ),
        (
            "visutility_stale_models",
            "gauge",
            "Models currently stale.",
            |s| s.stale_models.load(Ordering::Relaxed),
        ),
    ];
    for (name, kind, help, f) in per_monitor {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for mon in service.monitors().iter() {
            let _ = writeln!(
                out,
                "{name}{{monitor=\"{}\"}} {}",
                mon.config.name,
                f(&mon.stats)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP visutility_verdicts_total Non-healthy verdicts by kind.\n# TYPE visutility_verdicts_total counter"
    );
    for mon in service.monitors().iter() {
        let s = &mon.stats;
        let _ = writeln!(
            out,
            "visutility_verdicts_total{{monitor=\"{}\",kind=\"warn\"}} {}",
            mon.config.name,
            s.verdicts_warn.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "visutility_verdicts_total{{monitor=\"{}\",kind=\"retrain\"}} {}",
            mon.config.name,
            s.verdicts_retrain.load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "# HELP visutility_strategy_call_seconds Latency of strategy calls.\n# TYPE visutility_strategy_call_seconds histogram"
    );
    for mon in service.monitors().iter() {
        let s = &mon.stats;
        let mut cumulative = 0;
        for (i, le) in LATENCY_BUCKETS.iter().enumerate() {
            cumulative += s.call_buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "visutility_strategy_call_seconds_bucket{{monitor=\"{}\",le=\"{le}\"}} {cumulative}",
                mon.config.name
            );
        }
        cumulative += s.call_buckets[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "visutility_strategy_call_seconds_bucket{{monitor=\"{}\",le=\"+Inf\"}} {cumulative}",
            mon.config.name
        );
        let _ = writeln!(
            out,
            "visutility_strategy_call_seconds_sum{{monitor=\"{}\"}} {}",
            mon.config.name,
            s.call_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(
            out,
            "visutility_strategy_call_seconds_count{{monitor=\"{}\"}} {cumulative}",
            mon.config.name
        );
    }
    let _ = writeln!(
        out,
        "# HELP visutility_deliveries Action deliveries by state.\n# TYPE visutility_deliveries gauge"
    );
    for state in ["pending", "delivered", "failed"] {
        let n = deliveries
            .as_ref()
            .and_then(|d| d.iter().find(|(s, _)| s == state))
            .map_or(0, |(_, n)| *n);
        let _ = writeln!(out, "visutility_deliveries{{state=\"{state}\"}} {n}");
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}
