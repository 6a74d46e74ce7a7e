//! Loading a strategy component: sniff, hash, compile (or load from the
//! cache), check the world, the WIT version and the imports, pre-link.

use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::component::Component;

use super::bindings::RetrainStrategyPre;
use super::instance::StrategyInstance;
use super::{Limits, Runtime, StrategyError, WIT_VERSION, builtin};

/// WASI interfaces a strategy may import. They are linked with a deny-all
/// context (see `sandbox.rs`); anything else is refused at load time.
const GRANTED_IMPORT_PREFIXES: &[&str] = &["wasi:io/", "wasi:cli/", "wasi:clocks/", "wasi:random/"];
const WIT_PACKAGE: &str = "visutility:strategy";
const EXPORT_INTERFACE: &str = "visutility:strategy/strategy";

/// Where a strategy comes from: `builtin:NAME` or a path to a `.wasm` file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StrategySource {
    /// A strategy compiled into this binary.
    Builtin(String),
    /// A component file.
    File(PathBuf),
}

impl FromStr for StrategySource {
    type Err = LoadError;

    fn from_str(s: &str) -> Result<Self, LoadError> {
        match s.strip_prefix("builtin:") {
            Some(name) => {
                if builtin::get(name).is_none() {
                    return Err(LoadError::UnknownBuiltin {
                        name: name.to_string(),
                        known: builtin::names().collect::<Vec<_>>().join(", "),
                    });
                }
                Ok(StrategySource::Builtin(name.to_string()))
            }
            None if s.is_empty() => Err(LoadError::Io {
                path: PathBuf::new(),
                message: "empty strategy: give `builtin:NAME` or a path to a .wasm file".into(),
            }),
            None => Ok(StrategySource::File(PathBuf::from(s))),
        }
    }
}

impl fmt::Display for StrategySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrategySource::Builtin(n) => write!(f, "builtin:{n}"),
            StrategySource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Why a component could not be loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LoadError {
    /// No such bundled strategy.
    #[error("unknown strategy `builtin:{name}`; bundled strategies: {known}")]
    UnknownBuiltin {
        /// The requested name.
        name: String,
        /// The bundled names.
        known: String,
    },
    /// The file could not be read.
    #[error("cannot read strategy `{}`: {message}", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// The OS error.
        message: String,
    },
    /// Not a WebAssembly binary at all.
    #[error(
        "`{label}` is not a WebAssembly binary (no `\\0asm` header); expected a component built for wasm32-wasip2"
    )]
    NotWasm {
        /// The strategy's label.
        label: String,
    },
    /// A core module rather than a component.
    #[error(
        "`{label}` is a core WebAssembly module, not a component; build the strategy with \
         `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
    )]
    CoreModule {
        /// The strategy's label.
        label: String,
    },
    /// Wasmtime could not compile it (truncated, corrupt, unsupported).
    #[error("`{label}` is not a valid component: {message}")]
    Invalid {
        /// The strategy's label.
        label: String,
        /// Wasmtime's message.
        message: String,
    },
    /// The component does not export the strategy interface.
    #[error(
        "`{label}` targets another world: it exports [{exports}] but a strategy must export \
         `{EXPORT_INTERFACE}@{WIT_VERSION}` (world `retrain-strategy`)"
    )]
    WrongWorld {
        /// The strategy's label.
        label: String,
        /// What it exports instead.
        exports: String,
    },
    /// Built against an incompatible version of the WIT package.
    #[error(
        "`{label}` was built against `{WIT_PACKAGE}@{found}` but this host speaks \
         `{WIT_PACKAGE}@{WIT_VERSION}`; rebuild the strategy against a compatible SDK"
    )]
    IncompatibleWit {
        /// The strategy's label.
        label: String,
        /// The version it was built against.
        found: String,
    },
    /// It imports a capability the sandbox does not grant.
    #[error(
        "`{label}` imports `{import}`, which the sandbox does not grant (allowed: wasi:io, wasi:cli, \
         wasi:clocks, wasi:random, {WIT_PACKAGE}/host)"
    )]
    ForbiddenImport {
        /// The strategy's label.
        label: String,
        /// The refused import.
        import: String,
    },
    /// Pre-linking failed (an import of the right name but the wrong type).
    #[error("`{label}` cannot be linked: {message}")]
    Link {
        /// The strategy's label.
        label: String,
        /// Wasmtime's message.
        message: String,
    },
    /// The engine could not be built.
    #[error("cannot build the WebAssembly engine: {0}")]
    Engine(String),
    /// Instantiating, describing or configuring failed.
    #[error(transparent)]
    Strategy(#[from] StrategyError),
    /// The strategy refused its configuration.
    #[error("strategy `{label}` refused its configuration: {message}")]
    Config {
        /// The strategy's label.
        label: String,
        /// The strategy's message.
        message: String,
    },
}

