//! Split jobs: one task done as many parts by many workers, joined exactly once.
//!
//! The shape (the transcoder's segment-parallel mode is its user):
//!
//! ```text
//!  job ──plan──► part 0 … part N-1 (+ audio) ──each commits, then checks──► join ("stitch")
//!        (fan-out: the parts are      (fan-in: the part whose commit completes
//!         published, confirmed,        the set publishes the join, confirmed,
//!         before the job is acked)     before it is acked)
//! ```
//!
//! - **Fan-out.** A handler returns [`FollowUp`]s in [`crate::TaskOutput::fan_out`]
//!   instead of files. The runtime publishes each to the tasks exchange and waits for
//!   the broker's confirms before it acks the job: a crash in between publishes the parts
//!   twice at worst, and a part is idempotent (below).
//! - **Parts** travel through their task's own queue, retries, dead letters and time
//!   limit like any job. Each commits under its own prefix ([`crate::messages::JobMessage::commit_prefix`])
//!   with the usual create-if-absent manifest, so a redelivered part finds its manifest
//!   and does no work twice.
//! - **Fan-in.** After a part's commit, and also when a redelivered part finds itself
//!   already committed, the runtime looks at every part's manifest ([`FanIn::awaits`]).
//!   If all are there it publishes the join ([`FanIn::then`]), confirmed, and only then
//!   acks the part. Why this cannot miss the join: every part checks *after* its own
//!   commit, and storage reads see completed writes (S3 and the filesystem are strongly
//!   consistent), so whichever part commits last sees all the others. Two parts finishing
//!   together may both see all of them: then the join is published twice.
//! - **The join** reads the parts' committed outputs ([`Inputs::Parts`]) and commits the
//!   task's own outputs and manifest, create-if-absent: of two joins, one manifest wins
//!   and the other counts as a duplicate (no second `completed` event). A part or join
//!   that arrives after the task's manifest exists is moot and is acked at once.
//!
//! No database: storage's create-if-absent and the broker's confirms are the whole
//! coordination.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::messages::{self, JobMessage};
use crate::priority::Priority;
use crate::storage_key::StorageKey;

/// Which part of a split task a job is, as events and dead letters name it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartRef {
    /// `segment` or `audio`.
    pub stage: String,
    /// The segment's 0-based index; for audio, the number of segments (it comes after
    /// them).
    pub index: u32,
    /// Segments in the plan.
    pub segments: u32,
}

impl PartRef {
    pub fn segment(index: u32, segments: u32) -> Self {
        Self {
            stage: "segment".into(),
            index,
            segments,
        }
    }

    pub fn audio(segments: u32) -> Self {
        Self {
            stage: "audio".into(),
            index: segments,
            segments,
        }
    }

    /// `segment 3/10` (1-based for people) or `audio`.
    pub fn label(&self) -> String {
        if self.stage == "segment" {
            format!("segment {}/{}", self.index + 1, self.segments)
        } else {
            self.stage.clone()
        }
    }
}

/// What a job reads.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// Its source video (every unsplit job, and the parts of a split one).
    Source,
    /// The committed outputs of these parts, in order (a join).
    Parts(Vec<StorageKey>),
}

/// A part's fan-in: once every prefix in `awaits` holds a manifest, publish `then`.
#[derive(Debug, Clone, PartialEq)]
pub struct FanIn<J> {
    pub awaits: Vec<StorageKey>,
    pub then: J,
}

/// A job a handler asks the runtime to publish (fan-out).
#[derive(Debug, Clone, PartialEq)]
pub struct FollowUp {
    pub job_id: Uuid,
    pub routing_key: &'static str,
    pub body: Vec<u8>,
}

impl FollowUp {
    /// `job` as it is published.
    pub fn of<J: JobMessage>(job: &J) -> Self {
        Self {
            job_id: job.job_id(),
            routing_key: J::KIND.routing_key(),
            body: messages::to_body(job),
        }
    }
}

/// Publishes a handler's fan-out with the priority of the job it came from (parts of a
/// high job are high, [`crate::priority`]), each with the broker's confirm (persistent, mandatory:
/// an unroutable part is an error, not a silent drop). The job is acked only after this
/// returns Ok.
pub(crate) async fn publish_all(
    channel: &lapin::Channel,
    exchange: &str,
    jobs: &[FollowUp],
    priority: Priority,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let keys: Vec<String> = jobs
        .iter()
        .map(|j| priority.routing_key(j.routing_key))
        .collect();
    let sends = jobs.iter().zip(&keys).map(|(job, key)| {
        let props = crate::broker::persistent_json(lapin::types::FieldTable::default());
        crate::broker::publish_confirmed(channel, exchange, key, &job.body, props)
    });
    // Confirms are awaited together: one round trip for the lot, not one per part.
    for (i, sent) in futures::future::join_all(sends)
        .await
        .into_iter()
        .enumerate()
    {
        sent.with_context(|| format!("publishing part {} of {}", i + 1, jobs.len()))?;
    }
    Ok(())
}

