//! `builtin:ewma`: EWMA control chart.
//!
//! With target mean `μ` and standard deviation `σ` (given, or learnt from the
//! first `warmup` values), the chart statistic is
//! `z_t = λ·x_t + (1 − λ)·z_{t−1}` with `z_0 = μ`, and its standard deviation
//! after `t` points is `σ_z = σ·sqrt(λ/(2−λ)·(1 − (1−λ)^{2t}))`. A point whose
//! `|z − μ|` exceeds `L·σ_z` is a `retrain` verdict (and the chart restarts at
//! `z = μ`); one above `warn_L·σ_z` is a `warn`.
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `lambda` | `0.2` | smoothing weight of the newest value, in (0, 1] |
//! | `L` | `3.0` | retrain limit, in σ_z |
//! | `warn_L` | `2.0` | warn limit, in σ_z (below `L`; `null` to disable) |
//! | `target` | learnt | the in-control mean |
//! | `sigma` | learnt | the in-control standard deviation |
//! | `warmup` | `30` | values used to learn what is not given |
//! | `direction` | `"both"` | `"up"`, `"down"` or `"both"` |
//! | `watch` | `"score"` | `"score"`, `"loss"` or `"metrics.<name>"` |

use serde::{Deserialize, Serialize};
use visutility_strategy::stats::{Reference, check_reference};
use visutility_strategy::{Detector, Direction, Point, Verdict, Watch, export_strategy};

/// Configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Smoothing weight.
    pub lambda: f64,
    /// Retrain limit, in σ_z.
    #[serde(rename = "L")]
    pub l: f64,
    /// Warn limit, in σ_z.
    #[serde(rename = "warn_L")]
    pub warn_l: Option<f64>,
    /// In-control mean; learnt when absent.
    pub target: Option<f64>,
    /// In-control standard deviation; learnt when absent.
    pub sigma: Option<f64>,
    /// Values used to learn what is absent.
    pub warmup: u32,
    /// Shifts to detect.
    pub direction: Direction,
    /// The watched value.
    pub watch: Watch,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            lambda: 0.2,
            l: 3.0,
            warn_l: Some(2.0),
            target: None,
            sigma: None,
            warmup: 30,
            direction: Direction::Both,
            watch: Watch::Score,
        }
    }
}

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "ewma",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "lambda": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.2},
    "L": {"type": "number", "exclusiveMinimum": 0, "default": 3.0},
    "warn_L": {"type": ["number", "null"], "exclusiveMinimum": 0, "default": 2.0},
    "target": {"type": "number"},
    "sigma": {"type": "number", "exclusiveMinimum": 0},
    "warmup": {"type": "integer", "minimum": 2, "default": 30},
    "direction": {"enum": ["up", "down", "both"], "default": "both"},
    "watch": {"type": "string", "default": "score"}
  }
}"#;

/// EWMA chart state of one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ewma {
    cfg: Config,
    reference: Reference,
    z: Option<f64>,
    /// Points since the chart (re)started.
    t: u64,
}

impl Detector for Ewma {
    type Config = Config;
    const NAME: &'static str = "ewma";
    const DESCRIPTION: &'static str =
        "EWMA control chart: the smoothed value leaves its L-sigma limits";

    fn config_schema() -> Option<String> {
        Some(SCHEMA.to_string())
    }

    fn validate(c: &Config) -> Result<(), String> {
        if !(c.lambda > 0.0 && c.lambda <= 1.0) {
            return Err(format!("`lambda` must be in (0, 1], got {}", c.lambda));
        }
        if !(c.l.is_finite() && c.l > 0.0) {
            return Err(format!("`L` must be a finite number > 0, got {}", c.l));
        }
        if let Some(w) = c.warn_l
            && !(w > 0.0 && w < c.l)
        {
            return Err(format!(
                "`warn_L` must be > 0 and below `L` ({}), got {w}",
                c.l
            ));
        }
        check_reference(c.target, c.sigma, c.warmup)?;
        Ok(())
    }

    fn new(c: &Config, _model: &str) -> Self {
        Ewma {
            cfg: c.clone(),
            reference: Reference::new(c.target, c.sigma, c.warmup, 1e-9),
            z: None,
            t: 0,
        }
    }

