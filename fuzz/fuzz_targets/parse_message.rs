//! Message parsing: arbitrary bytes as a transcode and as a thumbnail job body.
//!
//! Invariants, for both job types:
//! - `parse` never panics (whatever the bytes; libFuzzer reports any panic as a crash);
//! - a job `parse` accepts survives `to_body` → `parse` unchanged, so what the producer
//!   publishes is exactly what a worker reads;
//! - an accepted job's storage keys are relative, with no empty, `.` or `..` segment, and
//!   its `output_prefix` ends with `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::messages::{JobMessage, ThumbnailJob, TranscodeJob, parse, to_body};
use shared::storage_key::StorageKey;

fuzz_target!(|data: &[u8]| {
    check::<TranscodeJob>(data);
    check::<ThumbnailJob>(data);
});

fn check<J: JobMessage + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let job = match parse::<J>(data) {
        Ok(job) => job,
        Err(e) => {
            // Error texts end up in dead-letter headers: formatting them must not panic.
            let _ = e.to_string();
            return;
        }
    };
    assert_relative_key(job.source());
    assert_relative_key(job.output_prefix());
    assert!(
        job.output_prefix().as_str().ends_with('/'),
        "accepted output_prefix without trailing `/`: {:?}",
        job.output_prefix()
    );
    let body = to_body(&job);
    let again = parse::<J>(&body).unwrap_or_else(|e| {
        panic!(
            "re-serialised {} job does not parse: {e}\nbody: {}",
            J::TASK,
            String::from_utf8_lossy(&body)
        )
    });
    assert_eq!(
        job,
        again,
        "{} job changed across to_body/parse\nbody: {}",
        J::TASK,
        String::from_utf8_lossy(&body)
    );
}

fn assert_relative_key(key: &StorageKey) {
    let s = key.as_str();
    assert!(!s.is_empty(), "empty key accepted");
    assert!(!s.starts_with('/'), "absolute key accepted: {s:?}");
    assert!(!s.contains('\\'), "backslash in key accepted: {s:?}");
    let body = s.strip_suffix('/').unwrap_or(s);
    for segment in body.split('/') {
        assert!(
            !matches!(segment, "" | "." | ".."),
            "key with segment {segment:?} accepted: {s:?}"
        );
    }
    // And the key type agrees with itself.
    assert!(
        StorageKey::new(s).is_ok(),
        "accepted key fails StorageKey::new: {s:?}"
    );
}
