//! Test guest: a strategy written with the SDK the way a user would, used to
//! check `inspect`, `replay` and named metrics on a freshly built component.

use serde::{Deserialize, Serialize};
use visutility_strategy::{Detector, Point, Verdict, export_strategy, log};

/// Which value to watch and where to warn / retrain.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `score`, `loss` or the name of a metric.
    #[serde(default = "default_watch")]
    watch: String,
    /// Warn above this.
    warn_above: f64,
    /// Retrain above this.
    retrain_above: f64,
}

fn default_watch() -> String {
    "score".into()
}

/// Stateless apart from a counter, so save/restore is observable.
#[derive(Serialize, Deserialize)]
pub struct Threshold {
    watch: String,
    warn_above: f64,
    retrain_above: f64,
    seen: u64,
}

impl Detector for Threshold {
    type Config = Config;
    const NAME: &'static str = "threshold";
    const DESCRIPTION: &'static str = "warn / retrain when a watched value rises above thresholds";

    fn validate(c: &Config) -> Result<(), String> {
        if c.warn_above > c.retrain_above {
            return Err("`warn_above` must not exceed `retrain_above`".into());
        }
        Ok(())
    }

    fn new(c: &Config, model: &str) -> Self {
        log::info(&format!("new detector for {model}"));
        Threshold {
            watch: c.watch.clone(),
            warn_above: c.warn_above,
            retrain_above: c.retrain_above,
            seen: 0,
        }
    }

    fn update(&mut self, p: &Point<'_>) -> Verdict {
        self.seen += 1;
        let value = match self.watch.as_str() {
            "score" => Some(p.score),
            "loss" => p.loss,
            name => p.metric(name),
        };
        match value {
            Some(v) if v > self.retrain_above => Verdict::retrain(format!(
                "{} {v} > {} (point {} of this stream)",
                self.watch, self.retrain_above, self.seen
            )),
            Some(v) if v > self.warn_above => {
                Verdict::warn(format!("{} {v} > {}", self.watch, self.warn_above))
            }
            _ => Verdict::Healthy,
        }
    }
}

export_strategy!(Threshold);