/// What the host knows about a component before running it.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentMeta {
    /// `builtin:NAME` or the file path.
    pub label: String,
    /// SHA-256 of the component bytes, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: usize,
    /// The `visutility:strategy` version it was built against.
    pub wit_version: String,
    /// Its imports, in order.
    pub imports: Vec<String>,
    /// Whether the compiled code came from the on-disk cache.
    pub from_cache: bool,
    /// Time to compile or to load from the cache.
    pub load_time: Duration,
}

/// A loaded, checked and pre-linked strategy component.
#[derive(Clone)]
pub struct StrategyComponent {
    pub(crate) pre: RetrainStrategyPre<super::HostState>,
    pub(crate) meta: Arc<ComponentMeta>,
    pub(crate) runtime: &'static Runtime,
}

impl fmt::Debug for StrategyComponent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StrategyComponent")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

impl StrategyComponent {
    /// Loads `source` with the [shared runtime](Runtime::shared).
    ///
    /// # Errors
    ///
    /// [`LoadError`] saying what is wrong with the component.
    pub fn load(source: &StrategySource) -> Result<Self, LoadError> {
        Self::load_with(Runtime::shared(), source)
    }

    /// Loads `source` with `runtime` (which must outlive the program).
    ///
    /// # Errors
    ///
    /// [`LoadError`] saying what is wrong with the component.
    pub fn load_with(
        runtime: &'static Runtime,
        source: &StrategySource,
    ) -> Result<Self, LoadError> {
        let label = source.to_string();
        let bytes: std::borrow::Cow<'static, [u8]> = match source {
            StrategySource::Builtin(name) => builtin::get(name)
                .ok_or_else(|| LoadError::UnknownBuiltin {
                    name: name.clone(),
                    known: builtin::names().collect::<Vec<_>>().join(", "),
                })?
                .into(),
            StrategySource::File(path) => std::fs::read(path)
                .map_err(|e| LoadError::Io {
                    path: path.clone(),
                    message: e.to_string(),
                })?
                .into(),
        };
        Self::from_bytes(runtime, label, &bytes)
    }

    /// Loads a component from memory; `label` names it in errors.
    ///
    /// # Errors
    ///
    /// [`LoadError`] saying what is wrong with the component.
    pub fn from_bytes(
        runtime: &'static Runtime,
        label: String,
        bytes: &[u8],
    ) -> Result<Self, LoadError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(LoadError::NotWasm { label });
        }
        if wasmparser::Parser::is_core_wasm(bytes) {
            return Err(LoadError::CoreModule { label });
        }
        let sha256 = hex::encode(Sha256::digest(bytes));
        let started = Instant::now();
        let (component, from_cache) = compile_cached(runtime, &label, &sha256, bytes)?;
        let load_time = started.elapsed();

        let ty = component.component_type();
        let engine = runtime.engine();
        let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
        let imports: Vec<String> = ty.imports(engine).map(|(n, _)| n.to_string()).collect();
        let wit_version = check_world(&label, &exports, &imports)?;

        let instance_pre =
            runtime
                .linker()
                .instantiate_pre(&component)
                .map_err(|e| LoadError::Link {
                    label: label.clone(),
                    message: format!("{e:#}"),
                })?;
        let pre = RetrainStrategyPre::new(instance_pre).map_err(|e| LoadError::Link {
            label: label.clone(),
            message: format!("{e:#}"),
        })?;
        Ok(StrategyComponent {
            pre,
            meta: Arc::new(ComponentMeta {
                label,
                sha256,
                size: bytes.len(),
                wit_version,
                imports,
                from_cache,
                load_time,
            }),
            runtime,
        })
    }

    /// What the host knows about this component.
    pub fn meta(&self) -> &ComponentMeta {
        &self.meta
    }

    /// A new sandboxed instance, described and configured with `config`
    /// (JSON).
    ///
    /// # Errors
    ///
    /// [`LoadError::Config`] if the strategy refuses `config`, or
    /// [`LoadError::Strategy`] if a call traps or exceeds its limits.
    pub fn instantiate(&self, config: &str, limits: Limits) -> Result<StrategyInstance, LoadError> {
        StrategyInstance::new(self, Some(config), limits)
    }

    /// Instantiates the component without configuring it and returns its
    /// self-description.
    ///
    /// # Errors
    ///
    /// [`LoadError::Strategy`] if instantiation or `describe` fails.
    pub fn describe(&self) -> Result<super::StrategyInfo, LoadError> {
        Ok(StrategyInstance::new(self, None, Limits::default())?
            .info()
            .clone())
    }
}

