//! Serde helpers for times on the wire: durations as whole milliseconds, instants
//! as milliseconds since the Unix epoch. Both are plain integers in MessagePack
//! and JSON, which any language reads.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serializer};

/// Longest timeout, ttl or delay anything takes: a hundred years. Longer
/// ones are refused where they come in (a run's options, a flow's
/// definition): added to a time, a duration read off the wire (up to
/// 2^64 ms) would land past what a time in milliseconds can say.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Milliseconds since the Unix epoch of `t` (0 before the epoch, and
/// `u64::MAX` past what that can say, rather than wrapping around).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// `Duration` as whole milliseconds.
pub mod duration_ms {
    use super::*;

    /// Serializes the duration as whole milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// `Option<Duration>` as whole milliseconds or nil.
pub mod opt_duration_ms {
    use super::*;

    /// Serializes the duration as whole milliseconds, or none.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    /// Reads whole milliseconds or none.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// `SystemTime` as milliseconds since the Unix epoch.
pub mod unix_ms_serde {
    use super::*;

    /// Serializes the instant as Unix milliseconds.
    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(unix_ms(*t))
    }

    /// Reads Unix milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        u64::deserialize(d).map(from_unix_ms)
    }
}

/// `Option<SystemTime>` as milliseconds since the Unix epoch or nil.
pub mod opt_unix_ms {
    use super::*;

    /// Serializes the instant as Unix milliseconds, or none.
    pub fn serialize<S: Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
        match t {
            Some(t) => s.serialize_some(&unix_ms(*t)),
            None => s.serialize_none(),
        }
    }

    /// Reads Unix milliseconds or none.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SystemTime>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(from_unix_ms))
    }
}
