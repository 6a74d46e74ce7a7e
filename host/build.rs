//! Compiles the bundled strategies (`strategies/*`) and the test guests
//! (`tests/guests/*`) to `wasm32-wasip2` components with a nested cargo, into
//! `<target>/wasm-guests`, and writes `$OUT_DIR/guests.rs`, which embeds the
//! bundled ones in the binary. No `.wasm` file is ever committed.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "guest";

struct Guest {
    /// Directory name: the builtin's name (`builtin:<name>`).
    name: String,
    /// Cargo package name.
    package: String,
    bundled: bool,
}

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .expect("host/ lives in the workspace root")
        .to_path_buf();
    let target_dir = match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let guest_dir = target_dir.join("wasm-guests");

    for watched in [
        "wit",
        "strategy-sdk/src",
        "strategy-sdk/Cargo.toml",
        "strategies",
        "tests/guests",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=VISUTILITY_GUEST_CARGO_ARGS");

    let mut guests = discover(&root.join("strategies"), true);
    guests.extend(discover(&root.join("tests/guests"), false));

    check_target_installed();

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args([
            "build",
            "--target",
            TARGET,
            "--profile",
            PROFILE,
            "--target-dir",
        ])
        .arg(&guest_dir);
    for g in &guests {
        cmd.args(["-p", &g.package]);
    }
    // The outer build's flags are for the host, not for wasm guests.
    // Nor its wrappers: under `cargo clippy` the guests would otherwise be
    // compiled by clippy-driver (other MIR optimisation, other code) and
    // replace the real ones in the shared guest directory.
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WRAPPER",
        "CARGO_BUILD_RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let out = cmd
        .output()
        .expect("failed to run the nested `cargo build` for the wasm guests");
    if !out.status.success() {
        panic!(
            "building the strategy components for {TARGET} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let artifacts = guest_dir.join(TARGET).join(PROFILE);
    let mut code = String::new();
    code.push_str("/// Strategies compiled into this binary, addressable as `builtin:<name>`.\n");
    code.push_str("pub static BUILTINS: &[(&str, &[u8])] = &[\n");
    for g in guests.iter().filter(|g| g.bundled) {
        let path = artifact(&artifacts, &g.package);
        writeln!(
            code,
            "    ({:?}, include_bytes!({:?})),",
            g.name,
            path.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    code.push_str("/// Test guests (never bundled): name and path of the built component.\n");
    code.push_str("pub static TEST_GUESTS: &[(&str, &str)] = &[\n");
    for g in guests.iter().filter(|g| !g.bundled) {
        let path = artifact(&artifacts, &g.package);
        writeln!(
            code,
            "    ({:?}, {:?}),",
            g.name,
            path.display().to_string()
        )
        .unwrap();
    }
    code.push_str("];\n");
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    fs::write(out_dir.join("guests.rs"), code).unwrap();
}

fn artifact(dir: &Path, package: &str) -> PathBuf {
    let path = dir.join(format!("{}.wasm", package.replace('-', "_")));
    assert!(
        path.exists(),
        "the guest build did not produce {}",
        path.display()
    );
    path
}

fn discover(dir: &Path, bundled: bool) -> Vec<Guest> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut guests: Vec<Guest> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let manifest = fs::read_to_string(e.path().join("Cargo.toml")).ok()?;
            let package = manifest.lines().find_map(|l| {
                l.trim()
                    .strip_prefix("name = ")
                    .map(|n| n.trim_matches('"').to_string())
            })?;
            Some(Guest {
                name: e.file_name().to_string_lossy().into_owned(),
                package,
                bundled,
            })
        })
        .collect();
    guests.sort_by(|a, b| a.name.cmp(&b.name));
    guests
}

fn check_target_installed() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok();
    let Some(sysroot) = sysroot.filter(|o| o.status.success()) else {
        return;
    };
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib").join(TARGET).exists() {
        panic!(
            "the `{TARGET}` Rust target is not installed; VisuTility builds its bundled strategies \
             for it. Run `rustup target add {TARGET}` and build again."
        );
    }
}
