//! Test guest: misbehaves on purpose, as told by its config, so that tests
//! can check that the sandbox contains it. Never bundled.

use serde::{Deserialize, Serialize};
use visutility_strategy::{Detector, Point, Verdict, export_strategy};

/// `mode`: `loop`, `panic`, `grow`, `recurse` or `ok`; misbehaves at the
/// point with index `at`.
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
    if n == u64::MAX { 0 } else { recurse(std::hint::black_box(n + 1)) + pad[(n % 64) as usize] }
}

impl Detector for Hostile {
    type Config = Config;
    const NAME: &'static str = "hostile";
    const DESCRIPTION: &'static str = "misbehaves on purpose (test fixture)";

    fn new(c: &Config, _model: &str) -> Self {
        Hostile { mode: c.mode.clone(), at: c.at, seen: 0, hoard: Vec::new() }
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
            _ => Verdict::Healthy,
        }
    }
}

export_strategy!(Hostile);