    fn update(&mut self, p: &Point<'_>) -> Verdict {
        let Some(x) = p.value(&self.cfg.watch) else {
            return Verdict::Healthy;
        };
        let Some((mu, sigma)) = self.reference.observe(x) else {
            return Verdict::Healthy;
        };
        let lambda = self.cfg.lambda;
        let z = lambda * x + (1.0 - lambda) * self.z.unwrap_or(mu);
        self.z = Some(z);
        self.t += 1;
        let sigma_z = sigma
            * (lambda / (2.0 - lambda) * (1.0 - (1.0 - lambda).powf(2.0 * self.t as f64))).sqrt();
        let dev = z - mu;
        let counts =
            (dev > 0.0 && self.cfg.direction.up()) || (dev < 0.0 && self.cfg.direction.down());
        if !counts {
            return Verdict::Healthy;
        }
        let k = dev.abs() / sigma_z;
        if k > self.cfg.l {
            self.z = None;
            self.t = 0;
            return Verdict::retrain(format!(
                "EWMA {:.4} is {k:.2}σ_z {} target {mu:.4} (> L = {}) on {} (value {x:.4}, λ {lambda})",
                z,
                if dev < 0.0 { "below" } else { "above" },
                self.cfg.l,
                self.cfg.watch
            ));
        }
        if let Some(w) = self.cfg.warn_l
            && k > w
        {
            return Verdict::warn(format!(
                "EWMA {:.4} is {k:.2}σ_z {} target {mu:.4} (> warn_L = {w}) on {}",
                z,
                if dev < 0.0 { "below" } else { "above" },
                self.cfg.watch
            ));
        }
        Verdict::Healthy
    }
}

export_strategy!(Ewma);

#[cfg(test)]
mod tests {
    use super::*;
    use visutility_strategy::{evaluate_columns, parse_config, restore_state, save_state};

    fn run(cfg: &str, xs: &[f64]) -> Vec<(usize, bool)> {
        let mut d = Ewma::new(&parse_config::<Ewma>(cfg).unwrap(), "m");
        let mut out = Vec::new();
        evaluate_columns(&mut d, xs, &[], &[], &[], |i, retrain, _| {
            out.push((i, retrain))
        });
        out
    }

    #[test]
    fn first_point_limit_uses_the_exact_variance() {
        // t = 1: σ_z = σ·λ; z − μ = λ(x − μ). With λ = 0.5, σ = 1, x = μ − 3.5:
        // |z − μ| / σ_z = 3.5 > L = 3.
        assert_eq!(
            run(r#"{"target": 0, "sigma": 1, "lambda": 0.5}"#, &[-3.5]),
            vec![(0, true)]
        );
        assert_eq!(
            run(r#"{"target": 0, "sigma": 1, "lambda": 0.5}"#, &[-2.5]),
            vec![(0, false)]
        );
        assert!(
            run(
                r#"{"target": 0, "sigma": 1, "lambda": 0.5, "direction": "up"}"#,
                &[-3.5]
            )
            .is_empty()
        );
    }

    #[test]
    fn detects_a_drift_after_warmup_with_warnings_first() {
        let xs: Vec<f64> = (0..200)
            .map(|i| {
                0.9 + if i % 2 == 0 { 0.01 } else { -0.01 }
                    - if i >= 100 {
                        0.0005 * (i - 100) as f64
                    } else {
                        0.0
                    }
            })
            .collect();
        let hits = run("{}", &xs);
        let first_retrain = hits.iter().find(|(_, r)| *r).expect("retrain").0;
        let first_warn = hits.iter().find(|(_, r)| !*r).expect("warn").0;
        assert!(first_warn < first_retrain && first_warn >= 100, "{hits:?}");
    }

    #[test]
    fn state_round_trips() {
        let cfg = parse_config::<Ewma>(r#"{"warmup": 5}"#).unwrap();
        let mut a = Ewma::new(&cfg, "m");
        let xs: Vec<f64> = (0..100).map(|i| (i % 7) as f64 * 0.1).collect();
        for &x in &xs[..20] {
            a.update(&Point::new(0, x, None, 0));
        }
        let mut b: Ewma = restore_state(&save_state(&a)).unwrap();
        for &x in &xs[20..] {
            assert_eq!(
                a.update(&Point::new(0, x, None, 0)),
                b.update(&Point::new(0, x, None, 0))
            );
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        assert!(
            parse_config::<Ewma>(r#"{"lambda": 0}"#)
                .unwrap_err()
                .contains("lambda")
        );
        assert!(
            parse_config::<Ewma>(r#"{"L": 2, "warn_L": 3}"#)
                .unwrap_err()
                .contains("warn_L")
        );
        assert!(
            parse_config::<Ewma>(r#"{"l": 2}"#)
                .unwrap_err()
                .contains("unknown field `l`")
        );
    }
}
