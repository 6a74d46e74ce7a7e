//! The service's configuration: one TOML file.
//!
//! ```toml
//! listen = "127.0.0.1:7878"          # default
//! db = "visutility.db"               # SQLite file: signals, outbox, state
//!
//! [[monitor]]
//! name = "churn"
//! models = ["churn-*"]               # globs on model_version; default ["*"]
//! strategy = "builtin:page-hinkley"  # or a path to a .wasm component
//! config = { threshold = 5.0 }       # the strategy's JSON config, as TOML
//! cooldown = "30m"                   # no repeat signal per model within this
//! stale_after = "10m"                # a `stale` signal when a model goes silent
//! limits = { fuel = 1000000000, deadline = "2s", memory_mb = 64 }
//!
//! [[monitor.action]]
//! kind = "exec"                      # exec | webhook | log
//! argv = ["./retrain.sh", "{model_version}", "{monitor}"]
//! timeout = "10m"
//!
//! [[monitor.action]]
//! kind = "webhook"
//! url = "http://127.0.0.1:9000/retrain"
//! secret_env = "RETRAIN_WEBHOOK_SECRET"   # secrets come from the environment
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::runtime::Limits;

/// Default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7878";

/// The whole service configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Address of the HTTP API.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// SQLite file for signals, deliveries and detector state.
    #[serde(default = "default_db")]
    pub db: PathBuf,
    /// Snapshot batches a monitor may have queued before ingestion answers
    /// 503 (back-pressure instead of unbounded memory).
    #[serde(default = "default_queue")]
    pub queue_batches: usize,
    /// How often detector state is checkpointed (also on shutdown).
    #[serde(default = "default_checkpoint", deserialize_with = "duration")]
    pub checkpoint_every: Duration,
    /// Largest accepted request body, in bytes.
    #[serde(default = "default_body")]
    pub max_body_bytes: usize,
    /// Environment variable holding the bearer token of the admin endpoints
    /// (`POST /v1/monitors/{name}/resume`); unset means they are disabled.
    #[serde(default = "default_admin_token_env")]
    pub admin_token_env: String,
    /// How often the `.wasm` files of monitors with a path strategy are
    /// checked for changes (a changed, then stable, file is validated and
    /// swapped in). `"0s"` turns watching off.
    #[serde(default = "default_watch_interval", deserialize_with = "duration")]
    pub watch_interval: Duration,
    /// Canonicalise NaNs in strategy float arithmetic (bit-identical
    /// replays across CPU architectures; costs 1.3-1.8x on float-heavy
    /// strategies). Default off.
    #[serde(default)]
    pub canonicalize_nans: bool,
    /// The monitors.
    #[serde(default, rename = "monitor")]
    pub monitors: Vec<MonitorConfig>,
}

/// One monitor: a strategy over the models its selector matches.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MonitorConfig {
    /// Unique name.
    pub name: String,
    /// Globs on `model_version` (`*` any run, `?` one character).
    #[serde(default = "all_models")]
    pub models: Vec<String>,
    /// `builtin:NAME` or a path to a component.
    pub strategy: String,
    /// The strategy's configuration (any TOML value, passed as JSON).
    #[serde(default = "empty_table")]
    pub config: toml::Value,
    /// Per-call limits.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// No repeated signal for the same model within this.
    #[serde(default = "default_cooldown", deserialize_with = "duration")]
    pub cooldown: Duration,
    /// A `stale` signal when a model sends nothing for this long.
    #[serde(default, deserialize_with = "opt_duration")]
    pub stale_after: Option<Duration>,
    /// Record verdicts as shadow signals; never run actions.
    #[serde(default)]
    pub shadow: bool,
    /// With `shadow = true`: the monitor this one is a candidate for; its
    /// status then shows how their retrain verdicts agree.
    #[serde(default)]
    pub shadows: Option<String>,
    /// How many snapshots of the service's stream apart a retrain verdict of
    /// the shadow and one of the monitor it shadows (same model) may be and
    /// still count as the same detection.
    #[serde(default = "default_agreement_tolerance")]
    pub agreement_tolerance: u64,
    /// Consecutive failed calls (trap, out of fuel, deadline, memory cap)
    /// after which the monitor is quarantined.
    #[serde(default = "default_max_failures")]
    pub max_failures: u32,
    /// First delay before re-creating a failed strategy instance; doubled
    /// per consecutive failure (at most 30 s).
    #[serde(default = "default_restart_backoff", deserialize_with = "duration")]
    pub restart_backoff: Duration,
    /// After a swap, how long a new version is on probation.
    #[serde(default = "default_probation", deserialize_with = "duration")]
    pub probation: Duration,
    /// Failures within the probation that roll a new version back.
    #[serde(default = "default_probation_failures")]
    pub probation_failures: u32,
    /// What to do with a signal.
    #[serde(default, rename = "action")]
    pub actions: Vec<ActionConfig>,
}

