//! `builtin:adwin`: ADWIN (ADaptive WINdowing, Bifet & Gavaldà 2007) with the
//! semantics and defaults of River's `river.drift.ADWIN` (River 0.26), so that
//! the same values give the same detections at the same indices.
//!
//! ADWIN keeps a window of recent values compressed into exponential
//! histograms (level `i` holds up to `max_buckets + 1` buckets of `2^i`
//! values). Every `clock` values (once the window is longer than
//! `grace_period`) it tries every split of the window into an older and a
//! newer part; when their means differ by more than a Hoeffding-style bound
//! that depends on `delta`, the oldest bucket is dropped and a change is
//! reported. As in River, the update after a detection starts over from an
//! empty window. Memory and time per point are O(log(window)).
//!
//! Config (JSON), River's names and defaults:
//!
//! | key | default | meaning |
//! | --- | --- | --- |
//! | `delta` | `0.002` | significance: smaller means fewer, surer detections |
//! | `clock` | `32` | check for a change every `clock` values |
//! | `max_buckets` | `5` | buckets per level before two are merged |
//! | `min_window_length` | `5` | smallest sub-window compared |
//! | `grace_period` | `10` | values before the first check |
//! | `watch` | `"score"` | `"score"`, `"loss"` or `"metrics.<name>"` |

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use visutility_strategy::{Detector, Point, Verdict, Watch, export_strategy};

/// Configuration (River's parameter names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Significance of the cut test.
    pub delta: f64,
    /// Check every `clock` values.
    pub clock: u32,
    /// Buckets per level before merging.
    pub max_buckets: u32,
    /// Smallest sub-window compared.
    pub min_window_length: u32,
    /// Values before the first check.
    pub grace_period: u32,
    /// The watched value.
    pub watch: Watch,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            delta: 0.002,
            clock: 32,
            max_buckets: 5,
            min_window_length: 5,
            grace_period: 10,
            watch: Watch::Score,
        }
    }
}

const SCHEMA: &str = r#"{
  "$schema": "https://json-schema.org/draft/2020-12/schema",
  "title": "adwin",
  "type": "object",
  "additionalProperties": false,
  "properties": {
    "delta": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.002},
    "clock": {"type": "integer", "minimum": 1, "default": 32},
    "max_buckets": {"type": "integer", "minimum": 1, "default": 5},
    "min_window_length": {"type": "integer", "minimum": 1, "default": 5},
    "grace_period": {"type": "integer", "minimum": 0, "default": 10},
    "watch": {"type": "string", "default": "score", "description": "score, loss or metrics.<name>"}
  }
}"#;

/// Buckets of one level, oldest first: each holds the total and the variance
/// (sum of squared deviations) of `2^level` values.
///
/// One ring buffer of pairs: dropping the oldest buckets (every other point)
/// must not shift memory, which in WebAssembly is a call out of the guest.
/// Saved as two lists (`totals`, `variances`), the state format of earlier
/// versions.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(from = "LevelState", into = "LevelState")]
struct Level {
    /// `(total, variance)` of each bucket.
    buckets: VecDeque<(f64, f64)>,
}

#[derive(Serialize, Deserialize)]
struct LevelState {
    totals: Vec<f64>,
    variances: Vec<f64>,
}

impl From<LevelState> for Level {
    fn from(s: LevelState) -> Self {
        Level {
            buckets: s.totals.into_iter().zip(s.variances).collect(),
        }
    }
}

impl From<Level> for LevelState {
    fn from(l: Level) -> Self {
        let (totals, variances) = l.buckets.into_iter().unzip();
        LevelState { totals, variances }
    }
}

impl Level {
    fn len(&self) -> usize {
        self.buckets.len()
    }

    fn push(&mut self, total: f64, variance: f64) {
        self.buckets.push_back((total, variance));
    }

    fn drop_oldest(&mut self, n: usize) {
        for _ in 0..n {
            self.buckets.pop_front();
        }
    }

    fn total(&self, k: usize) -> f64 {
        self.buckets[k].0
    }
}

/// What a detection looked like, for the reason.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cut {
    /// Mean of the older sub-window minus mean of the newer one.
    pub delta_mean: f64,
    /// The bound it exceeded.
    pub epsilon: f64,
    /// Window length when the change was found.
    pub width: f64,
}

/// ADWIN state of one stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Adwin {
    cfg: Config,
    total: f64,
    variance: f64,
    width: f64,
    tick: u64,
    levels: Vec<Level>,
    drift_detected: bool,
}

impl Adwin {
    /// A fresh detector with `cfg`.
    pub fn with_config(cfg: Config) -> Self {
        Adwin {
            cfg,
            total: 0.0,
            variance: 0.0,
            width: 0.0,
            tick: 0,
            levels: vec![Level::default()],
            drift_detected: false,
        }
    }

    /// The current window length.
    pub fn width(&self) -> f64 {
        self.width
    }

    /// Mean of the current window.
    pub fn estimation(&self) -> f64 {
        if self.width == 0.0 {
            0.0
        } else {
            self.total / self.width
        }
    }

