//! `MetricSnapshot` and the snapshot wire format.
//!
//! Wire format (JSON, one object per snapshot):
//!
//! | field | type | required |
//! | --- | --- | --- |
//! | `model_version` | non-empty string (≤ 256 bytes) | yes |
//! | `score` | finite number | yes |
//! | `loss` | finite number or `null` | no |
//! | `timestamp` | RFC 3339 string or integer milliseconds since the Unix epoch | no (time of receipt) |
//! | `metrics` | object of finite numbers | no |
//!
//! Unknown fields are refused so that a typo (`"scroe"`) does not pass
//! silently. Snapshots serialise with an RFC 3339 timestamp (millisecond
//! precision).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};

/// Longest accepted `model_version`, in bytes.
pub const MAX_MODEL_VERSION_LEN: usize = 256;
/// Most named metrics one snapshot may carry.
pub const MAX_METRICS: usize = 64;
/// Latest accepted timestamp: 9999-12-31T23:59:59.999Z.
const MAX_TIMESTAMP_MS: i64 = 253_402_300_799_999;

/// A single atomic snapshot of model performance at a given point in time.
///
/// Exactly the seed's four public fields, so that code written against the
/// seed (struct literals included) keeps compiling. Named extra metrics travel
/// next to it in an [`Observation`].
#[derive(Clone, Debug, PartialEq)]
pub struct MetricSnapshot {
    /// Human-readable model identifier (e.g. "obj_det_v12.3.1").
    pub model_version: String,
    /// Primary KPI. Interpretation depends on problem-type (accuracy/mAP/etc.).
    pub score: f64,
    /// Optional loss value for supervised tasks.
    pub loss: Option<f64>,
    /// Wall-clock timestamp, generated at the source side.
    pub timestamp: SystemTime,
}

impl MetricSnapshot {
    /// Whether the snapshot qualifies as *degraded* compared to `baseline`:
    /// same model, and `score + tolerance < baseline.score`.
    pub fn is_degraded(&self, baseline: &Self, tolerance: f64) -> bool {
        self.model_version == baseline.model_version && self.score + tolerance < baseline.score
    }

    /// The timestamp in milliseconds since the Unix epoch (negative before
    /// 1970).
    pub fn timestamp_ms(&self) -> i64 {
        system_time_to_ms(self.timestamp)
    }

    /// Checks the invariants the wire format guarantees: a non-empty, bounded
    /// `model_version` and finite numbers.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] naming the offending field.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        validate_model_version(&self.model_version)?;
        finite("score", self.score)?;
        if let Some(loss) = self.loss {
            finite("loss", loss)?;
        }
        Ok(())
    }
}

/// A snapshot as it arrives on the wire: a [`MetricSnapshot`] plus its named
/// extra metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Observation {
    /// The seed's snapshot.
    pub snapshot: MetricSnapshot,
    /// Named extra metrics (finite numbers), e.g. `{"drift_psi": 0.12}`.
    pub metrics: BTreeMap<String, f64>,
}

impl Observation {
    /// Parses one snapshot in the wire format; `received` is used when it
    /// carries no timestamp.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] naming the field and the problem.
    pub fn from_json(text: &str, received: SystemTime) -> Result<Self, SnapshotError> {
        let wire: Wire = serde_json::from_str(text).map_err(json_error)?;
        wire.into_observation(received)
    }

    /// Parses one already-decoded JSON value in the wire format.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] naming the field and the problem.
    pub fn from_value(
        value: serde_json::Value,
        received: SystemTime,
    ) -> Result<Self, SnapshotError> {
        let wire: Wire<'_> =
            Wire::deserialize(&value).map_err(|e| SnapshotError::Json(e.to_string()))?;
        wire.into_observation(received)
    }
}

impl From<MetricSnapshot> for Observation {
    fn from(snapshot: MetricSnapshot) -> Self {
        Observation {
            snapshot,
            metrics: BTreeMap::new(),
        }
    }
}

/// Why a snapshot was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SnapshotError {
    /// Not JSON, a missing or unknown field, or a field of the wrong type.
    #[error("{0}")]
    Json(String),
    /// A number that is NaN or infinite.
    #[error("`{field}` must be a finite number, got {value}")]
    NotFinite {
        /// The field (`score`, `loss` or `metrics.<name>`).
        field: String,
        /// The value as received.
        value: f64,
    },
    /// Any other invalid field.
    #[error("`{field}`: {reason}")]
    Invalid {
        /// The field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// serde_json's message with "at line 1 column N" (always line 1 for one
/// snapshot) shortened to "at column N".
fn json_error(e: serde_json::Error) -> SnapshotError {
    let text = e.to_string();
    match text.rfind(" at line ") {
        Some(pos) if e.line() <= 1 => {
            SnapshotError::Json(format!("{} at column {}", &text[..pos], e.column()))
        }
        _ => SnapshotError::Json(text),
    }
}

fn finite(field: &str, value: f64) -> Result<(), SnapshotError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(SnapshotError::NotFinite {
            field: field.to_string(),
            value,
        })
    }
}

