//! The task manifest: `manifest.json` under a task's output prefix, the record that the
//! task is done.
//!
//! The runtime writes it last, with create-if-absent (see [`crate::storage`]), so its
//! presence means "this task is complete" and it names exactly one run's files. Every
//! writer and reader goes through [`Manifest`]; the JSON on disk keeps the field names
//! it has always had, so manifests written before this type existed still read.
//!
//! What is common to every task is typed; what only one task knows (a transcode's
//! renditions, a thumbnail's time) stays free-form: per file in [`ManifestOutput::facts`],
//! per task in [`Manifest::summary`].

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::storage_key::StorageKey;

/// Who completed which task of which job, when and how: the facts known before the
/// outputs are stored. [`crate::storage::Storage::commit`] adds the rest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Message schema of the job ([`crate::messages::SCHEMA_VERSION`]).
    pub schema: u32,
    pub job_id: Uuid,
    pub task: String,
    /// The source the outputs were made from.
    pub source: StorageKey,
    /// Name of the worker that ran the handler.
    pub worker: String,
    /// 1-based attempt that succeeded.
    pub attempt: u32,
    /// RFC 3339 time the handler finished.
    pub completed_at: String,
    /// Handler wall time in seconds.
    pub duration_s: f64,
}

/// A task's manifest, as stored at `<output prefix>/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub completion: Completion,
    /// The run (one attempt's upload) whose files these are: `run-<12 hex>`. Outputs live
    /// under `<output prefix>/<run>/`.
    pub run: String,
    pub outputs: Vec<ManifestOutput>,
    /// Task-level facts from the handler (source probe, renditions, …); `null` if none.
    #[serde(default)]
    pub summary: serde_json::Value,
}

/// One committed file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestOutput {
    /// Name the handler gave it, e.g. `720p.mp4` or `hls/720p/seg_00001.ts`.
    pub name: String,
    /// Where it is stored: `<output prefix>/<run>/<name>`.
    pub key: StorageKey,
    pub size_bytes: u64,
    /// The handler's facts about the file (format, width, …), stored beside the fields
    /// above in the same JSON object, as they always were.
    #[serde(flatten)]
    pub facts: serde_json::Map<String, serde_json::Value>,
}

/// The fields of [`ManifestOutput`] the runtime owns: a handler fact of the same name
/// is dropped, so the key and size recorded are always the ones stored.
pub const RESERVED_OUTPUT_FIELDS: [&str; 3] = ["name", "key", "size_bytes"];

/// A `manifest.json` that is not a manifest (unparseable, or without the fields every
/// manifest has). Permanent: the object is written once, whole, and will not change.
#[derive(Debug, Clone, thiserror::Error)]
#[error("`{key}` is not a readable manifest: {reason}")]
pub struct UnreadableManifest {
    pub key: String,
    pub reason: String,
}

impl Manifest {
    /// Total bytes of the files it lists.
    pub fn output_bytes(&self) -> u64 {
        self.outputs.iter().map(|o| o.size_bytes).sum()
    }

    /// Parses a stored manifest; `key` names it in the error.
    pub fn from_json(key: &StorageKey, bytes: &[u8]) -> Result<Self, UnreadableManifest> {
        serde_json::from_slice(bytes).map_err(|e| UnreadableManifest {
            key: key.to_string(),
            // Bounded: the text may quote a hostile file.
            reason: e.to_string().chars().take(300).collect(),
        })
    }

    /// The manifest as stored: pretty JSON, the field names documented in the README.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec_pretty(self).expect("a manifest serialises: string keys only")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest as the runtime wrote it before this type existed (one of the test
    /// worker's, with a handler fact and a summary).
    const STORED: &str = r#"{
      "schema": 1,
      "job_id": "6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
      "task": "transcode",
      "source": "uploads/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/source.mp4",
      "worker": "transcoder-host-1",
      "attempt": 2,
      "completed_at": "2026-11-30T14:00:00.000Z",
      "duration_s": 1.25,
      "run": "run-0123456789ab",
      "outputs": [
        {"name": "720p.mp4", "key": "outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/run-0123456789ab/720p.mp4",
         "size_bytes": 1000, "format": "mp4", "width": 1280, "audio_codec": null},
        {"name": "hls/master.m3u8", "key": "outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/run-0123456789ab/hls/master.m3u8",
         "size_bytes": 24, "format": "hls-master-playlist"}
      ],
      "summary": {"dropped_renditions": ["1080p"]}
    }"#;

    fn key() -> StorageKey {
        StorageKey::new("outputs/x/transcode/manifest.json").unwrap()
    }

    #[test]
    fn a_stored_manifest_reads_and_writes_back_the_same_json() {
        let manifest = Manifest::from_json(&key(), STORED.as_bytes()).unwrap();
        assert_eq!(manifest.completion.attempt, 2);
        assert_eq!(manifest.output_bytes(), 1024);
        assert_eq!(manifest.outputs[0].facts["width"], 1280);
        assert_eq!(manifest.summary["dropped_renditions"][0], "1080p");

        let written: serde_json::Value = serde_json::from_slice(&manifest.to_json()).unwrap();
        let stored: serde_json::Value = serde_json::from_str(STORED).unwrap();
        assert_eq!(written, stored, "same field names, same values");
    }

    /// The example users read in `docs/manifest.md` is a manifest, field for field.
    #[test]
    fn the_documented_example_reads_and_writes_back_unchanged() {
        let doc = include_str!("../../docs/manifest.md");
        let example = doc
            .split("```json\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("docs/manifest.md has a JSON example");
        let manifest = Manifest::from_json(&key(), example.as_bytes()).unwrap();
        assert_eq!(manifest.completion.task, "thumbnail");
        let written: serde_json::Value = serde_json::from_slice(&manifest.to_json()).unwrap();
        let documented: serde_json::Value = serde_json::from_str(example).unwrap();
        assert_eq!(written, documented);
    }

    #[test]
    fn a_file_without_the_common_fields_is_unreadable() {
        for body in [
            r#"{"task": "transcode", "outputs": []}"#,
            r#"{"job_id": "not-a-uuid"}"#,
            "not json",
        ] {
            let err = Manifest::from_json(&key(), body.as_bytes()).unwrap_err();
            assert!(err.to_string().contains("manifest.json"), "{err}");
        }
    }
}