    /// Feeds one value; returns the first cut found when a change is
    /// detected.
    #[inline]
    pub fn update_value(&mut self, x: f64) -> Option<Cut> {
        if self.drift_detected {
            self.start_over();
        }
        self.insert(x);
        let cut = self.detect_change();
        self.drift_detected = cut.is_some();
        cut
    }

    /// River starts over from an empty window after a detection.
    #[cold]
    fn start_over(&mut self) {
        *self = Adwin::with_config(self.cfg.clone());
    }

    #[inline]
    fn insert(&mut self, x: f64) {
        self.levels[0].push(x, 0.0);
        self.width += 1.0;
        let mut added_variance = 0.0;
        if self.width > 1.0 {
            let d = x - self.total / (self.width - 1.0);
            added_variance = (self.width - 1.0) * d * d / self.width;
        }
        self.variance += added_variance;
        self.total += x;
        self.compress();
    }

    /// Merges the two oldest buckets of every full level into one bucket of
    /// the next level.
    #[inline]
    fn compress(&mut self) {
        if self.levels[0].len() == self.cfg.max_buckets as usize + 1 {
            self.merge_full_levels();
        }
    }

    #[inline(never)]
    fn merge_full_levels(&mut self) {
        let full = self.cfg.max_buckets as usize + 1;
        let mut level = 0;
        while self.levels[level].len() == full {
            let n = (1u64 << level) as f64;
            let l = &self.levels[level];
            let ((t0, v0), (t1, v1)) = (l.buckets[0], l.buckets[1]);
            let (m0, m1) = (t0 / n, t1 / n);
            let merged_variance = v0 + v1 + n * 0.5 * (m0 - m1) * (m0 - m1);
            if level + 1 == self.levels.len() {
                self.levels.push(Level::default());
            }
            self.levels[level + 1].push(t0 + t1, merged_variance);
            self.levels[level].drop_oldest(2);
            if self.levels[level + 1].len() < full {
                break;
            }
            level += 1;
        }
    }

    /// Drops the oldest bucket (from the highest level).
    fn drop_oldest_bucket(&mut self) {
        let top = self.levels.len() - 1;
        let n = (1u64 << top) as f64;
        let (u, v) = self.levels[top].buckets[0];
        let mu = u / n;
        self.width -= n;
        self.total -= u;
        let mu_window = self.total / self.width;
        self.variance -=
            v + n * self.width * (mu - mu_window) * (mu - mu_window) / (n + self.width);
        self.levels[top].drop_oldest(1);
        if self.levels[top].len() == 0 {
            self.levels.pop();
        }
    }

    #[inline]
    fn detect_change(&mut self) -> Option<Cut> {
        self.tick += 1;
        if !self.tick.is_multiple_of(u64::from(self.cfg.clock.max(1)))
            || self.width <= f64::from(self.cfg.grace_period)
        {
            return None;
        }
        self.scan_for_cut()
    }

    /// The cut test over every split of the window (every `clock` points).
    #[inline(never)]
    fn scan_for_cut(&mut self) -> Option<Cut> {
        let mut first_cut = None;
        let min_len = f64::from(self.cfg.min_window_length);
        'shrink: loop {
            // Constant while the window is: computed once per pass, not once
            // per split (the same expressions, so the same bits as River).
            let delta_prime = (2.0 * self.width.ln() / self.cfg.delta).ln();
            let variance_per_point = self.variance / self.width;
            let (mut n0, mut n1) = (0.0_f64, self.width);
            let (mut u0, mut u1) = (0.0_f64, self.total);
            // From the oldest bucket (highest level, index 0) to the newest.
            for level in (0..self.levels.len()).rev() {
                let size = (1u64 << level) as f64;
                let count = self.levels[level].len();
                for k in 0..count {
                    let t = self.levels[level].total(k);
                    n0 += size;
                    n1 -= size;
                    u0 += t;
                    u1 -= t;
                    if level == 0 && k == count - 1 {
                        break 'shrink;
                    }
                    let delta_mean = (u0 / n0) - (u1 / n1);
                    if n1 >= min_len && n0 >= min_len {
                        let epsilon =
                            Self::cut_bound(min_len, n0, n1, delta_prime, variance_per_point);
                        if delta_mean.abs() > epsilon {
                            first_cut.get_or_insert(Cut {
                                delta_mean,
                                epsilon,
                                width: self.width,
                            });
                            if self.width > 0.0 {
                                self.drop_oldest_bucket();
                                continue 'shrink;
                            }
                        }
                    }
                }
            }
            break;
        }
        first_cut
    }

    fn cut_bound(min_len: f64, n0: f64, n1: f64, delta_prime: f64, variance_per_point: f64) -> f64 {
        let m_recip = 1.0 / (n0 - min_len + 1.0) + 1.0 / (n1 - min_len + 1.0);
        (2.0 * m_recip * variance_per_point * delta_prime).sqrt()
            + 2.0 / 3.0 * delta_prime * m_recip
    }
}

