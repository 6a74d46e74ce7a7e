//! The per-instance sandbox: WASI context with no ambient authority, a
//! memory/table limiter, captured and capped guest output, virtual clocks and
//! seeded randomness, and the `log` import.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use parking_lot::Mutex;
use rand::SeedableRng as _;
use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::{
    HostMonotonicClock, HostWallClock, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView,
};

use super::Limits;
use super::bindings::visutility::strategy::{host, types};

/// Most log lines a strategy may write per call; the rest are counted.
pub const LOG_LINES_PER_CALL: u32 = 100;
/// Longest forwarded log message or output chunk, in bytes.
pub const LOG_MESSAGE_MAX: usize = 4096;
/// Guest stdout/stderr kept per call, in bytes; the rest is counted.
pub const OUTPUT_MAX_PER_CALL: usize = 16 * 1024;

/// The data of a strategy's `Store`.
pub(crate) struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: Limiter,
    /// `<name>` or `<monitor>/<name>`, for log lines.
    pub(crate) label: String,
    log_budget: u32,
    pub(crate) counters: Arc<SandboxCounters>,
    pub(crate) stdout: CapturedOutput,
    pub(crate) stderr: CapturedOutput,
    /// The virtual "now", in ms since the epoch: the newest timestamp of the
    /// batch being evaluated.
    pub(crate) clock_ms: Arc<AtomicI64>,
}

/// What a sandbox dropped or refused, for metrics.
#[derive(Debug, Default)]
pub struct SandboxCounters {
    /// Log lines dropped by the per-call rate limit.
    pub log_lines_dropped: AtomicU64,
    /// Bytes of guest stdout/stderr dropped by the cap.
    pub output_bytes_dropped: AtomicU64,
}

impl HostState {
    pub(crate) fn new(label: String, limits: &Limits, counters: Arc<SandboxCounters>) -> Self {
        let clock_ms = Arc::new(AtomicI64::new(0));
        let stdout = CapturedOutput::new(counters.clone());
        let stderr = CapturedOutput::new(counters.clone());
        let wasi = WasiCtxBuilder::new()
            // No preopens, env, args or network; stdin is empty.
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .socket_addr_check(|_, _| Box::pin(async { false }))
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .wall_clock(VirtualWallClock(clock_ms.clone()))
            .monotonic_clock(VirtualMonotonicClock(clock_ms.clone()))
            .secure_random(rand::rngs::StdRng::seed_from_u64(limits.random_seed))
            .insecure_random(rand::rngs::StdRng::seed_from_u64(
                limits.random_seed ^ 0x9e37_79b9_7f4a_7c15,
            ))
            .insecure_random_seed(u128::from(limits.random_seed))
            .max_random_size(1 << 20)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter::new(limits),
            label,
            log_budget: LOG_LINES_PER_CALL,
            counters,
            stdout,
            stderr,
            clock_ms,
        }
    }

    /// Resets per-call budgets.
    pub(crate) fn begin_call(&mut self) {
        self.log_budget = LOG_LINES_PER_CALL;
        self.limiter.hit = None;
    }

    /// Forwards what the guest wrote to stdout/stderr during the call.
    /// Returns the panic message a Rust guest wrote to stderr, if any
    /// (`panicked at FILE:LINE:COL: MESSAGE`), for the trap's error.
    pub(crate) fn flush_output(&mut self) -> Option<String> {
        let mut panic = None;
        for (stream, out) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            let bytes = out.take();
            if !bytes.is_empty() {
                let text = String::from_utf8_lossy(&bytes);
                let mut lines = text.lines().filter(|l| !l.is_empty());
                while let Some(line) = lines.next() {
                    tracing::info!(target: "visutility::strategy", strategy = %self.label, stream, "{line}");
                    if stream == "stderr"
                        && panic.is_none()
                        && let Some(at) = line.find("panicked at ")
                    {
                        let mut message = line[at..].to_string();
                        if let Some(next) = lines.next() {
                            tracing::info!(target: "visutility::strategy", strategy = %self.label, stream, "{next}");
                            message.push(' ');
                            message.push_str(next);
                        }
                        panic = Some(truncate_chars(message, 512, "…"));
                    }
                }
            }
        }
        panic
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl types::Host for HostState {}