fn validate_model_version(m: &str) -> Result<(), SnapshotError> {
    let invalid = |reason: &str| SnapshotError::Invalid {
        field: "model_version".into(),
        reason: reason.into(),
    };
    if m.is_empty() {
        return Err(invalid("must not be empty"));
    }
    if m.len() > MAX_MODEL_VERSION_LEN {
        return Err(invalid(&format!(
            "longer than {MAX_MODEL_VERSION_LEN} bytes"
        )));
    }
    if m.chars().any(char::is_control) {
        return Err(invalid("must not contain control characters"));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch of `t` (negative before 1970).
pub fn system_time_to_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// The `SystemTime` of `ms` milliseconds since the Unix epoch.
pub fn ms_to_system_time(ms: i64) -> SystemTime {
    if ms >= 0 {
        UNIX_EPOCH + Duration::from_millis(ms.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
    }
}

/// RFC 3339 with millisecond precision, e.g. `2026-12-03T18:40:00.123Z`.
pub fn format_timestamp(t: SystemTime) -> String {
    if t < UNIX_EPOCH {
        // humantime cannot format dates before 1970; the wire refuses them.
        return format!("{}ms", system_time_to_ms(t));
    }
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire<'a> {
    #[serde(borrow)]
    model_version: Cow<'a, str>,
    score: f64,
    #[serde(default)]
    loss: Option<f64>,
    #[serde(default, deserialize_with = "de_timestamp")]
    timestamp: Option<SystemTime>,
    #[serde(default)]
    metrics: BTreeMap<String, f64>,
}

impl<'a> Wire<'a> {
    fn into_observation(self, received: SystemTime) -> Result<Observation, SnapshotError> {
        self.into_ref(received)
            .map(ObservationRef::into_observation)
    }

    fn into_ref(self, received: SystemTime) -> Result<ObservationRef<'a>, SnapshotError> {
        validate_model_version(&self.model_version)?;
        finite("score", self.score)?;
        if let Some(loss) = self.loss {
            finite("loss", loss)?;
        }
        if self.metrics.len() > MAX_METRICS {
            return Err(SnapshotError::Invalid {
                field: "metrics".into(),
                reason: format!(
                    "{} entries, at most {MAX_METRICS} are accepted",
                    self.metrics.len()
                ),
            });
        }
        for (name, &value) in &self.metrics {
            if name.is_empty() || name.len() > 128 {
                return Err(SnapshotError::Invalid {
                    field: "metrics".into(),
                    reason: format!("metric name {name:?} must be 1 to 128 bytes"),
                });
            }
            finite(&format!("metrics.{name}"), value)?;
        }
        Ok(ObservationRef {
            model_version: self.model_version,
            score: self.score,
            loss: self.loss,
            timestamp: self.timestamp.unwrap_or(received),
            metrics: self.metrics,
        })
    }
}

/// A validated snapshot that borrows its `model_version` from the input
/// when it can: the fast path of bulk parsing (replay, ingestion). Exactly
/// the same validation as [`Observation::from_json`].
#[derive(Clone, Debug, PartialEq)]
pub struct ObservationRef<'a> {
    /// The model.
    pub model_version: Cow<'a, str>,
    /// The primary KPI (finite).
    pub score: f64,
    /// The loss (finite), if any.
    pub loss: Option<f64>,
    /// Source timestamp, or the time of receipt.
    pub timestamp: SystemTime,
    /// Named extra metrics (finite).
    pub metrics: BTreeMap<String, f64>,
}

impl<'a> ObservationRef<'a> {
    /// Parses one snapshot in the wire format.
    ///
    /// # Errors
    ///
    /// [`SnapshotError`] naming the field and the problem.
    pub fn from_json(text: &'a str, received: SystemTime) -> Result<Self, SnapshotError> {
        let wire: Wire<'a> = serde_json::from_str(text).map_err(json_error)?;
        wire.into_ref(received)
    }

    /// The timestamp in milliseconds since the Unix epoch.
    pub fn timestamp_ms(&self) -> i64 {
        system_time_to_ms(self.timestamp)
    }

    /// An owned [`Observation`].
    pub fn into_observation(self) -> Observation {
        Observation {
            snapshot: MetricSnapshot {
                model_version: self.model_version.into_owned(),
                score: self.score,
                loss: self.loss,
                timestamp: self.timestamp,
            },
            metrics: self.metrics,
        }
    }
}

fn de_timestamp<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
    struct V;
    impl<'de> de::Visitor<'de> for V {
        type Value = Option<SystemTime>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an RFC 3339 string or integer milliseconds since the Unix epoch")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_any(self)
        }
        fn visit_i64<E: de::Error>(self, ms: i64) -> Result<Self::Value, E> {
            if !(0..=MAX_TIMESTAMP_MS).contains(&ms) {
                return Err(E::custom(format!(
                    "timestamp {ms} ms is outside 1970-01-01..9999-12-31 (integer timestamps are milliseconds since the Unix epoch)"
                )));
            }
            Ok(Some(ms_to_system_time(ms)))
        }
        fn visit_u64<E: de::Error>(self, ms: u64) -> Result<Self::Value, E> {
            self.visit_i64(i64::try_from(ms).unwrap_or(i64::MAX))
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
            Err(E::custom(format!(
                "timestamp {v} is not an integer; use integer milliseconds since the Unix epoch or an RFC 3339 string"
            )))
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
            humantime::parse_rfc3339_weak(s)
                .map(Some)
                .map_err(|e| E::custom(format!("timestamp {s:?} is not RFC 3339 ({e})")))
        }
    }
    d.deserialize_option(V)
}