impl Detector for Adwin {
    type Config = Config;
    const NAME: &'static str = "adwin";
    const DESCRIPTION: &'static str =
        "ADWIN adaptive windowing: a change in the mean of a recent window (River semantics)";

    fn config_schema() -> Option<String> {
        Some(SCHEMA.to_string())
    }

    fn validate(c: &Config) -> Result<(), String> {
        if !(c.delta > 0.0 && c.delta < 1.0) {
            return Err(format!("`delta` must be in (0, 1), got {}", c.delta));
        }
        if c.clock == 0 {
            return Err("`clock` must be at least 1".into());
        }
        if c.max_buckets == 0 {
            return Err("`max_buckets` must be at least 1".into());
        }
        Ok(())
    }

    fn new(c: &Config, _model: &str) -> Self {
        Adwin::with_config(c.clone())
    }

    #[inline]
    fn update(&mut self, p: &Point<'_>) -> Verdict {
        let Some(x) = p.value(&self.cfg.watch) else {
            return Verdict::Healthy;
        };
        match self.update_value(x) {
            None => Verdict::Healthy,
            Some(cut) => self.detection(cut),
        }
    }
}

impl Adwin {
    /// The retrain verdict of a detection. Cold and out of line, so that the
    /// per-point path stays small enough to inline into the SDK's loop.
    #[cold]
    #[inline(never)]
    fn detection(&self, cut: Cut) -> Verdict {
        Verdict::retrain(format!(
            "ADWIN: mean of {} {} by {:.4} (> bound {:.4}, delta {}) within a window of {} points; window shrunk to {}",
            self.cfg.watch,
            if cut.delta_mean > 0.0 {
                "dropped"
            } else {
                "rose"
            },
            cut.delta_mean.abs(),
            cut.epsilon,
            self.cfg.delta,
            cut.width,
            self.width
        ))
    }
}

export_strategy!(Adwin);

#[cfg(test)]
mod tests {
    use super::*;
    use visutility_strategy::{parse_config, restore_state, save_state};

    fn step(n: usize) -> Vec<f64> {
        (0..n)
            .map(|i| {
                if i < n / 2 {
                    0.2 + 0.01 * (i % 7) as f64
                } else {
                    0.8 + 0.01 * (i % 5) as f64
                }
            })
            .collect()
    }

    #[test]
    fn detects_a_mean_shift_and_not_a_constant_stream() {
        let mut d = Adwin::with_config(Config::default());
        assert!((0..5000).all(|_| d.update_value(1.0).is_none()));
        let mut d = Adwin::with_config(Config::default());
        let hits: Vec<usize> = step(2000)
            .iter()
            .enumerate()
            .filter_map(|(i, x)| d.update_value(*x).map(|_| i))
            .collect();
        assert!(
            !hits.is_empty() && hits[0] >= 1000 && hits[0] < 1100,
            "{hits:?}"
        );
    }

    #[test]
    fn window_stats_match_a_direct_computation() {
        let mut d = Adwin::with_config(Config {
            clock: 1_000_000,
            ..Config::default()
        });
        let xs: Vec<f64> = (0..777).map(|i| ((i * 37) % 101) as f64 / 10.0).collect();
        for &x in &xs {
            d.update_value(x);
        }
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let ss: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
        assert_eq!(d.width(), 777.0);
        assert!((d.estimation() - mean).abs() < 1e-9);
        assert!(
            (d.variance - ss).abs() / ss < 1e-9,
            "{} vs {ss}",
            d.variance
        );
        let buckets: usize = d.levels.iter().map(Level::len).sum();
        assert!(buckets <= 6 * d.levels.len() && d.levels.len() <= 10);
    }

    #[test]
    fn levels_save_as_two_lists_like_earlier_versions() {
        let mut level = Level::default();
        level.push(1.5, 0.25);
        level.push(-2.0, 4.0);
        let as_lists = LevelState {
            totals: vec![1.5, -2.0],
            variances: vec![0.25, 4.0],
        };
        assert_eq!(
            postcard::to_allocvec(&level).unwrap(),
            postcard::to_allocvec(&as_lists).unwrap()
        );
        let back: Level = postcard::from_bytes(&postcard::to_allocvec(&as_lists).unwrap()).unwrap();
        assert_eq!(back.buckets, level.buckets);
    }

    #[test]
    fn state_round_trips_mid_window() {
        let xs = step(3000);
        let mut a = Adwin::with_config(Config::default());
        for &x in &xs[..1234] {
            a.update_value(x);
        }
        let mut b: Adwin = restore_state(&save_state(&a)).unwrap();
        for &x in &xs[1234..] {
            assert_eq!(a.update_value(x), b.update_value(x));
        }
    }

    #[test]
    fn bad_config_names_the_field() {
        assert!(
            parse_config::<Adwin>(r#"{"delta":0}"#)
                .unwrap_err()
                .contains("delta")
        );
        assert!(
            parse_config::<Adwin>(r#"{"clock":0}"#)
                .unwrap_err()
                .contains("clock")
        );
        assert!(
            parse_config::<Adwin>(r#"{"grace":3}"#)
                .unwrap_err()
                .contains("grace")
        );
    }
}
