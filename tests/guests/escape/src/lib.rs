//! Test guest: tries to read a host file and open a socket. Its component
//! imports `wasi:filesystem` and `wasi:sockets`, which the sandbox does not
//! grant, so the host must refuse to load it and name the import.

use serde::{Deserialize, Serialize};
use visutility_strategy::{Detector, Point, Verdict, export_strategy};

/// No settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {}

/// No state.
#[derive(Serialize, Deserialize)]
pub struct Escape;

impl Detector for Escape {
    type Config = Config;
    const NAME: &'static str = "escape";
    const DESCRIPTION: &'static str = "tries to reach files and the network (test fixture)";

    fn new(_: &Config, _: &str) -> Self {
        Escape
    }

    fn update(&mut self, _p: &Point<'_>) -> Verdict {
        let file = std::fs::read_to_string("/etc/passwd")
            .map(|s| s.len())
            .unwrap_or(0);
        let net = std::net::TcpStream::connect("127.0.0.1:22").is_ok();
        Verdict::warn(format!("file={file} net={net}"))
    }
}

export_strategy!(Escape);
