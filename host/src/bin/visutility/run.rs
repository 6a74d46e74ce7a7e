//! `visutility run`: the monitoring service.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use tokio_util::sync::CancellationToken;
use visutility_host::service::Service;
use visutility_host::service::config::ServiceConfig;

use crate::Failure;

#[derive(Debug, Args)]
#[command(after_help = "\
With no --config: listens on 127.0.0.1:7878 with one monitor `default` running builtin:baseline \
(baseline learnt from each model's first 20 points) over all models, a `log` action, and \
signals in ./visutility.db. SIGINT/SIGTERM stop ingestion, drain the monitors, checkpoint \
their state and exit 0.")]
pub struct RunArgs {
    /// The service configuration (TOML).
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Listen address; overrides the file's `listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// SQLite file for signals, outbox and state; overrides the file's `db`.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Validate the configuration and load every strategy, then exit.
    #[arg(long)]
    check: bool,
}

pub fn run(args: RunArgs) -> Result<(), Failure> {
    let mut config = match &args.config {
        Some(path) => ServiceConfig::load(path).map_err(Failure::input)?,
        None => ServiceConfig::embedded_default(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(db) = args.db {
        config.db = db;
    }
    if config.canonicalize_nans {
        crate::init_runtime(true).map_err(Failure::input)?;
    }
    if args.check {
        for m in &config.monitors {
            let component = visutility_host::runtime::StrategyComponent::load(
                &m.strategy
                    .parse()
                    .map_err(|e| Failure::input(anyhow::anyhow!("monitor `{}`: {e}", m.name)))?,
            )
            .map_err(|e| Failure::input(anyhow::anyhow!("monitor `{}`: {e}", m.name)))?;
            let instance = component
                .instantiate(&m.config_json(), m.limits.limits())
                .map_err(|e| Failure::input(anyhow::anyhow!("monitor `{}`: {e}", m.name)))?;
            println!(
                "monitor `{}`: {} {} ({}) ok",
                m.name,
                instance.info().name,
                instance.info().version,
                m.strategy
            );
        }
        println!("configuration ok: {} monitor(s)", config.monitors.len());
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().map_err(Failure::runtime)?;
    runtime.block_on(serve(config, args.config.clone()))
}

async fn serve(config: ServiceConfig, path: Option<std::path::PathBuf>) -> Result<(), Failure> {
    let listen = config.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))
        .map_err(Failure::runtime)?;
    let service = Service::start(config).map_err(Failure::input)?;
    if let Some(path) = path {
        service.set_config_path(path);
    }
    let addr = listener.local_addr().map_err(Failure::runtime)?;
    println!(
        "visutility listening on http://{addr} ({} monitor(s))",
        service.monitors().len()
    );
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            shutdown.cancel();
        });
    }
    {
        // SIGHUP: reload the configuration file.
        let service = service.clone();
        tokio::spawn(async move {
            let Ok(mut hup) =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            else {
                return;
            };
            while hup.recv().await.is_some() {
                let s = service.clone();
                match tokio::task::spawn_blocking(move || s.reload()).await {
                    Ok(Ok(report)) => eprintln!(
                        "configuration reloaded (SIGHUP): {}",
                        serde_json::to_string(&report).unwrap_or_default()
                    ),
                    Ok(Err(e)) => eprintln!("configuration not reloaded (SIGHUP): {e}"),
                    Err(e) => eprintln!("configuration not reloaded (SIGHUP): {e}"),
                }
            }
        });
    }
    service
        .serve(listener, shutdown)
        .await
        .map_err(Failure::runtime)?;
    eprintln!("visutility stopped cleanly");
    Ok(())
}
