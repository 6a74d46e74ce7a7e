//! `builtin:baseline`: the seed's baseline comparison as a WebAssembly
//! strategy.
//!
//! A point is degraded when `score + tolerance < baseline`, exactly as the
//! seed's `MetricSnapshot::is_degraded`. Every degraded point gets a `retrain`
//! verdict; de-duplication (cooldown per monitor and model) is the host's job.
//!
//! Config (JSON):
//!
//! | key | type | default | meaning |
//! | --- | --- | --- | --- |
//! | `baseline` | number | none | the reference score; required unless `warmup` is set |
//! | `tolerance` | number ≥ 0 | `0.05` | how far below the baseline a score may fall |
//! | `model_version` | string | none | when set, points of other models are ignored |
//! | `warmup` | integer ≥ 1 | none | when `baseline` is absent, the baseline is the mean score of the first `warmup` points of each model |
//!
//! With both `baseline` and `warmup` absent, the config is refused.

use serde::{Deserialize, Serialize};
use visutility_strategy::{Detector, Point, Verdict, export_strategy};

/// Configuration of the baseline strategy.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The reference score.
    pub baseline: Option<f64>,
    /// How far below the baseline a score may fall before it is degraded.
    #[serde(default = "default_tolerance")]
    pub tolerance: f64,
    /// Only this model is evaluated when set.
    pub model_version: Option<String>,
    /// Learn the baseline from the mean of the first N points of each model.
    pub warmup: Option<u32>,
}

fn default_tolerance() -> f64 {
    0.05
}

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "baseline",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "baseline": {"type": "number", "description": "reference score; required unless warmup is set"},
    "tolerance": {"type": "number", "minimum": 0, "default": 0.05, "description": "a point is degraded when score + tolerance < baseline"},
    "model_version": {"type": "string", "description": "only this model is evaluated"},
    "warmup": {"type": "integer", "minimum": 1, "description": "learn the baseline as the mean score of the first N points of each model"}
  },
  "anyOf": [{"required": ["baseline"]}, {"required": ["warmup"]}]
}"#;

/// Baseline comparison for one model stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// False when `model_version` is set and names another model.
    active: bool,
    /// The reference score, once known.
    baseline: Option<f64>,
    tolerance: f64,
    /// Warm-up: how many points to average, and the running sum / count.
    warmup: u32,
    warmup_sum: f64,
    warmup_seen: u32,
}

impl Detector for Baseline {
    type Config = Config;
    const NAME: &'static str = "baseline";
    const DESCRIPTION: &'static str =
        "retrain when the score falls more than `tolerance` below a fixed or warm-up baseline";

    fn config_schema() -> Option<String> {
        Some(SCHEMA.to_string())
    }

    fn validate(c: &Config) -> Result<(), String> {
        if let Some(b) = c.baseline
            && !b.is_finite()
        {
            return Err(format!("`baseline` must be a finite number, got {b}"));
        }
        if !c.tolerance.is_finite() || c.tolerance < 0.0 {
            return Err(format!(
                "`tolerance` must be a finite number >= 0, got {}",
                c.tolerance
            ));
        }
        if c.warmup == Some(0) {
            return Err("`warmup` must be at least 1".into());
        }
        if c.baseline.is_none() && c.warmup.is_none() {
            return Err(
                "set `baseline` (a number) or `warmup` (learn it from the first N points)".into(),
            );
        }
        Ok(())
    }

    fn new(c: &Config, model: &str) -> Self {
        Baseline {
            active: c.model_version.as_deref().is_none_or(|m| m == model),
            baseline: c.baseline,
            tolerance: c.tolerance,
            warmup: c.warmup.unwrap_or(0),
            warmup_sum: 0.0,
            warmup_seen: 0,
        }
    }

    fn update(&mut self, p: &Point<'_>) -> Verdict {
        if !self.active {
            return Verdict::Healthy;
        }
        let Some(baseline) = self.baseline else {
            self.warmup_sum += p.score;
            self.warmup_seen += 1;
            if self.warmup_seen >= self.warmup {
                self.baseline = Some(self.warmup_sum / f64::from(self.warmup_seen));
            }
            return Verdict::Healthy;
        };
        if p.score + self.tolerance < baseline {
            Verdict::retrain(format!(
                "score {:.4} is {:.4} below baseline {:.4} (tolerance {:.4})",
                p.score,
                baseline - p.score,
                baseline,
                self.tolerance
            ))
        } else {
            Verdict::Healthy
        }
    }
}

export_strategy!(Baseline);

#[cfg(test)]
mod tests {
    use super::*;
    use visutility_strategy::parse_config;

    fn run(config: &str, model: &str, scores: &[f64]) -> Vec<usize> {
        let cfg = parse_config::<Baseline>(config).unwrap();
        let mut d = Baseline::new(&cfg, model);
        let mut fired = Vec::new();
        visutility_strategy::evaluate_columns(&mut d, scores, &[], &[], &[], |i, retrain, _| {
            assert!(retrain);
            fired.push(i)
        });
        fired
    }

    #[test]
    fn fixed_baseline_fires_on_each_degraded_point() {
        let fired = run(r#"{"baseline":0.95}"#, "m", &[0.95, 0.80, 0.91, 0.89, 0.90]);
        assert_eq!(fired, vec![1, 3]);
    }

    #[test]
    fn warmup_learns_the_mean_of_the_first_points() {
        // baseline = 0.9; 0.84 + 0.05 < 0.9 fires, 0.86 + 0.05 does not.
        let fired = run(r#"{"warmup":3}"#, "m", &[0.8, 0.9, 1.0, 0.86, 0.84]);
        assert_eq!(fired, vec![4]);
    }

    #[test]
    fn other_models_are_ignored_when_model_version_is_set() {
        assert!(run(r#"{"baseline":0.95,"model_version":"a"}"#, "b", &[0.1]).is_empty());
        assert_eq!(
            run(r#"{"baseline":0.95,"model_version":"a"}"#, "a", &[0.1]),
            vec![0]
        );
    }

    #[test]
    fn bad_configs_are_refused_with_the_field_named() {
        let e = parse_config::<Baseline>(r#"{"tolerence":0.1,"baseline":1}"#)
            .err()
            .unwrap();
        assert!(e.contains("tolerence"), "{e}");
        let e = parse_config::<Baseline>("{}").err().unwrap();
        assert!(e.contains("warmup"), "{e}");
        let e = parse_config::<Baseline>(r#"{"baseline":1,"tolerance":-1}"#)
            .err()
            .unwrap();
        assert!(e.contains("tolerance"), "{e}");
    }

    #[test]
    fn state_round_trips_mid_warmup() {
        let cfg = parse_config::<Baseline>(r#"{"warmup":4}"#).unwrap();
        let mut a = Baseline::new(&cfg, "m");
        for s in [1.0, 1.0] {
            a.update(&Point::new(0, s, None, 0));
        }
        let mut b: Baseline =
            visutility_strategy::restore_state(&visutility_strategy::save_state(&a)).unwrap();
        for s in [1.0, 1.0] {
            assert_eq!(b.update(&Point::new(0, s, None, 0)), Verdict::Healthy);
        }
        assert!(matches!(
            b.update(&Point::new(0, 0.9, None, 0)),
            Verdict::Retrain(_)
        ));
    }
}
