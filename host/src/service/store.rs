//! The durable store (SQLite, WAL): the signal log, the outbox of action
//! deliveries, and checkpointed detector state.
//!
//! A signal and one delivery row per action are committed in one
//! transaction before any action runs; a delivery is marked `delivered` only
//! after the action succeeded, so after a crash every committed, undelivered
//! signal is delivered (at least once), and none is delivered again once
//! acknowledged.

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// A store failure (I/O or SQL), as text.
#[derive(Debug, thiserror::Error)]
#[error("signal store: {0}")]
pub struct StoreError(String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

/// A signal about to be recorded.
#[derive(Debug, Clone, Serialize)]
pub struct NewSignal {
    /// Monitor name.
    pub monitor: String,
    /// The model.
    pub model_version: String,
    /// `retrain` or `stale`.
    pub kind: String,
    /// Why.
    pub reason: String,
    /// Score of the snapshot that fired (NaN-free; 0 for `stale`).
    pub score: f64,
    /// Its timestamp (ms).
    pub timestamp: i64,
    /// Strategy name, version and SHA-256.
    pub strategy: String,
    /// Strategy version.
    pub strategy_version: String,
    /// Component SHA-256.
    pub strategy_sha256: String,
    /// Fuel used by the call that fired.
    pub fuel: u64,
    /// The snapshot, as JSON.
    pub snapshot: serde_json::Value,
    /// Shadow monitors' signals never get deliveries.
    pub shadow: bool,
}

/// A recorded signal with its delivery states.
#[derive(Debug, Clone, Serialize)]
pub struct SignalRecord {
    /// Signal id.
    pub id: i64,
    /// When it was recorded (ms).
    pub created: i64,
    /// The signal.
    #[serde(flatten)]
    pub signal: NewSignal,
    /// One per action.
    pub deliveries: Vec<DeliveryRecord>,
}

/// The state of one action's delivery.
#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRecord {
    /// Index of the action in the monitor's config.
    pub action: i64,
    /// `log`, `exec` or `webhook`.
    pub kind: String,
    /// `pending`, `delivered` or `failed`.
    pub state: String,
    /// Attempts so far.
    pub attempts: i64,
    /// The last error.
    pub last_error: Option<String>,
    /// Exit code of the last `exec` attempt.
    pub exit_code: Option<i64>,
}

/// A failed strategy call, kept for debugging.
#[derive(Debug, Clone, Serialize)]
pub struct FailureRecord {
    /// When (ms).
    pub created: i64,
    /// The monitor.
    pub monitor: String,
    /// The model whose batch failed.
    pub model: String,
    /// The component.
    pub strategy_sha256: String,
    /// `out_of_fuel`, `deadline`, `memory_cap`, `stack_overflow`, `trap`,
    /// `contract` or `poisoned`.
    pub fault: String,
    /// The full error.
    pub error: String,
    /// The batch that caused it, as NDJSON (capped at 1 MiB).
    pub batch: String,
}

/// One strategy swap, refusal or rollback of a monitor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwapRecord {
    /// When (ms).
    pub created: i64,
    /// The monitor.
    pub monitor: String,
    /// What asked for it: `api`, `rollback (api)`, `rollback (automatic)`, ...
    pub trigger: String,
    /// `swapped`, `refused` or `rolled_back`.
    pub outcome: String,
    /// The component that was serving.
    pub old_sha256: String,
    /// Its version.
    pub old_version: String,
    /// The candidate.
    pub new_sha256: String,
    /// Its version (empty when it could not be described).
    pub new_version: String,
    /// Why it was refused, or what happened to the detector state.
    pub detail: String,
}

/// A delivery that is due.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    /// Signal id.
    pub signal_id: i64,
    /// Action index.
    pub action: i64,
    /// Attempts so far.
    pub attempts: i64,
    /// The signal.
    pub signal: SignalRecord,
}

/// Filters of [`Store::signals`].
#[derive(Debug, Clone, Default)]
pub struct SignalQuery {
    /// Only this monitor.
    pub monitor: Option<String>,
    /// Only this model.
    pub model: Option<String>,
    /// Only signals recorded at or after this time (ms).
    pub since: Option<i64>,
    /// At most this many, newest first (default 100, at most 10,000).
    pub limit: Option<usize>,
}

