//! Test guest: misbehaves on purpose, as told by its config, so that tests
//! can check that the sandbox contains it. Never bundled.

use serde::{Deserialize, Serialize};
use std::hash::{BuildHasher, Hasher};

use visutility_strategy::{Detector, Point, Verdict, export_strategy, log};

/// `mode`: `loop`, `panic`, `grow`, `recurse`, `log-spam`, `print-spam`,
/// `huge-reason`, `nan-bits`, `every-point`, `huge-state`, `snoop`, `configure-loop` or
/// `ok`; misbehaves after `at` points.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    mode: String,
    #[serde(default)]
    at: u64,
}

/// The mode and a counter.
#[derive(Serialize, Deserialize)]
pub struct Hostile {
    mode: String,
    at: u64,
    seen: u64,
    hoard: Vec<Vec<u8>>,
}

fn recurse(n: u64) -> u64 {
    let pad = [n; 64];
    if n == u64::MAX {
        0
    } else {
        recurse(std::hint::black_box(n + 1)) + pad[(n % 64) as usize]
    }
}

impl Detector for Hostile {
    type Config = Config;
    const NAME: &'static str = "hostile";
    const DESCRIPTION: &'static str = "misbehaves on purpose (test fixture)";

    fn validate(c: &Config) -> Result<(), String> {
        if c.mode == "configure-loop" {
            let mut n = 0u64;
            loop {
                n = std::hint::black_box(n + 1);
            }
        }
        Ok(())
    }

    fn new(c: &Config, _model: &str) -> Self {
        Hostile {
            mode: c.mode.clone(),
            at: c.at,
            seen: 0,
            hoard: Vec::new(),
        }
    }

    fn update(&mut self, _p: &Point<'_>) -> Verdict {
        self.seen += 1;
        if self.seen <= self.at {
            return Verdict::Healthy;
        }
        match self.mode.as_str() {
            "loop" => loop {
                std::hint::black_box(&mut self.seen);
            },
            "panic" => panic!("hostile strategy panicked on purpose"),
            "grow" => loop {
                self.hoard.push(vec![1u8; 1 << 20]);
            },
            "recurse" => Verdict::warn(format!("{}", recurse(0))),
            "log-spam" => {
                let huge = "x".repeat(1 << 20);
                log::warn(&huge);
                for i in 0..100_000 {
                    log::info(&format!("spam line {i}"));
                }
                Verdict::Healthy
            }
            "print-spam" => {
                for i in 0..20_000 {
                    println!("stdout spam line {i}");
                    eprintln!("stderr spam line {i}");
                }
                Verdict::Healthy
            }
            "nan-bits" => {
                // A NaN computed at run time, and its bits: what NaN
                // canonicalisation makes the same on every CPU.
                let (a, b) = (std::hint::black_box(0.0f64), std::hint::black_box(0.0f64));
                let nan = std::hint::black_box(a / b);
                Verdict::warn(format!("nan_bits={:016x}", nan.to_bits()))
            }
            "huge-reason" => Verdict::warn("r".repeat(8 << 20)),
            "every-point" => Verdict::warn(format!("point {}", self.seen)),
            "huge-state" => {
                if self.hoard.is_empty() {
                    self.hoard.push(vec![7u8; 17 << 20]);
                }
                Verdict::Healthy
            }
            "snoop" => {
                // Everything a strategy could learn about the host: the
                // environment, the clocks, randomness.
                let env: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                let args = std::env::args().count();
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis())
                    .unwrap_or(0);
                let mut h = std::collections::hash_map::RandomState::new().build_hasher();
                h.write_u64(self.seen);
                Verdict::warn(format!(
                    "env={} args={args} now_ms={now} random={:x} home={:?}",
                    env.len(),
                    h.finish(),
                    std::env::var("HOME").ok()
                ))
            }
            _ => Verdict::Healthy,
        }
    }
}

export_strategy!(Hostile);
