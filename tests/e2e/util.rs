//! Helpers: a fresh temp dir per test and a ready `visutility` command.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A test's workspace: a temp dir and the command to run.
pub struct Env {
    pub dir: tempfile::TempDir,
}

impl Env {
    pub fn new() -> Self {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write test file");
        p
    }

    /// `visutility <args>` with a shared compiled-component cache.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_visutility"));
        c.env("VISUTILITY_CACHE_DIR", cache_dir())
            .env_remove("RUST_LOG")
            .current_dir(self.dir.path());
        c
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::from(
            self.cmd()
                .args(args)
                .stdin(Stdio::null())
                .output()
                .expect("run visutility"),
        )
    }
}

pub fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("component-cache")
}

/// Path of a test guest built by `host/build.rs`.
pub fn guest(name: &str) -> &'static str {
    visutility_host::__test_support::guest_path(name)
        .unwrap_or_else(|| panic!("no test guest `{name}`"))
}

pub struct Run {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Run {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl Run {
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code,
            Some(0),
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails_with(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "expected exit {code}\nstdout:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        // A host panic reads `thread 'NAME' (ID) panicked at`; a guest's panic
        // reaches stderr only inside the error message.
        assert!(
            !self
                .stderr
                .lines()
                .any(|l| l.starts_with("thread '") && l.contains("panicked at")),
            "the host panicked:\n{}",
            self.stderr
        );
        self
    }
}

/// A small deterministic generator (no external crate needed).
pub struct Lcg(u64);

impl Lcg {
    pub fn new(seed: u64) -> Self {
        Lcg(seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407))
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}