/// Per-call limits of a monitor's strategy; absent fields take
/// [`Limits::default`].
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Fuel per call.
    pub fuel: Option<u64>,
    /// Deadline per call.
    #[serde(default, deserialize_with = "opt_duration")]
    pub deadline: Option<Duration>,
    /// Memory cap in MiB.
    pub memory_mb: Option<usize>,
}

impl LimitsConfig {
    /// The effective limits.
    pub fn limits(&self) -> Limits {
        let d = Limits::default();
        Limits {
            fuel: self.fuel.unwrap_or(d.fuel),
            deadline: self.deadline.unwrap_or(d.deadline),
            memory_bytes: self.memory_mb.map_or(d.memory_bytes, |m| m << 20),
            ..d
        }
    }
}

/// An action run for each signal of a (non-shadow) monitor.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ActionConfig {
    /// Write the signal to the log.
    Log,
    /// Run a command: `{model_version}` and `{monitor}` in `argv` are
    /// replaced; the signal is on stdin as JSON and in `VISUTILITY_*`
    /// environment variables. Exit code 0 = delivered.
    Exec {
        /// Program and arguments.
        argv: Vec<String>,
        /// Kill the command after this long.
        #[serde(default = "default_exec_timeout", deserialize_with = "duration")]
        timeout: Duration,
        /// Attempts before the delivery is marked failed.
        #[serde(default = "default_attempts")]
        max_attempts: u32,
    },
    /// POST the signal as JSON; 2xx = delivered.
    Webhook {
        /// Target URL.
        url: String,
        /// Environment variable holding the HMAC-SHA256 secret; the body's
        /// signature goes in `X-Visutility-Signature: sha256=<hex>`.
        secret_env: Option<String>,
        /// Refused: secrets never live in the file.
        #[serde(default)]
        secret: Option<String>,
        /// Per-request timeout.
        #[serde(default = "default_webhook_timeout", deserialize_with = "duration")]
        timeout: Duration,
        /// Attempts before the delivery is marked failed.
        #[serde(default = "default_attempts")]
        max_attempts: u32,
    },
}

impl ActionConfig {
    /// `log`, `exec` or `webhook`.
    pub fn kind(&self) -> &'static str {
        match self {
            ActionConfig::Log => "log",
            ActionConfig::Exec { .. } => "exec",
            ActionConfig::Webhook { .. } => "webhook",
        }
    }

    /// Attempts before failure.
    pub fn max_attempts(&self) -> u32 {
        match self {
            ActionConfig::Log => 1,
            ActionConfig::Exec { max_attempts, .. }
            | ActionConfig::Webhook { max_attempts, .. } => *max_attempts,
        }
    }
}

/// A configuration problem, naming the file, the key and the problem.
#[derive(Debug, thiserror::Error)]
#[error("config `{}`: {message}", file.display())]
pub struct ConfigError {
    /// The file (or `<default>`).
    pub file: PathBuf,
    /// What is wrong, and where.
    pub message: String,
}