/// The fan-in check of a committed part: if every part it awaits is committed, publish
/// the join (confirmed). Ok(true) if it was published.
pub(crate) async fn join_when_complete<J: JobMessage>(
    storage: &crate::storage::Storage,
    channel: &lapin::Channel,
    exchange: &str,
    fan_in: &FanIn<J>,
    priority: Priority,
) -> anyhow::Result<bool> {
    use anyhow::Context as _;
    // One listing per folder of parts (all of a plan's parts share one), not a metadata
    // call per part: each part checks, so per-part calls would grow with the square of
    // the segments. Listings are strongly consistent on S3 and the filesystem alike.
    let mut stored = std::collections::HashSet::new();
    let mut listed = std::collections::HashSet::new();
    for prefix in &fan_in.awaits {
        let parent = parent_of(prefix);
        if listed.insert(parent.clone()) {
            let keys = storage
                .list(&parent)
                .await
                .with_context(|| format!("listing the parts under `{parent}`"))?;
            stored.extend(keys);
        }
    }
    let all_committed = fan_in
        .awaits
        .iter()
        .all(|p| stored.contains(crate::storage::Storage::manifest_key(p).as_str()));
    if !all_committed {
        return Ok(false);
    }
    publish_all(channel, exchange, &[FollowUp::of(&fan_in.then)], priority)
        .await
        .context("publishing the join of the completed parts")?;
    Ok(true)
}

/// The folder holding a part's folder: `…/parts/<plan>/` of `…/parts/<plan>/seg-00003/`.
fn parent_of(prefix: &StorageKey) -> StorageKey {
    let trimmed = prefix.as_str().trim_end_matches('/');
    let parent = match trimmed.rfind('/') {
        Some(at) => &trimmed[..=at],
        None => "",
    };
    StorageKey::new(parent.to_owned()).unwrap_or_else(|_| prefix.clone())
}

/// A join's inputs: each part's manifest and its outputs as local files (read in place
/// on the filesystem backend, copied into `scratch` otherwise).
pub(crate) async fn fetch_parts(
    storage: &crate::storage::Storage,
    prefixes: &[StorageKey],
    scratch: &std::path::Path,
) -> anyhow::Result<(Vec<crate::handler::CommittedPart>, u64)> {
    use anyhow::Context as _;
    let mut parts = Vec::with_capacity(prefixes.len());
    let mut bytes = 0;
    for (i, prefix) in prefixes.iter().enumerate() {
        let manifest = storage
            .manifest(prefix)
            .await
            .with_context(|| format!("reading part `{prefix}`"))?
            // The fan-in saw it committed; gone now means the parts were cleaned up by a
            // join that won, and the retry will find the task's manifest.
            .with_context(|| format!("part `{prefix}` has no manifest"))?;
        let mut files = Vec::with_capacity(manifest.outputs.len());
        for (j, output) in manifest.outputs.iter().enumerate() {
            let copy = scratch.join(format!("part-{i:05}-{j:03}"));
            let local = storage.fetch_as(&output.key, &copy).await?;
            bytes += local.size;
            files.push(local.path);
        }
        parts.push(crate::handler::CommittedPart { manifest, files });
    }
    Ok((parts, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_parts_folder_is_listed_once_for_all_its_parts() {
        let key = |k: &str| StorageKey::new(k.to_owned()).unwrap();
        assert_eq!(
            parent_of(&key(
                "outputs/j/transcode/parts/0123456789abcdef/seg-00003/"
            )),
            key("outputs/j/transcode/parts/0123456789abcdef/")
        );
        assert_eq!(
            parent_of(&key("outputs/j/transcode/parts/0123456789abcdef/audio/")),
            key("outputs/j/transcode/parts/0123456789abcdef/")
        );
    }

    #[test]
    fn parts_are_named_for_people() {
        assert_eq!(PartRef::segment(2, 10).label(), "segment 3/10");
        assert_eq!(PartRef::audio(10).label(), "audio");
    }
}