fn compile_cached(
    runtime: &Runtime,
    label: &str,
    sha256: &str,
    bytes: &[u8],
) -> Result<(Component, bool), LoadError> {
    let engine = runtime.engine();
    let cache_path = runtime.config().cache_dir.as_ref().map(|dir| {
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        dir.join(format!("{sha256}-{:016x}.cwasm", h.finish()))
    });
    if let Some(path) = &cache_path
        && path.exists()
    {
        // SAFETY: the file was written by `Component::serialize` of an engine
        // with the same compatibility hash (it is in the file name); wasmtime
        // also checks the header. The cache directory belongs to the user
        // running the host, like the binary itself.
        match unsafe { Component::deserialize_file(engine, path) } {
            Ok(c) => return Ok((c, true)),
            Err(e) => tracing::warn!(path = %path.display(), "ignoring unusable cache entry: {e}"),
        }
    }
    let component = Component::new(engine, bytes).map_err(|e| LoadError::Invalid {
        label: label.to_string(),
        message: format!("{e:#}"),
    })?;
    if let Some(path) = &cache_path
        && let Err(e) = write_cache(path, &component)
    {
        tracing::debug!(path = %path.display(), "cannot write the component cache: {e}");
    }
    Ok((component, false))
}

fn write_cache(path: &Path, component: &Component) -> std::io::Result<()> {
    let dir = path.parent().expect("cache path has a parent");
    std::fs::create_dir_all(dir)?;
    let bytes = component
        .serialize()
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    // Write then rename, so that a concurrent reader never sees half a file.
    let tmp = dir.join(format!(".{}.{}.tmp", std::process::id(), rand_suffix()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Checks the exports and imports; returns the WIT version built against.
fn check_world(label: &str, exports: &[String], imports: &[String]) -> Result<String, LoadError> {
    let Some(export) = exports
        .iter()
        .find(|e| e.split('@').next() == Some(EXPORT_INTERFACE))
    else {
        return Err(LoadError::WrongWorld {
            label: label.to_string(),
            exports: exports
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    let found = export
        .split_once('@')
        .map(|(_, v)| v.to_string())
        .unwrap_or_else(|| "(unversioned)".into());
    if !compatible(&found, WIT_VERSION) {
        return Err(LoadError::IncompatibleWit {
            label: label.to_string(),
            found,
        });
    }
    for import in imports {
        if let Some(rest) = import.strip_prefix("visutility:strategy/") {
            let (iface, version) = rest.split_once('@').unwrap_or((rest, "(unversioned)"));
            if !compatible(version, WIT_VERSION) {
                return Err(LoadError::IncompatibleWit {
                    label: label.to_string(),
                    found: version.to_string(),
                });
            }
            if iface == "host" || iface == "types" {
                continue;
            }
        } else if GRANTED_IMPORT_PREFIXES
            .iter()
            .any(|p| import.starts_with(p))
        {
            continue;
        }
        return Err(LoadError::ForbiddenImport {
            label: label.to_string(),
            import: import.clone(),
        });
    }
    Ok(found)
}

/// Semver compatibility as cargo sees it: same major, and for 0.x the same
/// minor.
fn compatible(found: &str, ours: &str) -> bool {
    let parse = |v: &str| -> Option<(u64, u64, u64)> {
        let core = v.split(['-', '+']).next()?;
        let mut it = core.split('.').map(|p| p.parse::<u64>().ok());
        Some((it.next()??, it.next()??, it.next()??))
    };
    match (parse(found), parse(ours)) {
        (Some((fa, fi, _)), Some((oa, oi, _))) => fa == oa && (oa != 0 || fi == oi),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn semver_compatibility_follows_cargo_rules() {
        assert!(compatible("0.1.0", "0.1.3"));
        assert!(compatible("0.1.9", "0.1.0"));
        assert!(!compatible("0.2.0", "0.1.0"));
        assert!(!compatible("1.0.0", "0.1.0"));
        assert!(compatible("1.4.0", "1.0.0"));
        assert!(!compatible("(unversioned)", "0.1.0"));
    }

    #[test]
    fn world_check_names_the_problem() {
        let ok = vec![format!("{EXPORT_INTERFACE}@0.1.0")];
        let imports = vec![
            "wasi:io/streams@0.2.6".to_string(),
            "visutility:strategy/host@0.1.0".into(),
        ];
        assert_eq!(check_world("x", &ok, &imports).unwrap(), "0.1.0");

        let e = check_world("x", &["wasi:cli/run@0.2.0".into()], &[]).unwrap_err();
        assert!(matches!(e, LoadError::WrongWorld { .. }), "{e}");

        let e = check_world("x", &[format!("{EXPORT_INTERFACE}@0.9.0")], &[]).unwrap_err();
        assert!(
            e.to_string().contains("@0.9.0") && e.to_string().contains("@0.1.0"),
            "{e}"
        );

        let e = check_world("x", &ok, &["wasi:filesystem/types@0.2.6".into()]).unwrap_err();
        assert!(e.to_string().contains("wasi:filesystem/types@0.2.6"), "{e}");
    }
}