impl ServiceConfig {
    /// The configuration used when no file is given: loopback, one monitor
    /// `default` running `builtin:baseline` (baseline learnt from each
    /// model's first 20 points) over all models, a log action.
    pub fn embedded_default() -> Self {
        ServiceConfig {
            listen: default_listen(),
            db: default_db(),
            queue_batches: default_queue(),
            checkpoint_every: default_checkpoint(),
            max_body_bytes: default_body(),
            admin_token_env: default_admin_token_env(),
            watch_interval: default_watch_interval(),
            canonicalize_nans: false,
            monitors: vec![MonitorConfig {
                name: "default".into(),
                models: all_models(),
                strategy: "builtin:baseline".into(),
                config: toml::Value::Table(toml::map::Map::from_iter([(
                    "warmup".to_string(),
                    toml::Value::Integer(20),
                )])),
                limits: LimitsConfig::default(),
                cooldown: default_cooldown(),
                stale_after: None,
                shadow: false,
                shadows: None,
                agreement_tolerance: default_agreement_tolerance(),
                max_failures: default_max_failures(),
                restart_backoff: default_restart_backoff(),
                probation: default_probation(),
                probation_failures: default_probation_failures(),
                actions: vec![ActionConfig::Log],
            }],
        }
    }

    /// Reads and validates `path`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file, the key and the problem.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let err = |message: String| ConfigError {
            file: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let config: ServiceConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// Checks what serde cannot: unique names, globs, secrets.
    ///
    /// # Errors
    ///
    /// A message naming the monitor and key.
    pub fn validate(&self) -> Result<(), String> {
        if self.monitors.is_empty() {
            return Err("no `[[monitor]]` defined; add at least one".into());
        }
        if self.queue_batches == 0 {
            return Err("`queue_batches` must be at least 1".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.monitors.iter().enumerate() {
            let at = format!("monitor[{i}] (`{}`)", m.name);
            if m.name.is_empty()
                || !m
                    .name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(format!(
                    "{at}: `name` must be non-empty and use only letters, digits, `-`, `_`, `.`"
                ));
            }
            if !names.insert(m.name.as_str()) {
                return Err(format!("{at}: `name` is used by another monitor"));
            }
            if m.max_failures == 0 {
                return Err(format!("{at}: `max_failures` must be at least 1"));
            }
            if m.models.is_empty() {
                return Err(format!(
                    "{at}: `models` is empty, so the monitor would never see a snapshot"
                ));
            }
            if let Some(other) = &m.shadows {
                if !m.shadow {
                    return Err(format!(
                        "{at}: `shadows = \"{other}\"` needs `shadow = true`"
                    ));
                }
                if other == &m.name || !self.monitors.iter().any(|o| &o.name == other) {
                    return Err(format!("{at}: `shadows` names no other monitor: {other:?}"));
                }
            }
            for (j, action) in m.actions.iter().enumerate() {
                match action {
                    ActionConfig::Webhook {
                        secret: Some(_), ..
                    } => {
                        return Err(format!(
                            "{at}: action[{j}]: `secret` must not be written in the file; put it in an environment \
                             variable and set `secret_env = \"VAR\"`"
                        ));
                    }
                    ActionConfig::Webhook { url, .. }
                        if !(url.starts_with("http://") || url.starts_with("https://")) =>
                    {
                        return Err(format!(
                            "{at}: action[{j}]: `url` must start with http:// or https://, got {url:?}"
                        ));
                    }
                    ActionConfig::Exec { argv, .. } if argv.is_empty() => {
                        return Err(format!("{at}: action[{j}]: `argv` must name a program"));
                    }
                    _ => {}
                }
                if action.max_attempts() == 0 {
                    return Err(format!(
                        "{at}: action[{j}]: `max_attempts` must be at least 1"
                    ));
                }
            }
        }
        Ok(())
    }
}

impl MonitorConfig {
    /// The strategy configuration as JSON text.
    pub fn config_json(&self) -> String {
        serde_json::to_string(&self.config).unwrap_or_else(|_| "{}".into())
    }

