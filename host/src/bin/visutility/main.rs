//! `visutility`: the command-line interface. The only place that prints,
//! exits, or uses `anyhow`.

mod demo;
mod inspect;
mod loadgen;
mod replay;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// VisuTility: decide when deployed models need retraining, with strategies
/// that run as sandboxed WebAssembly components.
#[derive(Debug, Parser)]
#[command(name = "visutility", version, about, long_about = None, propagate_version = true)]
struct Cli {
    /// Log more (-v: info, -vv: debug, -vvv: trace). `RUST_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    /// Canonicalise NaNs in strategy float arithmetic, so that replays match
    /// bit for bit across CPU architectures too (costs 1.3-1.8x on
    /// float-heavy strategies; off, replays are still byte-identical on one
    /// architecture).
    #[arg(long, global = true, env = "VISUTILITY_CANONICALIZE_NANS")]
    canonicalize_nans: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the monitoring service: HTTP ingestion, monitors, durable
    /// signals, retrain actions, metrics.
    Run(run::RunArgs),
    /// Stream a synthetic, degrading model through the bundled baseline
    /// strategy and show the retrain signals. Start here.
    Demo(demo::DemoArgs),
    /// Back-test a strategy on a recorded NDJSON stream of snapshots.
    Replay(replay::ReplayArgs),
    /// Show what a strategy component is: name, version, config schema, WIT
    /// version, size, imports.
    Inspect(inspect::InspectArgs),
    /// Load a strategy, configure it, and report whether it is usable.
    Validate(inspect::ValidateArgs),
    /// List the strategies bundled in this binary.
    Strategies,
    /// Load-test a running service: post NDJSON batches, report
    /// snapshots/s, latency percentiles and loss.
    Loadgen(loadgen::LoadgenArgs),
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl Failure {
    /// Bad input: exit code 2.
    pub fn input(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: 2,
            error: error.into(),
        }
    }

    /// Anything else: exit code 1.
    pub fn runtime(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            code: 1,
            error: error.into(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if cli.canonicalize_nans
        && let Err(e) = init_runtime(true)
    {
        eprintln!("error: {e}");
        return ExitCode::from(1);
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Inspect(args) => inspect::inspect(args),
        Command::Validate(args) => inspect::validate(args),
        Command::Strategies => inspect::strategies(),
        Command::Loadgen(args) => loadgen::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            if is_broken_pipe(&f.error) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {}", f.error);
            for cause in f.error.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::from(f.code)
        }
    }
}

/// Builds the shared strategy runtime, with NaN canonicalisation on or off.
pub fn init_runtime(canonicalize_nans: bool) -> Result<(), visutility_host::runtime::LoadError> {
    use visutility_host::runtime::{Runtime, RuntimeConfig};
    Runtime::init_shared(RuntimeConfig {
        nan_canonicalization: canonicalize_nans,
        ..RuntimeConfig::default()
    })
    .map(|_| ())
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .init();
}

/// `--config` value: inline JSON, or `@path` to read it from a file.
pub fn read_config(arg: Option<&str>) -> Result<String, Failure> {
    match arg {
        None => Ok("{}".to_string()),
        Some(s) => match s.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path).map_err(|e| {
                Failure::input(anyhow::anyhow!("cannot read config file `{path}`: {e}"))
            }),
            None => Ok(s.to_string()),
        },
    }
}
