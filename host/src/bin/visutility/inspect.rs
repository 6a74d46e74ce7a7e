//! `visutility inspect`, `validate` and `strategies`.

use clap::Args;
use visutility_host::Limits;
use visutility_host::runtime::{StrategyComponent, StrategySource, WIT_VERSION, builtin};

use crate::{Failure, read_config};

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The strategy: `builtin:NAME` or a path to a `.wasm` component.
    strategy: String,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The strategy: `builtin:NAME` or a path to a `.wasm` component.
    strategy: String,
    /// Its configuration: inline JSON, or `@file.json`.
    #[arg(short, long)]
    config: Option<String>,
}

fn load(strategy: &str) -> Result<StrategyComponent, Failure> {
    let source: StrategySource = strategy.parse().map_err(Failure::input)?;
    StrategyComponent::load(&source).map_err(Failure::input)
}

pub fn inspect(args: InspectArgs) -> Result<(), Failure> {
    let component = load(&args.strategy)?;
    let info = component.describe().map_err(Failure::input)?;
    let meta = component.meta();
    if args.json {
        let v = serde_json::json!({
            "strategy": meta.label,
            "name": info.name,
            "version": info.version,
            "description": info.description,
            "config_schema": info.config_schema.as_deref().map(|s| serde_json::from_str::<serde_json::Value>(s)
                .unwrap_or(serde_json::Value::String(s.to_string()))),
            "wit_version": meta.wit_version,
            "host_wit_version": WIT_VERSION,
            "size": meta.size,
            "sha256": meta.sha256,
            "imports": meta.imports,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON value serialises")
        );
        return Ok(());
    }
    println!("strategy:     {}", meta.label);
    println!("name:         {}", info.name);
    println!("version:      {}", info.version);
    println!("description:  {}", info.description);
    println!(
        "wit version:  visutility:strategy@{} (host speaks @{WIT_VERSION})",
        meta.wit_version
    );
    println!("size:         {} bytes", meta.size);
    println!("sha256:       {}", meta.sha256);
    println!("imports:");
    for import in &meta.imports {
        println!("  {import}");
    }
    match &info.config_schema {
        Some(schema) => {
            let pretty = serde_json::from_str::<serde_json::Value>(schema)
                .ok()
                .and_then(|v| serde_json::to_string_pretty(&v).ok())
                .unwrap_or_else(|| schema.clone());
            println!("config schema:\n{pretty}");
        }
        None => println!("config schema: (none published)"),
    }
    Ok(())
}

pub fn validate(args: ValidateArgs) -> Result<(), Failure> {
    let config = read_config(args.config.as_deref())?;
    let component = load(&args.strategy)?;
    let instance = component
        .instantiate(&config, Limits::default())
        .map_err(Failure::input)?;
    let info = instance.info();
    println!(
        "ok: {} {} ({}) accepts this configuration; built against visutility:strategy@{}",
        info.name,
        info.version,
        component.meta().label,
        component.meta().wit_version
    );
    Ok(())
}

pub fn strategies() -> Result<(), Failure> {
    for name in builtin::names() {
        let component = load(&format!("builtin:{name}"))?;
        let info = component.describe().map_err(Failure::runtime)?;
        println!(
            "builtin:{:<16} {:<8} {}",
            name, info.version, info.description
        );
    }
    Ok(())
}
