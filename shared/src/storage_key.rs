//! Storage keys: the only way a message may name a file.
//!
//! A key is relative to the storage root, uses a conservative alphabet, has no empty,
//! `.` or `..` segment and is bounded in length, so no message can make a worker read or
//! write outside its storage root. Validation happens at deserialisation: an invalid key
//! cannot exist as a [`StorageKey`] value.

use std::fmt;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Longest key accepted, in bytes.
pub const MAX_KEY_LEN: usize = 512;

/// A validated, relative storage key such as `uploads/<job_id>/source.mp4`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct StorageKey(String);

/// Why a string is not a storage key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid storage key `{key}`: {reason}")]
pub struct InvalidKey {
    key: String,
    reason: &'static str,
}

impl StorageKey {
    /// Validates `key`. A trailing `/` is allowed (it marks a prefix).
    pub fn new(key: impl Into<String>) -> Result<Self, InvalidKey> {
        let key = key.into();
        let fail = |reason| {
            Err(InvalidKey {
                // Keep the error itself bounded even for a hostile megabyte-long key.
                key: key.chars().take(80).collect(),
                reason,
            })
        };
        if key.is_empty() {
            return fail("it is empty");
        }
        if key.len() > MAX_KEY_LEN {
            return fail("it is longer than 512 bytes");
        }
        if key.starts_with('/') {
            return fail("it is absolute; keys are relative to the storage root");
        }
        if !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'))
        {
            return fail("only A-Z, a-z, 0-9, `/`, `.`, `_` and `-` are allowed");
        }
        let body = key.strip_suffix('/').unwrap_or(&key);
        for segment in body.split('/') {
            match segment {
                "" => return fail("it has an empty path segment"),
                "." | ".." => return fail("`.` and `..` segments are not allowed"),
                _ => {}
            }
        }
        Ok(Self(key))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Where a task of a job writes its outputs and manifest: `outputs/<job_id>/<task>/`.
    /// The one place this layout is spelled; the producer puts it in each job message,
    /// and status, wait, tests and benchmarks look there.
    pub fn output_prefix(job_id: Uuid, task: &str) -> Result<Self, InvalidKey> {
        Self::new(format!("outputs/{job_id}/{task}/"))
    }

    /// `self` + `name`, for a prefix key (ending in `/`) and a file name.
    pub fn join(&self, name: &str) -> Result<Self, InvalidKey> {
        let base = self.0.strip_suffix('/').unwrap_or(&self.0);
        Self::new(format!("{base}/{name}"))
    }
}

impl TryFrom<String> for StorageKey {
    type Error = InvalidKey;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<StorageKey> for String {
    fn from(key: StorageKey) -> Self {
        key.0
    }
}

impl fmt::Display for StorageKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for k in [
            "uploads/abc/source.mp4",
            "outputs/abc/transcode/",
            "a",
            "x-y_z.1/b",
        ] {
            assert!(StorageKey::new(k).is_ok(), "{k}");
        }
    }

    #[test]
    fn rejects_escapes_and_oddities() {
        let long = "a".repeat(MAX_KEY_LEN + 1);
        for k in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a\\b",
            "a b",
            "é",
            "a\0b",
            long.as_str(),
        ] {
            assert!(StorageKey::new(k).is_err(), "{k:?} should be rejected");
        }
    }

    #[test]
    fn join_builds_child_keys() {
        let prefix = StorageKey::new("outputs/j/transcode/").unwrap();
        assert_eq!(
            prefix.join("720p.mp4").unwrap().as_str(),
            "outputs/j/transcode/720p.mp4"
        );
        assert!(prefix.join("../x").is_err());
    }

    #[test]
    fn output_prefix_is_outputs_job_task() {
        let id = Uuid::nil();
        assert_eq!(
            StorageKey::output_prefix(id, "thumbnail").unwrap().as_str(),
            "outputs/00000000-0000-0000-0000-000000000000/thumbnail/"
        );
        assert!(StorageKey::output_prefix(id, "../x").is_err());
    }
}