    /// Whether `model` is selected by this monitor's globs.
    pub fn selects(&self, model: &str) -> bool {
        self.models
            .iter()
            .any(|g| glob_match(g.as_bytes(), model.as_bytes()))
    }
}

/// `*` matches any run (also empty), `?` one character; everything else
/// literally.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some(p);
            mark = t;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            t = mark;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("valid default address")
}
fn default_db() -> PathBuf {
    PathBuf::from("visutility.db")
}
fn default_queue() -> usize {
    256
}
fn default_checkpoint() -> Duration {
    Duration::from_secs(30)
}
fn default_body() -> usize {
    64 << 20
}
fn all_models() -> Vec<String> {
    vec!["*".into()]
}
fn empty_table() -> toml::Value {
    toml::Value::Table(toml::map::Map::new())
}
fn default_cooldown() -> Duration {
    Duration::from_secs(30 * 60)
}
fn default_exec_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_webhook_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_max_failures() -> u32 {
    5
}
fn default_restart_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_agreement_tolerance() -> u64 {
    100
}
fn default_watch_interval() -> Duration {
    Duration::from_millis(50)
}
fn default_probation() -> Duration {
    Duration::from_secs(300)
}
fn default_probation_failures() -> u32 {
    3
}
fn default_admin_token_env() -> String {
    "VISUTILITY_ADMIN_TOKEN".into()
}
fn default_attempts() -> u32 {
    8
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration like \"30s\" or \"10m\" ({e})"
        ))
    })
}

fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration(d).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ServiceConfig, String> {
        let c: ServiceConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn globs() {
        assert!(glob_match(b"*", b"anything"));
        assert!(glob_match(b"churn-*", b"churn-v3"));
        assert!(!glob_match(b"churn-*", b"fraud-v3"));
        assert!(glob_match(b"*-v?", b"fraud-v3"));
        assert!(!glob_match(b"*-v?", b"fraud-v31"));
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
    }

    #[test]
    fn a_full_config_parses() {
        let c = parse(
            r#"
            listen = "127.0.0.1:9999"
            [[monitor]]
            name = "m1"
            models = ["churn-*"]
            strategy = "builtin:page-hinkley"
            config = { threshold = 5.0, mode = "down" }
            cooldown = "5m"
            stale_after = "30s"
            limits = { fuel = 1000, deadline = "100ms", memory_mb = 16 }
            [[monitor.action]]
            kind = "exec"
            argv = ["echo", "{model_version}"]
            [[monitor.action]]
            kind = "webhook"
            url = "http://127.0.0.1:1/x"
            secret_env = "S"
            "#,
        )
        .unwrap();
        let m = &c.monitors[0];
        assert_eq!(m.config_json(), r#"{"mode":"down","threshold":5.0}"#);
        assert_eq!(m.cooldown, Duration::from_secs(300));
        assert_eq!(m.limits.limits().memory_bytes, 16 << 20);
        assert_eq!(m.actions.len(), 2);
    }

    #[test]
    fn errors_name_the_key_and_problem() {
        let e = parse(
            "[[monitor]]\nname = \"m\"\nstrategy = \"builtin:baseline\"\ncooldown = \"soon\"\n",
        )
        .unwrap_err();
        assert!(
            e.contains("cooldown") && e.contains("not a duration"),
            "{e}"
        );
        let e =
            parse("[[monitor]]\nname = \"m\"\nstrategy = \"x\"\ncoldown = \"5m\"\n").unwrap_err();
        assert!(e.contains("unknown field `coldown`"), "{e}");
        let e = parse("[[monitor]]\nname = \"m\"\nstrategy = \"x\"\n[[monitor.action]]\nkind = \"webhook\"\nurl = \"http://x\"\nsecret = \"hunter2\"\n")
            .unwrap_err();
        assert!(e.contains("secret_env"), "{e}");
        let e = parse("[[monitor]]\nname = \"m\"\nstrategy = \"x\"\n[[monitor]]\nname = \"m\"\nstrategy = \"x\"\n").unwrap_err();
        assert!(
            e.contains("monitor[1]") && e.contains("used by another"),
            "{e}"
        );
    }
}