/// The SQLite store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

const SCHEMA: &str = "
PRAGMA journal_mode = WAL;
PRAGMA synchronous = NORMAL;
CREATE TABLE IF NOT EXISTS signals (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    monitor TEXT NOT NULL,
    model TEXT NOT NULL,
    kind TEXT NOT NULL,
    reason TEXT NOT NULL,
    score REAL NOT NULL,
    timestamp_ms INTEGER NOT NULL,
    strategy TEXT NOT NULL,
    strategy_version TEXT NOT NULL,
    strategy_sha256 TEXT NOT NULL,
    fuel INTEGER NOT NULL,
    snapshot TEXT NOT NULL,
    shadow INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS signals_by_monitor ON signals (monitor, model, created_ms);
CREATE TABLE IF NOT EXISTS deliveries (
    signal_id INTEGER NOT NULL REFERENCES signals (id),
    action INTEGER NOT NULL,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    exit_code INTEGER,
    next_attempt_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (signal_id, action)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_attempt_ms);
CREATE TABLE IF NOT EXISTS failures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    monitor TEXT NOT NULL,
    model TEXT NOT NULL,
    strategy_sha256 TEXT NOT NULL,
    fault TEXT NOT NULL,
    error TEXT NOT NULL,
    batch TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS swaps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_ms INTEGER NOT NULL,
    monitor TEXT NOT NULL,
    trigger TEXT NOT NULL,
    outcome TEXT NOT NULL,
    old_sha256 TEXT NOT NULL,
    old_version TEXT NOT NULL,
    new_sha256 TEXT NOT NULL,
    new_version TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS detector_state (
    monitor TEXT NOT NULL,
    model TEXT NOT NULL,
    strategy_sha256 TEXT NOT NULL,
    state BLOB NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (monitor, model)
);
";

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    crate::snapshot::system_time_to_ms(std::time::SystemTime::now())
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] if the file cannot be opened or migrated.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)
            .map_err(|e| StoreError(format!("cannot open `{}`: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Records a signal and one pending delivery per action (`actions` are
    /// the action kinds), atomically. Returns the signal id.
    ///
    /// # Errors
    ///
    /// [`StoreError`]; nothing is recorded then.
    pub fn record_signal(&self, s: &NewSignal, actions: &[&str]) -> Result<i64, StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO signals (created_ms, monitor, model, kind, reason, score, timestamp_ms, strategy, \
             strategy_version, strategy_sha256, fuel, snapshot, shadow) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)",
            params![
                now,
                s.monitor,
                s.model_version,
                s.kind,
                s.reason,
                s.score,
                s.timestamp,
                s.strategy,
                s.strategy_version,
                s.strategy_sha256,
                s.fuel as i64,
                s.snapshot.to_string(),
                s.shadow
            ],
        )?;
        let id = tx.last_insert_rowid();
        if !s.shadow {
            for (i, kind) in actions.iter().enumerate() {
                tx.execute(
                    "INSERT INTO deliveries (signal_id, action, kind, state, next_attempt_ms, updated_ms) \
                     VALUES (?1, ?2, ?3, 'pending', ?4, ?4)",
                    params![id, i as i64, kind, now],
                )?;
            }
        }
        tx.commit()?;
        Ok(id)
    }

    fn deliveries_of(conn: &Connection, id: i64) -> Result<Vec<DeliveryRecord>, StoreError> {
        let mut stmt = conn.prepare_cached(
            "SELECT action, kind, state, attempts, last_error, exit_code FROM deliveries WHERE signal_id = ?1 ORDER BY action",
        )?;
        let rows = stmt.query_map([id], |r| {
            Ok(DeliveryRecord {
                action: r.get(0)?,
                kind: r.get(1)?,
                state: r.get(2)?,
                attempts: r.get(3)?,
                last_error: r.get(4)?,
                exit_code: r.get(5)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn signal_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, i64, NewSignal)> {
        let snapshot: String = r.get(12)?;
        Ok((
            r.get(0)?,
            r.get(1)?,
            NewSignal {
                monitor: r.get(2)?,
                model_version: r.get(3)?,
                kind: r.get(4)?,
                reason: r.get(5)?,
                score: r.get(6)?,
                timestamp: r.get(7)?,
                strategy: r.get(8)?,
                strategy_version: r.get(9)?,
                strategy_sha256: r.get(10)?,
                fuel: r.get::<_, i64>(11)? as u64,
                snapshot: serde_json::from_str(&snapshot).unwrap_or(serde_json::Value::Null),
                shadow: r.get(13)?,
            },
        ))
    }

    const SIGNAL_COLUMNS: &'static str = "id, created_ms, monitor, model, kind, reason, score, timestamp_ms, strategy, \
         strategy_version, strategy_sha256, fuel, snapshot, shadow";

    /// The signal log, newest first, with delivery states.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn signals(&self, q: &SignalQuery) -> Result<Vec<SignalRecord>, StoreError> {
        let conn = self.conn.lock();
        let sql = format!(
            "SELECT {} FROM signals WHERE (?1 IS NULL OR monitor = ?1) AND (?2 IS NULL OR model = ?2) \
             AND (?3 IS NULL OR created_ms >= ?3) ORDER BY id DESC LIMIT ?4",
            Self::SIGNAL_COLUMNS
        );
        let mut stmt = conn.prepare_cached(&sql)?;
        let limit = q.limit.unwrap_or(100).min(10_000) as i64;
        let rows: Vec<_> = stmt
            .query_map(
                params![q.monitor, q.model, q.since, limit],
                Self::signal_from_row,
            )?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        rows.into_iter()
            .map(|(id, created, signal)| {
                Ok(SignalRecord {
                    id,
                    created,
                    signal,
                    deliveries: Self::deliveries_of(&conn, id)?,
                })
            })
            .collect()
    }

    /// Pending deliveries whose next attempt is due, oldest first.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn due_deliveries(&self, now: i64, limit: usize) -> Result<Vec<DueDelivery>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT signal_id, action, attempts FROM deliveries WHERE state = 'pending' AND next_attempt_ms <= ?1 \
             ORDER BY next_attempt_ms, signal_id, action LIMIT ?2",
        )?;
        let due: Vec<(i64, i64, i64)> = stmt
            .query_map(params![now, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect::<Result<_, _>>()?;
        drop(stmt);
        let mut out = Vec::with_capacity(due.len());
        for (signal_id, action, attempts) in due {
            let sql = format!("SELECT {} FROM signals WHERE id = ?1", Self::SIGNAL_COLUMNS);
            let row = conn
                .query_row(&sql, [signal_id], Self::signal_from_row)
                .optional()?;
            if let Some((id, created, signal)) = row {
                let deliveries = Self::deliveries_of(&conn, id)?;
                out.push(DueDelivery {
                    signal_id,
                    action,
                    attempts,
                    signal: SignalRecord {
                        id,
                        created,
                        signal,
                        deliveries,
                    },
                });
            }
        }
        Ok(out)
    }

    /// Marks a delivery attempt's outcome: `delivered`, or still `pending`
    /// with a next attempt time, or `failed` after the last attempt.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn finish_attempt(
        &self,
        signal_id: i64,
        action: i64,
        outcome: Result<(), String>,
        exit_code: Option<i32>,
        next_attempt_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let conn = self.conn.lock();
        let now = now_ms();
        let (state, error) = match (&outcome, next_attempt_ms) {
            (Ok(()), _) => ("delivered", None),
            (Err(e), Some(_)) => ("pending", Some(e.as_str())),
            (Err(e), None) => ("failed", Some(e.as_str())),
        };
        conn.execute(
            "UPDATE deliveries SET state = ?3, attempts = attempts + 1, last_error = ?4, exit_code = ?5, \
             next_attempt_ms = ?6, updated_ms = ?7 WHERE signal_id = ?1 AND action = ?2",
            params![signal_id, action, state, error, exit_code, next_attempt_ms.unwrap_or(now), now],
        )?;
        Ok(())
    }

    /// Counts of deliveries by state.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn delivery_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT state, COUNT(*) FROM deliveries GROUP BY state ORDER BY state",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a failed strategy call with the batch that caused it (NDJSON,
    /// as evaluated).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn record_failure(&self, f: &FailureRecord) -> Result<(), StoreError> {
        let conn = self.conn.lock();
        conn.execute(
            "INSERT INTO failures (created_ms, monitor, model, strategy_sha256, fault, error, batch) VALUES (?1,?2,?3,?4,?5,?6,?7)",
            params![now_ms(), f.monitor, f.model, f.strategy_sha256, f.fault, f.error, f.batch],
        )?;
        Ok(())
    }

    /// Recorded failures, newest first.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn failures(
        &self,
        monitor: Option<&str>,
        limit: usize,
    ) -> Result<Vec<FailureRecord>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT created_ms, monitor, model, strategy_sha256, fault, error, batch FROM failures \
             WHERE (?1 IS NULL OR monitor = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![monitor, limit.min(1000) as i64], |r| {
            Ok(FailureRecord {
                created: r.get(0)?,
                monitor: r.get(1)?,
                model: r.get(2)?,
                strategy_sha256: r.get(3)?,
                fault: r.get(4)?,
                error: r.get(5)?,
                batch: r.get(6)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records a swap, refusal or rollback.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn record_swap(&self, r: &SwapRecord) -> Result<(), StoreError> {
        let conn = self.conn.lock();
        conn.execute(
            "INSERT INTO swaps (created_ms, monitor, trigger, outcome, old_sha256, old_version, new_sha256, new_version, detail) \
             VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9)",
            params![now_ms(), r.monitor, r.trigger, r.outcome, r.old_sha256, r.old_version, r.new_sha256, r.new_version, r.detail],
        )?;
        Ok(())
    }

    /// Recorded swaps of `monitor` (or every monitor), newest first.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn swaps(
        &self,
        monitor: Option<&str>,
        limit: usize,
    ) -> Result<Vec<SwapRecord>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT created_ms, monitor, trigger, outcome, old_sha256, old_version, new_sha256, new_version, detail \
             FROM swaps WHERE (?1 IS NULL OR monitor = ?1) ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt.query_map(params![monitor, limit.min(1000) as i64], |r| {
            Ok(SwapRecord {
                created: r.get(0)?,
                monitor: r.get(1)?,
                trigger: r.get(2)?,
                outcome: r.get(3)?,
                old_sha256: r.get(4)?,
                old_version: r.get(5)?,
                new_sha256: r.get(6)?,
                new_version: r.get(7)?,
                detail: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Saves detector state of `monitor`/`model`.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn save_states(
        &self,
        monitor: &str,
        sha256: &str,
        states: &[(String, Vec<u8>)],
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        for (model, state) in states {
            tx.execute(
                "INSERT INTO detector_state (monitor, model, strategy_sha256, state, updated_ms) VALUES (?1,?2,?3,?4,?5) \
                 ON CONFLICT (monitor, model) DO UPDATE SET strategy_sha256 = ?3, state = ?4, updated_ms = ?5",
                params![monitor, model, sha256, state, now],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The saved detector states of `monitor`: (model, strategy sha, bytes).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    /// Forgets every saved detector state of `monitor` (its configuration
    /// changed, so the states no longer describe it).
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn clear_states(&self, monitor: &str) -> Result<usize, StoreError> {
        Ok(self
            .conn
            .lock()
            .execute("DELETE FROM detector_state WHERE monitor = ?1", [monitor])?)
    }

    /// The saved detector states of `monitor`: model, component SHA-256, bytes.
    ///
    /// # Errors
    ///
    /// [`StoreError`].
    pub fn load_states(&self, monitor: &str) -> Result<Vec<(String, String, Vec<u8>)>, StoreError> {
        let conn = self.conn.lock();
        let mut stmt =
            conn.prepare_cached("SELECT model, strategy_sha256, state FROM detector_state WHERE monitor = ?1 ORDER BY model")?;
        let rows = stmt.query_map([monitor], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}
