//! `builtin:cusum`: two-sided tabular CUSUM.
//!
//! With target mean `μ` and standard deviation `σ` (given, or learnt from the
//! first `warmup` values), every value `x` updates two cumulative sums:
//!
//! ```text
//! S⁺ = max(0, S⁺ + (x − μ) − kσ)     (upward shift)
//! S⁻ = max(0, S⁻ + (μ − x) − kσ)     (downward shift)
//! ```
//!
//! A sum above `hσ` is a `retrain` verdict (and both sums restart at 0); a sum
//! above `warn_h·σ`, when set, is a `warn`. `k` (slack) and `h` (decision
//! interval) are in units of σ, as in the textbook chart (k = 0.5, h = 5
//! detects a 1σ shift in ~10 points with an in-control run length of ~465).
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `target` | learnt | the in-control mean μ |
//! | `sigma` | learnt | the in-control standard deviation σ |
//! | `warmup` | `30` | values used to learn μ and/or σ |
//! | `k` | `0.5` | slack, in σ |
//! | `h` | `5.0` | decision interval, in σ |
//! | `warn_h` | none | warn interval, in σ (below `h`) |
//! | `direction` | `"both"` | `"up"`, `"down"` or `"both"` |
//! | `watch` | `"score"` | `"score"`, `"loss"` or `"metrics.<name>"` |

use serde::{Deserialize, Serialize};
use visutility_strategy::stats::{Reference, check_reference};
use visutility_strategy::{Detector, Direction, Point, Verdict, Watch, export_strategy};

/// Configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// In-control mean; learnt when absent.
    pub target: Option<f64>,
    /// In-control standard deviation; learnt when absent.
    pub sigma: Option<f64>,
    /// Values used to learn what is absent.
    pub warmup: u32,
    /// Slack, in σ.
    pub k: f64,
    /// Decision interval, in σ.
    pub h: f64,
    /// Warn interval, in σ.
    pub warn_h: Option<f64>,
    /// Shifts to detect.
    pub direction: Direction,
    /// The watched value.
    pub watch: Watch,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            target: None,
            sigma: None,
            warmup: 30,
            k: 0.5,
            h: 5.0,
            warn_h: None,
            direction: Direction::Both,
            watch: Watch::Score,
        }
    }
}

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "cusum",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "target": {"type": "number", "description": "in-control mean; learnt from warmup when absent"},
    "sigma": {"type": "number", "exclusiveMinimum": 0, "description": "in-control std; learnt from warmup when absent"},
    "warmup": {"type": "integer", "minimum": 2, "default": 30},
    "k": {"type": "number", "minimum": 0, "default": 0.5},
    "h": {"type": "number", "exclusiveMinimum": 0, "default": 5.0},
    "warn_h": {"type": "number", "exclusiveMinimum": 0},
    "direction": {"enum": ["up", "down", "both"], "default": "both"},
    "watch": {"type": "string", "default": "score"}
  }
}"#;

/// CUSUM state of one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cusum {
    cfg: Config,
    reference: Reference,
    upper: f64,
    lower: f64,
}

impl Detector for Cusum {
    type Config = Config;
    const NAME: &'static str = "cusum";
    const DESCRIPTION: &'static str =
        "two-sided tabular CUSUM: a sustained shift of the mean, in units of sigma";

    fn config_schema() -> Option<String> {
        Some(SCHEMA.to_string())
    }

    fn validate(c: &Config) -> Result<(), String> {
        check_reference(c.target, c.sigma, c.warmup)?;
        if !(c.k.is_finite() && c.k >= 0.0) {
            return Err(format!("`k` must be a finite number >= 0, got {}", c.k));
        }
        if !(c.h.is_finite() && c.h > 0.0) {
            return Err(format!("`h` must be a finite number > 0, got {}", c.h));
        }
        if let Some(w) = c.warn_h
            && !(w > 0.0 && w < c.h)
        {
            return Err(format!(
                "`warn_h` must be > 0 and below `h` ({}), got {w}",
                c.h
            ));
        }
        Ok(())
    }

    fn new(c: &Config, _model: &str) -> Self {
        Cusum {
            cfg: c.clone(),
            reference: Reference::new(c.target, c.sigma, c.warmup, 1e-9),
            upper: 0.0,
            lower: 0.0,
        }
    }

