//! `builtin:page-hinkley`: the Page-Hinkley test with the semantics and
//! defaults of River's `river.drift.PageHinkley` (River 0.26), so that the
//! same values give the same detections at the same indices.
//!
//! The test tracks a running mean of the watched value and two cumulative
//! sums of deviations from it (faded by `alpha`, biased by `delta`): one to
//! catch an increase, one a decrease. A change is detected when the gap
//! between a sum and its extreme exceeds `threshold` (after `min_instances`
//! points). As in River, the update after a detection starts over from a
//! fresh state.
//!
//! Config (JSON), River's names and defaults:
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `min_instances` | `30` | points before any detection |
//! | `delta` | `0.005` | magnitude of changes to tolerate |
//! | `threshold` | `50.0` | detection threshold (lambda) |
//! | `alpha` | `0.9999` | forgetting factor of the cumulative sums |
//! | `mode` | `"both"` | `"up"`, `"down"` or `"both"` |
//! | `watch` | `"score"` | `"score"`, `"loss"` or `"metrics.<name>"` |

use serde::{Deserialize, Serialize};
use visutility_strategy::{Detector, Direction, Point, Verdict, Watch, export_strategy};

/// Configuration (River's parameter names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Points before any detection.
    pub min_instances: u64,
    /// Magnitude of changes to tolerate.
    pub delta: f64,
    /// Detection threshold (lambda).
    pub threshold: f64,
    /// Forgetting factor.
    pub alpha: f64,
    /// Direction(s) to detect.
    pub mode: Direction,
    /// The watched value.
    pub watch: Watch,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            min_instances: 30,
            delta: 0.005,
            threshold: 50.0,
            alpha: 1.0 - 0.0001,
            mode: Direction::Both,
            watch: Watch::Score,
        }
    }
}

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "page-hinkley",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "min_instances": {"type": "integer", "minimum": 1, "maximum": 9007199254740992, "default": 30},
    "delta": {"type": "number", "default": 0.005},
    "threshold": {"type": "number", "exclusiveMinimum": 0, "default": 50.0},
    "alpha": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.9999},
    "mode": {"enum": ["up", "down", "both"], "default": "both"},
    "watch": {"type": "string", "default": "score", "description": "score, loss or metrics.<name>"}
  }
}"#;

/// Page-Hinkley state of one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PageHinkley {
    cfg: Config,
    n: f64,
    mean: f64,
    sum_increase: f64,
    sum_decrease: f64,
    min_increase: f64,
    max_decrease: f64,
    drift_detected: bool,
    /// Points fed since the stream started (for reasons).
    seen: u64,
}

impl PageHinkley {
    /// A fresh detector with `cfg`.
    pub fn with_config(cfg: Config) -> Self {
        let mut d = PageHinkley {
            cfg,
            n: 0.0,
            mean: 0.0,
            sum_increase: 0.0,
            sum_decrease: 0.0,
            min_increase: 0.0,
            max_decrease: 0.0,
            drift_detected: false,
            seen: 0,
        };
        d.reset();
        d
    }

    #[cold]
    fn reset(&mut self) {
        self.n = 0.0;
        self.mean = 0.0;
        self.sum_increase = 0.0;
        self.sum_decrease = 0.0;
        self.min_increase = f64::INFINITY;
        // River starts the running maximum at -1, not at -infinity.
        self.max_decrease = -1.0;
        self.drift_detected = false;
    }

    /// Feeds one value; returns the test statistics when a change is
    /// detected.
    #[inline]
    pub fn update_value(&mut self, x: f64) -> Option<(f64, f64)> {
        if self.drift_detected {
            self.reset();
        }
        self.seen += 1;
        self.n += 1.0;
        self.mean += (1.0 / self.n) * (x - self.mean);
        let dev = x - self.mean;
        self.sum_increase = self.cfg.alpha * self.sum_increase + dev - self.cfg.delta;
        self.sum_decrease = self.cfg.alpha * self.sum_decrease + dev + self.cfg.delta;
        if self.sum_increase < self.min_increase {
            self.min_increase = self.sum_increase;
        }
        if self.sum_decrease > self.max_decrease {
            self.max_decrease = self.sum_decrease;
        }
        // Validated to be at most 2^53: the signed conversion is exact and
        // one instruction (the unsigned one is a branchy sequence in WASM).
        if self.n >= self.cfg.min_instances as i64 as f64 {
            let up = self.sum_increase - self.min_increase;
            let down = self.max_decrease - self.sum_decrease;
            let t = self.cfg.threshold;
            self.drift_detected =
                (self.cfg.mode.up() && up > t) || (self.cfg.mode.down() && down > t);
            if self.drift_detected {
                return Some((up, down));
            }
        }
        None
    }
}

impl Detector for PageHinkley {
    type Config = Config;
    const NAME: &'static str = "page-hinkley";
    const DESCRIPTION: &'static str =
        "Page-Hinkley test for a change in the mean (River semantics and defaults)";