impl host::Host for HostState {
    fn log(&mut self, level: types::Level, message: String) {
        if self.log_budget == 0 {
            self.counters
                .log_lines_dropped
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.log_budget -= 1;
        let message = truncate_chars(message, LOG_MESSAGE_MAX, "… (truncated)");
        let s = &self.label;
        match level {
            types::Level::Trace => {
                tracing::trace!(target: "visutility::strategy", strategy = %s, "{message}")
            }
            types::Level::Debug => {
                tracing::debug!(target: "visutility::strategy", strategy = %s, "{message}")
            }
            types::Level::Info => {
                tracing::info!(target: "visutility::strategy", strategy = %s, "{message}")
            }
            types::Level::Warn => {
                tracing::warn!(target: "visutility::strategy", strategy = %s, "{message}")
            }
            types::Level::Error => {
                tracing::error!(target: "visutility::strategy", strategy = %s, "{message}")
            }
        }
    }
}

/// Caps linear memory, tables and instances, and remembers which cap was
/// hit so that the resulting trap is reported as such.
pub(crate) struct Limiter {
    memory_bytes: usize,
    table_elements: usize,
    instances: usize,
    pub(crate) hit: Option<&'static str>,
}

impl Limiter {
    fn new(limits: &Limits) -> Self {
        Limiter {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.table_elements,
            instances: limits.instances,
            hit: None,
        }
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.hit = Some("memory");
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.table_elements {
            self.hit = Some("table");
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        self.instances
    }

    fn tables(&self) -> usize {
        self.instances * 4
    }

    fn memories(&self) -> usize {
        self.instances
    }
}

/// The wall clock a strategy sees: the newest snapshot timestamp of the
/// batch, so that a replay is deterministic.
struct VirtualWallClock(Arc<AtomicI64>);

impl HostWallClock for VirtualWallClock {
    fn resolution(&self) -> Duration {
        Duration::from_millis(1)
    }

    fn now(&self) -> Duration {
        Duration::from_millis(self.0.load(Ordering::Relaxed).max(0).unsigned_abs())
    }
}

/// The monotonic clock a strategy sees: nanoseconds derived from the same
/// virtual time (never decreasing, because the host only moves it forward).
struct VirtualMonotonicClock(Arc<AtomicI64>);

impl HostMonotonicClock for VirtualMonotonicClock {
    fn resolution(&self) -> u64 {
        1_000_000
    }

    fn now(&self) -> u64 {
        self.0
            .load(Ordering::Relaxed)
            .max(0)
            .unsigned_abs()
            .saturating_mul(1_000_000)
    }
}

/// Guest stdout or stderr: kept in memory up to a per-call cap, the rest
/// counted and dropped. Writes always succeed so that a chatty guest does not
/// trap on a full pipe.
#[derive(Clone)]
pub(crate) struct CapturedOutput {
    buf: Arc<Mutex<Vec<u8>>>,
    counters: Arc<SandboxCounters>,
}

impl CapturedOutput {
    fn new(counters: Arc<SandboxCounters>) -> Self {
        CapturedOutput {
            buf: Arc::new(Mutex::new(Vec::new())),
            counters,
        }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.buf.lock())
    }
}

impl IsTerminal for CapturedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CapturedOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    // A synchronous stream: the default adapter goes through an async task
    // per write (~140 µs each), which a chatty guest turns into a deadline.
    fn p2_stream(&self) -> Box<dyn wasmtime_wasi::p2::OutputStream> {
        Box::new(self.clone())
    }
}

impl CapturedOutput {
    fn keep(&self, data: &[u8]) {
        let mut buf = self.buf.lock();
        let room = OUTPUT_MAX_PER_CALL.saturating_sub(buf.len());
        let kept = room.min(data.len());
        buf.extend_from_slice(&data[..kept]);
        let dropped = (data.len() - kept) as u64;
        if dropped > 0 {
            self.counters
                .output_bytes_dropped
                .fetch_add(dropped, Ordering::Relaxed);
        }
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::OutputStream for CapturedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), wasmtime_wasi::p2::StreamError> {
        self.keep(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), wasmtime_wasi::p2::StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, wasmtime_wasi::p2::StreamError> {
        // Always writable: what exceeds the cap is counted and dropped.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl wasmtime_wasi::p2::Pollable for CapturedOutput {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for CapturedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.keep(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// `s` cut to at most `max` bytes (at a character boundary), then `mark`.
fn truncate_chars(mut s: String, max: usize, mark: &str) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str(mark);
    }
    s
}