    fn update(&mut self, p: &Point<'_>) -> Verdict {
        let Some(x) = p.value(&self.cfg.watch) else {
            return Verdict::Healthy;
        };
        let Some((mu, sigma)) = self.reference.observe(x) else {
            return Verdict::Healthy;
        };
        let slack = self.cfg.k * sigma;
        if self.cfg.direction.up() {
            self.upper = (self.upper + (x - mu) - slack).max(0.0);
        }
        if self.cfg.direction.down() {
            self.lower = (self.lower + (mu - x) - slack).max(0.0);
        }
        let (name, sum) = if self.upper >= self.lower {
            ("S+ (upward shift)", self.upper)
        } else {
            ("S- (downward shift)", self.lower)
        };
        let limit = self.cfg.h * sigma;
        if sum > limit {
            self.upper = 0.0;
            self.lower = 0.0;
            return Verdict::retrain(format!(
                "CUSUM {name} = {sum:.4} > h·σ = {limit:.4} on {} (value {x:.4}, target {mu:.4}, σ {sigma:.4})",
                self.cfg.watch
            ));
        }
        if let Some(w) = self.cfg.warn_h
            && sum > w * sigma
        {
            return Verdict::warn(format!(
                "CUSUM {name} = {sum:.4} > warn_h·σ = {:.4} on {} (value {x:.4}, target {mu:.4})",
                w * sigma,
                self.cfg.watch
            ));
        }
        Verdict::Healthy
    }
}

export_strategy!(Cusum);

#[cfg(test)]
mod tests {
    use super::*;
    use visutility_strategy::{evaluate_columns, parse_config, restore_state, save_state};

    fn run(cfg: &str, xs: &[f64]) -> Vec<(usize, bool)> {
        let mut d = Cusum::new(&parse_config::<Cusum>(cfg).unwrap(), "m");
        let mut out = Vec::new();
        evaluate_columns(&mut d, xs, &[], &[], &[], |i, retrain, _| {
            out.push((i, retrain))
        });
        out
    }

    fn noisy(n: usize, level: f64, seed: u64) -> Vec<f64> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                level + 0.01 * (((x >> 11) as f64 / (1u64 << 53) as f64) - 0.5) * 3.46
            })
            .collect()
    }

    #[test]
    fn detects_a_three_sigma_drop_quickly_and_stays_quiet_in_control() {
        let mut xs = noisy(500, 0.9, 3);
        xs.extend(noisy(200, 0.87, 5));
        let hits = run(r#"{"warmup": 100, "h": 8}"#, &xs);
        let first = hits.iter().find(|(_, r)| *r).expect("a detection").0;
        assert!((500..520).contains(&first), "{hits:?}");
        assert!(hits.iter().all(|(i, _)| *i >= 500), "false alarm: {hits:?}");
    }

    #[test]
    fn given_target_and_warn_interval() {
        let hits = run(
            r#"{"target": 1.0, "sigma": 0.1, "h": 4, "warn_h": 2, "direction": "down"}"#,
            &[0.8, 0.8, 0.8, 0.8],
        );
        // S- grows by 0.15 per point: 0.15, 0.30 (> 0.2 warn), 0.45 (> 0.4 retrain), then restarts.
        assert_eq!(hits, vec![(1, false), (2, true)]);
        assert!(
            run(
                r#"{"target": 1.0, "sigma": 0.1, "direction": "up"}"#,
                &[0.0; 20]
            )
            .is_empty()
        );
    }

    #[test]
    fn state_round_trips() {
        let xs = noisy(300, 0.5, 9);
        let cfg = parse_config::<Cusum>("{}").unwrap();
        let mut a = Cusum::new(&cfg, "m");
        for &x in &xs[..50] {
            a.update(&Point::new(0, x, None, 0));
        }
        let mut b: Cusum = restore_state(&save_state(&a)).unwrap();
        for &x in &xs[50..] {
            assert_eq!(
                a.update(&Point::new(0, x, None, 0)),
                b.update(&Point::new(0, x, None, 0))
            );
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        assert!(
            parse_config::<Cusum>(r#"{"h": 0}"#)
                .unwrap_err()
                .contains("`h`")
        );
        assert!(
            parse_config::<Cusum>(r#"{"warn_h": 9}"#)
                .unwrap_err()
                .contains("warn_h")
        );
        assert!(
            parse_config::<Cusum>(r#"{"sigma": -1, "target": 0}"#)
                .unwrap_err()
                .contains("sigma")
        );
    }
}