impl Serialize for MetricSnapshot {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("model_version", &self.model_version)?;
        m.serialize_entry("score", &self.score)?;
        if let Some(loss) = self.loss {
            m.serialize_entry("loss", &loss)?;
        }
        m.serialize_entry("timestamp", &format_timestamp(self.timestamp))?;
        m.end()
    }
}

impl<'de> Deserialize<'de> for MetricSnapshot {
    /// Accepts the wire format without `metrics`; a missing timestamp means
    /// now.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let wire = Wire::deserialize(d)?;
        if !wire.metrics.is_empty() {
            return Err(de::Error::custom(
                "`metrics` cannot be stored in a MetricSnapshot; parse an Observation instead",
            ));
        }
        wire.into_observation(SystemTime::now())
            .map(|o| o.snapshot)
            .map_err(de::Error::custom)
    }
}

impl Serialize for Observation {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let snap = &self.snapshot;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("model_version", &snap.model_version)?;
        m.serialize_entry("score", &snap.score)?;
        if let Some(loss) = snap.loss {
            m.serialize_entry("loss", &loss)?;
        }
        m.serialize_entry("timestamp", &format_timestamp(snap.timestamp))?;
        if !self.metrics.is_empty() {
            m.serialize_entry("metrics", &self.metrics)?;
        }
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Observation, SnapshotError> {
        Observation::from_json(s, UNIX_EPOCH)
    }

    #[test]
    fn accepts_rfc3339_and_epoch_ms_timestamps() {
        let a =
            parse(r#"{"model_version":"m","score":0.9,"timestamp":"2026-01-02T03:04:05.678Z"}"#)
                .unwrap();
        let b = parse(r#"{"model_version":"m","score":0.9,"timestamp":1767323045678}"#).unwrap();
        assert_eq!(a.snapshot.timestamp, b.snapshot.timestamp);
        assert_eq!(a.snapshot.timestamp_ms(), 1_767_323_045_678);
    }

    #[test]
    fn missing_timestamp_means_time_of_receipt() {
        let received = UNIX_EPOCH + Duration::from_secs(42);
        let o = Observation::from_json(r#"{"model_version":"m","score":1}"#, received).unwrap();
        assert_eq!(o.snapshot.timestamp, received);
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = parse(r#"{"model_version":"m","scroe":0.9}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `scroe`"), "{e}");
    }

    #[test]
    fn non_finite_and_out_of_range_values_are_refused() {
        let e = parse(r#"{"model_version":"m","score":1e999}"#)
            .unwrap_err()
            .to_string();
        assert!(!e.is_empty());
        let e = parse(r#"{"model_version":"m","score":1,"timestamp":-5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside"), "{e}");
        let e = parse(r#"{"model_version":"m","score":1,"timestamp":1.5}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not an integer"), "{e}");
        let e = parse(r#"{"model_version":"","score":1}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_version"), "{e}");
        let snap = MetricSnapshot {
            model_version: "m".into(),
            score: f64::NAN,
            loss: None,
            timestamp: UNIX_EPOCH,
        };
        assert!(matches!(
            snap.validate(),
            Err(SnapshotError::NotFinite { .. })
        ));
    }

    #[test]
    fn serialises_rfc3339_and_round_trips() {
        let o = parse(r#"{"model_version":"m","score":0.5,"loss":0.1,"timestamp":1000,"metrics":{"psi":0.2}}"#)
            .unwrap();
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(
            json,
            r#"{"model_version":"m","score":0.5,"loss":0.1,"timestamp":"1970-01-01T00:00:01.000Z","metrics":{"psi":0.2}}"#
        );
        assert_eq!(parse(&json).unwrap(), o);
        let snap: MetricSnapshot =
            serde_json::from_str(&serde_json::to_string(&o.snapshot).unwrap()).unwrap();
        assert_eq!(snap, o.snapshot);
    }
}