    fn config_schema() -> Option<String> {
        Some(SCHEMA.to_string())
    }

    fn validate(c: &Config) -> Result<(), String> {
        for (name, v) in [
            ("delta", c.delta),
            ("threshold", c.threshold),
            ("alpha", c.alpha),
        ] {
            if !v.is_finite() {
                return Err(format!("`{name}` must be a finite number, got {v}"));
            }
        }
        if c.threshold <= 0.0 {
            return Err(format!("`threshold` must be > 0, got {}", c.threshold));
        }
        if !(c.alpha > 0.0 && c.alpha <= 1.0) {
            return Err(format!("`alpha` must be in (0, 1], got {}", c.alpha));
        }
        if c.min_instances == 0 || c.min_instances > 1 << 53 {
            return Err(format!(
                "`min_instances` must be between 1 and 2^53, got {}",
                c.min_instances
            ));
        }
        Ok(())
    }

    fn new(c: &Config, _model: &str) -> Self {
        PageHinkley::with_config(c.clone())
    }

    #[inline]
    fn update(&mut self, p: &Point<'_>) -> Verdict {
        let Some(x) = p.value(&self.cfg.watch) else {
            return Verdict::Healthy;
        };
        match self.update_value(x) {
            None => Verdict::Healthy,
            Some((up, down)) => self.detection(x, up, down),
        }
    }
}

impl PageHinkley {
    /// The retrain verdict of a detection. Cold and out of line, so that the
    /// per-point path stays small enough to inline into the SDK's loop.
    #[cold]
    #[inline(never)]
    fn detection(&self, x: f64, up: f64, down: f64) -> Verdict {
        let (dir, stat) = if down > self.cfg.threshold && self.cfg.mode.down() {
            ("decrease", down)
        } else {
            ("increase", up)
        };
        Verdict::retrain(format!(
            "Page-Hinkley: {dir} statistic {stat:.4} > threshold {} on {} (value {x:.4}, running mean {:.4} over {} points)",
            self.cfg.threshold, self.cfg.watch, self.mean, self.n
        ))
    }
}

export_strategy!(PageHinkley);

#[cfg(test)]
mod tests {
    use super::*;
    use visutility_strategy::{parse_config, restore_state, save_state};

    fn detections(cfg: &str, xs: &[f64]) -> Vec<usize> {
        let mut d = PageHinkley::new(&parse_config::<PageHinkley>(cfg).unwrap(), "m");
        xs.iter()
            .enumerate()
            .filter(|(_, x)| d.update_value(**x).is_some())
            .map(|(i, _)| i)
            .collect()
    }

    /// River's own docstring example: `rng.choices([0, 1], k=1000) +
    /// rng.choices(range(4, 8), k=1000)` with seed 12345 detects at 1006. Our
    /// fixtures (tests/fixtures/river) cover that path with recorded values;
    /// here, a step the test must catch shortly after it happens.
    #[test]
    fn detects_a_step_and_restarts_after_detection() {
        let xs: Vec<f64> = (0..2000)
            .map(|i| {
                if i < 1000 {
                    (i % 2) as f64
                } else {
                    4.0 + (i % 4) as f64
                }
            })
            .collect();
        let d = detections("{}", &xs);
        assert!(!d.is_empty() && d[0] > 1000 && d[0] < 1020, "{d:?}");
        // After a detection the next update starts over: no detection can
        // follow within min_instances points.
        for w in d.windows(2) {
            assert!(w[1] - w[0] >= 30, "{d:?}");
        }
    }

    #[test]
    fn modes_pick_the_direction() {
        let down: Vec<f64> = (0..400).map(|i| if i < 200 { 10.0 } else { 0.0 }).collect();
        assert!(!detections(r#"{"mode":"down"}"#, &down).is_empty());
        assert!(detections(r#"{"mode":"up"}"#, &down).is_empty());
    }

    #[test]
    fn state_round_trips_bit_exactly_including_infinity() {
        let cfg = parse_config::<PageHinkley>("{}").unwrap();
        let mut a = PageHinkley::new(&cfg, "m");
        a.update_value(1.0);
        let mut b: PageHinkley = restore_state(&save_state(&a)).unwrap();
        for i in 0..500 {
            let x = if i < 250 { 1.0 } else { 9.0 };
            assert_eq!(a.update_value(x), b.update_value(x));
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        assert!(
            parse_config::<PageHinkley>(r#"{"mode":"sideways"}"#)
                .unwrap_err()
                .contains("sideways")
        );
        assert!(
            parse_config::<PageHinkley>(r#"{"alpha":2}"#)
                .unwrap_err()
                .contains("alpha")
        );
        assert!(
            parse_config::<PageHinkley>(r#"{"watch":"latency"}"#)
                .unwrap_err()
                .contains("metrics.<name>")
        );
    }
}
