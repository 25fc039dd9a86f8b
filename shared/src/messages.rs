//! Job messages: the JSON contract between the producer and the workers.
//!
//! One upload is one `job_id` with one message per task. A message names storage keys,
//! never host paths and never bytes of video. Every message carries an explicit `schema`
//! version; anything that fails to parse or validate is *poison* and goes straight to the
//! dead-letter queue (see [`crate::outcome`]).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::split::{FanIn, Inputs, PartRef};
use crate::storage_key::StorageKey;
use crate::tasks::{self, TaskKind};

/// The only message schema this build understands.
pub const SCHEMA_VERSION: u32 = 1;

/// Messages larger than this are poison: a job description is a few hundred bytes, so a
/// megabyte is either a bug or an attack.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Why a message cannot be processed at all. Always permanent: it goes to the dead letters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PoisonError {
    #[error("message is {0} bytes, the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("message is not valid JSON for a {task} job: {detail}")]
    Malformed { task: &'static str, detail: String },
    #[error("message has schema {found}, this worker understands schema {SCHEMA_VERSION}")]
    UnknownSchema { found: u64 },
    #[error("message is for task `{found}` but arrived on the `{expected}` queue")]
    WrongTask {
        expected: &'static str,
        found: String,
    },
    #[error("invalid job: {0}")]
    Invalid(String),
}

/// What every job message has in common; the worker runtime is generic over it.
pub trait JobMessage: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The task kind this message is for, from the [`tasks`] registry.
    const KIND: TaskKind;
    /// The task name: routing key, queue suffix and `task` field (the kind's name).
    const TASK: &'static str = Self::KIND.name;
    fn job_id(&self) -> Uuid;
    /// Storage key of the input video.
    fn source(&self) -> &StorageKey;
    /// Storage prefix (ending in `/`) that every output and the manifest go under.
    fn output_prefix(&self) -> &StorageKey;
    /// Range checks beyond what the types already enforce.
    fn validate(&self) -> Result<(), String>;

    // Split jobs (see [`crate::split`]). A job that is not part of a split keeps these
    // defaults: it reads its source and commits under its output prefix.

    /// Where this job's outputs and manifest are committed: the output prefix, or a
    /// part's own folder under it.
    fn commit_prefix(&self) -> StorageKey {
        self.output_prefix().clone()
    }
    /// Which part of a split task this job is (for events and dead letters).
    fn part(&self) -> Option<PartRef> {
        None
    }
    /// What this job reads: its source, or the committed outputs of other parts.
    fn inputs(&self) -> Inputs {
        Inputs::Source
    }
    /// For a part: the parts that must all be committed before `then` is published.
    fn fan_in(&self) -> Option<FanIn<Self>>
    where
        Self: Sized,
    {
        None
    }
}

/// Parses and validates a message body. Any failure is poison.
pub fn parse<J: JobMessage>(body: &[u8]) -> Result<J, PoisonError> {
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(PoisonError::TooLarge(body.len()));
    }
    let job = match parse_direct::<J>(body) {
        Some(job) => job,
        None => parse_checked::<J>(body)?,
    };
    if !job.output_prefix().as_str().ends_with('/') {
        return Err(PoisonError::Invalid(
            "`output_prefix` must end with `/`".into(),
        ));
    }
    // Outputs belong to their job: a message cannot aim its outputs (or its "already done"
    // check) at another job's folder. Anything may come before, e.g. a tenant's folder.
    let own = format!("{}/{}/", job.job_id(), J::TASK);
    let prefix = job.output_prefix().as_str();
    if !(prefix == own || prefix.ends_with(&format!("/{own}"))) {
        return Err(PoisonError::Invalid(format!(
            "`output_prefix` `{prefix}` must end with this job's `{own}`"
        )));
    }
    job.validate().map_err(PoisonError::Invalid)?;
    Ok(job)
}

/// The usual message in one pass over its bytes: a JSON object with this build's `schema`
/// and this queue's `task`, read straight into the job. `None` for anything else, which
/// [`parse_checked`] then reads and explains; whatever this accepts, that accepts as the
/// same job (a test holds the two to it), so it only makes the common case cheaper.
/// Going through a `serde_json::Value` first, as [`parse_checked`] does, took about 16 µs
/// of worker CPU a job in a profile of the dispatch benchmark.
fn parse_direct<J: JobMessage>(body: &[u8]) -> Option<J> {
    /// Just the two fields the job's own type may not know (a struct ignores the rest).
    #[derive(Deserialize)]
    struct Envelope<'a> {
        schema: u64,
        #[serde(borrow)]
        task: std::borrow::Cow<'a, str>,
    }
    // Only an object. A struct also reads a JSON array by position, which
    // `parse_checked` refuses; no array can pass both readings below (two elements for
    // the envelope, the job's fields for the job), but this says the rule outright.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let envelope: Envelope = serde_json::from_slice(body).ok()?;
    if envelope.schema != u64::from(SCHEMA_VERSION) || envelope.task != J::TASK {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// [`parse`]'s reading of a body [`parse_direct`] did not take: `schema` and `task` are
/// looked at first so the error says the useful thing, not "missing field renditions"
/// for a message from a future producer.
fn parse_checked<J: JobMessage>(body: &[u8]) -> Result<J, PoisonError> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| PoisonError::Malformed {
            task: J::TASK,
            detail: e.to_string(),
        })?;
    match value.get("schema").and_then(serde_json::Value::as_u64) {
        Some(v) if v == u64::from(SCHEMA_VERSION) => {}
        Some(found) => return Err(PoisonError::UnknownSchema { found }),
        None => {
            return Err(PoisonError::Malformed {
                task: J::TASK,
                detail: "missing or non-numeric `schema`".into(),
            });
        }
    }
    match value.get("task").and_then(serde_json::Value::as_str) {
        Some(t) if t == J::TASK => {}
        Some(t) => {
            return Err(PoisonError::WrongTask {
                expected: J::TASK,
                found: t.to_owned(),
            });
        }
        None => {
            return Err(PoisonError::Malformed {
                task: J::TASK,
                detail: "missing `task`".into(),
            });
        }
    }
    serde_json::from_value(value).map_err(|e| PoisonError::Malformed {
        task: J::TASK,
        detail: e.to_string(),
    })
}

/// Serialises a job for publishing (the producer and tests use this).
pub fn to_body<J: JobMessage>(job: &J) -> Vec<u8> {
    let mut value = serde_json::to_value(job).expect("job types always serialise");
    if let Some(map) = value.as_object_mut() {
        map.insert("schema".into(), SCHEMA_VERSION.into());
        map.insert("task".into(), J::TASK.into());
    }
    serde_json::to_vec(&value).expect("a JSON value always serialises")
}

// ---------------------------------------------------------------------------------------
// Transcode
// ---------------------------------------------------------------------------------------

/// One output rendition of the ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rendition {
    /// Short name used in output file names, e.g. `720p`.
    pub name: String,
    /// Output height in pixels; width follows the source aspect ratio (rounded to even).
    pub height: u32,
    /// Video bitrate cap in kbit/s (CRF is the target, this caps peaks).
    pub video_kbps: u32,
    /// AAC bitrate in kbit/s.
    pub audio_kbps: u32,
}

/// A named rung of the rendition ladder. Its `height` is the picture's short side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rung {
    pub name: &'static str,
    pub height: u32,
    /// Video bitrate cap, kbit/s.
    pub video_kbps: u32,
    /// AAC bitrate, kbit/s.
    pub audio_kbps: u32,
}

impl Rung {
    /// The rung as a job's rendition.
    pub fn rendition(&self) -> Rendition {
        Rendition {
            name: self.name.into(),
            height: self.height,
            video_kbps: self.video_kbps,
            audio_kbps: self.audio_kbps,
        }
    }
}

/// Every named rung, best first: the presets `producer upload --renditions` accepts by
/// name. One table, so a preset and the default rung of the same name never disagree.
pub const RUNGS: [Rung; 5] = [
    Rung {
        name: "1080p",
        height: 1080,
        video_kbps: 5000,
        audio_kbps: 128,
    },
    Rung {
        name: "720p",
        height: 720,
        video_kbps: 2800,
        audio_kbps: 128,
    },
    Rung {
        name: "480p",
        height: 480,
        video_kbps: 1400,
        audio_kbps: 96,
    },
    Rung {
        name: "360p",
        height: 360,
        video_kbps: 800,
        audio_kbps: 96,
    },
    Rung {
        name: "240p",
        height: 240,
        video_kbps: 400,
        audio_kbps: 64,
    },
];

/// The default ladder (a transcode job with no `renditions`): the rungs down to 360p.
/// 240p is a preset only: below 360p a default rendition is made at the source's own size.
pub const DEFAULT_LADDER: &[Rung] = RUNGS.split_at(4).0;

/// Container formats the transcoder can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    /// Progressive MP4 with the index at the front (`faststart`).
    Mp4,
    /// HLS: master playlist, one media playlist per rendition, MPEG-TS segments.
    Hls,
    /// CMAF: fragmented-MP4 segments written once per rendition (audio as a rendition of
    /// its own), referenced by both an HLS master (`EXT-X-MAP`) and a DASH MPD.
    Cmaf,
}

fn default_formats() -> Vec<OutputFormat> {
    vec![OutputFormat::Mp4, OutputFormat::Hls]
}

/// Video codecs the transcoder can encode: each one asked for is a ladder of its own,
/// encoded from the same single decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VideoCodec {
    /// H.264 (libx264): every format, every player.
    H264,
    /// HEVC (libx265, tagged `hvc1` so Apple's players take it): MP4 and CMAF only.
    Hevc,
    /// AV1 (SVT-AV1): MP4 and CMAF only.
    Av1,
}

impl VideoCodec {
    /// Every codec, in the order the names are listed to users.
    pub const ALL: [VideoCodec; 3] = [VideoCodec::H264, VideoCodec::Hevc, VideoCodec::Av1];

    /// The name jobs and `producer upload --codecs` use.
    pub fn name(self) -> &'static str {
        match self {
            VideoCodec::H264 => "h264",
            VideoCodec::Hevc => "hevc",
            VideoCodec::Av1 => "av1",
        }
    }

    /// The codec called `name` (case-insensitive), if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|c| c.name().eq_ignore_ascii_case(name.trim()))
    }
}

fn default_codecs() -> Vec<VideoCodec> {
    vec![VideoCodec::H264]
}

/// `task = "transcode"`: turn the source into a rendition ladder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscodeJob {
    pub job_id: Uuid,
    pub source: StorageKey,
    pub output_prefix: StorageKey,
    /// Empty means "derive the default ladder from the source" (never upscaling).
    #[serde(default)]
    pub renditions: Vec<Rendition>,
    #[serde(default = "default_formats")]
    pub formats: Vec<OutputFormat>,
    /// Video codecs, each its own ladder (`producer upload --codecs`); absent means
    /// H.264 only, as before the field existed.
    #[serde(default = "default_codecs")]
    pub codecs: Vec<VideoCodec>,
    /// Whether a long source may be split into segments encoded by many workers
    /// (`producer upload --segments`).
    #[serde(default)]
    pub segments: Segmenting,
    /// `fixed` (the default ladder's CRF and caps) or `auto` (fitted to the content by a
    /// quick probe, `producer upload --ladder`).
    #[serde(default)]
    pub ladder: LadderMode,
    /// Set on the jobs a split transcode fans out into (segments, audio, stitch);
    /// absent on the job the producer publishes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub part: Option<TranscodePart>,
}

/// `producer upload --segments`: split a long transcode over many workers (`auto`, when
/// the source is longer than `transcoder.segment_threshold_secs`) or never (`off`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Segmenting {
    #[default]
    Auto,
    Off,
}

/// `producer upload --ladder`: every rendition at the transcoder's CRF with its rung's
/// cap (`fixed`), or each rung's CRF and cap chosen by a quick probe of the source, rungs
/// that add nothing dropped (`auto`). Anything else is poison.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LadderMode {
    #[default]
    Fixed,
    Auto,
}

/// One rendition as the planning worker sized it: every part of a split transcode
/// encodes exactly this ladder, whatever its own worker would have planned.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannedRendition {
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub video_kbps: u32,
    pub audio_kbps: u32,
    /// The CRF a fitted ladder (`ladder: auto`) chose for this rendition; absent, the
    /// transcoder's own `crf`. `video_kbps` is then the fitted cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crf: Option<u8>,
}

/// Which part of a split transcode a job is. See [`crate::split`] and the README's
/// "Segment-parallel transcoding".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscodePart {
    /// The plan's id (16 hex digits, a digest of ranges, ladder and encoder settings):
    /// parts live under `parts/<plan>/`, so two different plans of one job never mix.
    pub plan: String,
    /// Segments in the plan.
    pub segments: u32,
    /// Whether the plan has an audio part (the source has sound).
    pub audio: bool,
    /// The ladder every part encodes.
    pub ladder: Vec<PlannedRendition>,
    /// What the planner's probe measured and chose for a fitted ladder (`ladder: auto`):
    /// only copied into the task's manifest by the stitch, never read to encode (each
    /// rendition's `crf` and `video_kbps` are what the parts encode with).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<serde_json::Value>,
    /// `"stage": "segment"` and its fields, beside the others.
    #[serde(flatten)]
    pub stage: Stage,
}

/// What one part does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "stage", rename_all = "snake_case")]
pub enum Stage {
    /// Encode the video frames whose output time is in `[start_s, end_s)` (to the end
    /// when `end_s` is absent): exactly `frames` of them.
    Segment {
        index: u32,
        start_s: f64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end_s: Option<f64>,
        frames: u64,
    },
    /// Encode the whole audio, once.
    Audio,
    /// Join the committed parts into the task's outputs.
    Stitch,
}

/// The CRFs a fitted ladder may choose (and a part message may carry): below 10 x264
/// spends bits nobody sees, above 45 the picture falls apart.
pub const MIN_FITTED_CRF: u8 = 10;
pub const MAX_FITTED_CRF: u8 = 45;

/// At most this many segments in one plan: a two-hour source in 30-second segments is
/// 240; the cap keeps a hostile plan from fanning out without bound.
pub const MAX_SEGMENTS: u32 = 4096;

impl TranscodePart {
    /// `parts/<plan>/` under the task's output prefix.
    fn folder(&self, output_prefix: &StorageKey) -> StorageKey {
        output_prefix
            .join(&format!("parts/{}/", self.plan))
            .expect("a validated plan id is a safe key segment")
    }

    /// Where part `stage` commits.
    fn prefix_of(&self, output_prefix: &StorageKey, stage: &Stage) -> Option<StorageKey> {
        let name = match stage {
            Stage::Segment { index, .. } => format!("seg-{index:05}/"),
            Stage::Audio => "audio/".to_owned(),
            Stage::Stitch => return None,
        };
        Some(
            self.folder(output_prefix)
                .join(&name)
                .expect("a part folder name is a safe key segment"),
        )
    }

    /// Commit prefixes of every part a stitch joins, in order: the segments, then audio.
    pub fn part_prefixes(&self, output_prefix: &StorageKey) -> Vec<StorageKey> {
        let mut prefixes: Vec<StorageKey> = (0..self.segments)
            .map(|index| {
                let stage = Stage::Segment {
                    index,
                    start_s: 0.0,
                    end_s: None,
                    frames: 0,
                };
                self.prefix_of(output_prefix, &stage)
                    .expect("a segment has a prefix")
            })
            .collect();
        if self.audio {
            prefixes.push(
                self.prefix_of(output_prefix, &Stage::Audio)
                    .expect("audio has a prefix"),
            );
        }
        prefixes
    }

    fn validate(&self) -> Result<(), String> {
        if self.plan.len() != 16
            || !self
                .plan
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err("`part.plan` must be 16 lowercase hex digits".into());
        }
        if !(1..=MAX_SEGMENTS).contains(&self.segments) {
            return Err(format!(
                "`part.segments` {} is outside 1..={MAX_SEGMENTS}",
                self.segments
            ));
        }
        if self.ladder.is_empty() || self.ladder.len() > 8 {
            return Err("`part.ladder` must have 1 to 8 renditions".into());
        }
        for r in &self.ladder {
            if !valid_name(&r.name) {
                return Err(format!(
                    "ladder rendition name `{}` is not a safe file name",
                    r.name
                ));
            }
            if !(2..=8192).contains(&r.width)
                || !(2..=8192).contains(&r.height)
                || r.width % 2 == 1
                || r.height % 2 == 1
            {
                return Err(format!(
                    "ladder rendition `{}` size {}x{} is not even and within 2..=8192",
                    r.name, r.width, r.height
                ));
            }
            if !(50..=100_000).contains(&r.video_kbps) || !(16..=512).contains(&r.audio_kbps) {
                return Err(format!(
                    "ladder rendition `{}` bit rates are out of range",
                    r.name
                ));
            }
            if r.crf
                .is_some_and(|crf| !(MIN_FITTED_CRF..=MAX_FITTED_CRF).contains(&crf))
            {
                return Err(format!(
                    "ladder rendition `{}` crf is outside {MIN_FITTED_CRF}..={MAX_FITTED_CRF}",
                    r.name
                ));
            }
        }
        if let Stage::Segment {
            index,
            start_s,
            end_s,
            frames,
        } = &self.stage
        {
            if *index >= self.segments {
                return Err(format!(
                    "segment index {index} is not below {}",
                    self.segments
                ));
            }
            if !start_s.is_finite()
                || *start_s < 0.0
                || end_s.is_some_and(|e| !e.is_finite() || e <= *start_s)
            {
                return Err("segment range must be finite, from 0, and end after it starts".into());
            }
            if *frames == 0 {
                return Err("a segment plans at least one frame".into());
            }
        }
        if self.fit.as_ref().is_some_and(|f| !f.is_object()) {
            return Err("`part.fit` must be an object".into());
        }
        if matches!(self.stage, Stage::Audio) && !self.audio {
            return Err("an audio part of a plan without audio".into());
        }
        Ok(())
    }
}

/// The codecs of a transcode job against its formats: each codec once, and every format
/// able to carry at least one of them (MPEG-TS HLS carries H.264 only).
fn validate_codecs(codecs: &[VideoCodec], formats: &[OutputFormat]) -> Result<(), String> {
    let known = VideoCodec::ALL.map(VideoCodec::name).join(", ");
    if codecs.is_empty() {
        return Err(format!("`codecs` is empty: ask for one or more of {known}"));
    }
    let unique: std::collections::HashSet<_> = codecs.iter().collect();
    if unique.len() != codecs.len() {
        return Err(format!(
            "`codecs` names a codec twice: ask for each of {known} once"
        ));
    }
    let extra: Vec<&str> = codecs
        .iter()
        .filter(|c| **c != VideoCodec::H264)
        .map(|c| c.name())
        .collect();
    let fmp4 = formats
        .iter()
        .any(|f| matches!(f, OutputFormat::Mp4 | OutputFormat::Cmaf));
    if !extra.is_empty() && !fmp4 {
        return Err(format!(
            "{} can only be written as mp4 or cmaf (hls is MPEG-TS, which carries H.264 only): \
             add mp4 or cmaf to `formats`",
            extra.join(" and ")
        ));
    }
    if formats.contains(&OutputFormat::Hls) && !codecs.contains(&VideoCodec::H264) {
        return Err(
            "`formats` has hls (MPEG-TS), which carries H.264 only: add h264 to `codecs` or \
             drop hls"
                .into(),
        );
    }
    Ok(())
}

/// Rendition names become file names, so keep them to a safe alphabet.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl JobMessage for TranscodeJob {
    const KIND: TaskKind = tasks::TRANSCODE;
    fn job_id(&self) -> Uuid {
        self.job_id
    }
    fn source(&self) -> &StorageKey {
        &self.source
    }
    fn output_prefix(&self) -> &StorageKey {
        &self.output_prefix
    }
    fn commit_prefix(&self) -> StorageKey {
        self.part
            .as_ref()
            .and_then(|p| p.prefix_of(&self.output_prefix, &p.stage))
            .unwrap_or_else(|| self.output_prefix.clone())
    }
    fn part(&self) -> Option<PartRef> {
        let part = self.part.as_ref()?;
        Some(match &part.stage {
            Stage::Segment { index, .. } => PartRef::segment(*index, part.segments),
            Stage::Audio => PartRef::audio(part.segments),
            Stage::Stitch => return None,
        })
    }
    fn inputs(&self) -> Inputs {
        match &self.part {
            Some(p) if p.stage == Stage::Stitch => {
                Inputs::Parts(p.part_prefixes(&self.output_prefix))
            }
            _ => Inputs::Source,
        }
    }
    fn fan_in(&self) -> Option<FanIn<Self>> {
        let part = self.part.as_ref()?;
        if part.stage == Stage::Stitch {
            return None;
        }
        let mut then = self.clone();
        then.part = Some(TranscodePart {
            stage: Stage::Stitch,
            ..part.clone()
        });
        Some(FanIn {
            awaits: part.part_prefixes(&self.output_prefix),
            then,
        })
    }
    fn validate(&self) -> Result<(), String> {
        if let Some(part) = &self.part {
            part.validate()?;
        }
        if self.renditions.len() > 8 {
            return Err(format!(
                "{} renditions requested, at most 8",
                self.renditions.len()
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for r in &self.renditions {
            if !valid_name(&r.name) {
                return Err(format!(
                    "rendition name `{}` must be 1-32 characters of a-z, 0-9, `_`, `-`",
                    r.name
                ));
            }
            if !seen.insert(r.name.as_str()) {
                return Err(format!("rendition name `{}` appears twice", r.name));
            }
            if !(16..=4320).contains(&r.height) {
                return Err(format!(
                    "rendition `{}` height {} is outside 16..=4320",
                    r.name, r.height
                ));
            }
            if !(50..=100_000).contains(&r.video_kbps) {
                return Err(format!(
                    "rendition `{}` video_kbps {} is outside 50..=100000",
                    r.name, r.video_kbps
                ));
            }
            if !(16..=512).contains(&r.audio_kbps) {
                return Err(format!(
                    "rendition `{}` audio_kbps {} is outside 16..=512",
                    r.name, r.audio_kbps
                ));
            }
        }
        if self.formats.is_empty() {
            return Err("`formats` is empty: ask for one or more of mp4, hls, cmaf".into());
        }
        let unique: std::collections::HashSet<_> = self.formats.iter().collect();
        if unique.len() != self.formats.len() {
            return Err(
                "`formats` names a format twice: ask for each of mp4, hls, cmaf once".into(),
            );
        }
        validate_codecs(&self.codecs, &self.formats)?;
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Thumbnail
// ---------------------------------------------------------------------------------------

/// Image formats the thumbnailer can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    Jpeg,
    Png,
    Webp,
}

impl ImageFormat {
    /// File extension, without the dot.
    pub fn extension(self) -> &'static str {
        match self {
            ImageFormat::Jpeg => "jpg",
            ImageFormat::Png => "png",
            ImageFormat::Webp => "webp",
        }
    }
}

/// Sprite sheet for hover-scrubbing, with a WebVTT track pointing into it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpriteSpec {
    /// One tile every this many seconds.
    pub interval_s: f64,
    /// Tiles per row.
    pub columns: u32,
    /// Tile width in pixels; height follows the display aspect ratio.
    pub width: u32,
    /// Decode keyframes only (much faster on long videos, tiles snap to keyframes).
    #[serde(default)]
    pub keyframes_only: bool,
}

fn default_true() -> bool {
    true
}
fn default_count() -> u32 {
    10
}
fn default_width() -> u32 {
    320
}
fn default_quality() -> u8 {
    85
}
fn default_image_format() -> ImageFormat {
    ImageFormat::Jpeg
}

/// `task = "thumbnail"`: poster, thumbnails and an optional sprite sheet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThumbnailJob {
    pub job_id: Uuid,
    pub source: StorageKey,
    pub output_prefix: StorageKey,
    /// Write `poster.<ext>`: a representative (non-black) frame.
    #[serde(default = "default_true")]
    pub poster: bool,
    /// Evenly spaced thumbnails; ignored when `timestamps` is given.
    #[serde(default = "default_count")]
    pub count: u32,
    /// Explicit thumbnail times in seconds.
    #[serde(default)]
    pub timestamps: Vec<f64>,
    /// Thumbnail and poster width in pixels.
    #[serde(default = "default_width")]
    pub width: u32,
    #[serde(default = "default_image_format")]
    pub format: ImageFormat,
    /// Encoder quality 1-100 (JPEG and WebP).
    #[serde(default = "default_quality")]
    pub quality: u8,
    #[serde(default)]
    pub sprite: Option<SpriteSpec>,
}

impl JobMessage for ThumbnailJob {
    const KIND: TaskKind = tasks::THUMBNAIL;
    fn job_id(&self) -> Uuid {
        self.job_id
    }
    fn source(&self) -> &StorageKey {
        &self.source
    }
    fn output_prefix(&self) -> &StorageKey {
        &self.output_prefix
    }
    fn validate(&self) -> Result<(), String> {
        if self.count > 1000 {
            return Err(format!("count {} is over the limit of 1000", self.count));
        }
        if self.timestamps.len() > 1000 {
            return Err(format!(
                "{} timestamps given, at most 1000",
                self.timestamps.len()
            ));
        }
        if let Some(t) = self.timestamps.iter().find(|t| !t.is_finite() || **t < 0.0) {
            return Err(format!(
                "timestamp {t} is not a non-negative number of seconds"
            ));
        }
        if !(16..=3840).contains(&self.width) {
            return Err(format!("width {} is outside 16..=3840", self.width));
        }
        if !(1..=100).contains(&self.quality) {
            return Err(format!("quality {} is outside 1..=100", self.quality));
        }
        if let Some(s) = &self.sprite {
            if !s.interval_s.is_finite() || s.interval_s < 0.1 {
                return Err(format!(
                    "sprite interval_s {} must be at least 0.1",
                    s.interval_s
                ));
            }
            if !(1..=50).contains(&s.columns) {
                return Err(format!("sprite columns {} is outside 1..=50", s.columns));
            }
            if !(16..=1024).contains(&s.width) {
                return Err(format!("sprite width {} is outside 16..=1024", s.width));
            }
        }
        if !self.poster && self.count == 0 && self.timestamps.is_empty() && self.sprite.is_none() {
            return Err("the job asks for no output at all".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The transcoder's default ladder as it has always been (1080p audio 128 kbit/s);
    /// the producer's presets are the same table, so they agree by construction.
    #[test]
    fn the_default_ladder_is_1080p_to_360p() {
        let ladder: Vec<(&str, u32, u32, u32)> = DEFAULT_LADDER
            .iter()
            .map(|r| (r.name, r.height, r.video_kbps, r.audio_kbps))
            .collect();
        assert_eq!(
            ladder,
            [
                ("1080p", 1080, 5000, 128),
                ("720p", 720, 2800, 128),
                ("480p", 480, 1400, 96),
                ("360p", 360, 800, 96),
            ]
        );
        assert_eq!(RUNGS[4].rendition().name, "240p");
    }

    fn transcode_json(extra: &str) -> String {
        format!(
            r#"{{"schema":1,"task":"transcode","job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
               "source":"uploads/x/source.mp4","output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/"{extra}}}"#
        )
    }

    fn part_json(part: &str) -> String {
        part_json_of("0123456789abcdef", part)
    }

    fn part_json_of(plan: &str, part: &str) -> String {
        transcode_json(&format!(
            r#","part":{{"plan":"{plan}","segments":4,"audio":true,
                "ladder":[{{"name":"240p","width":320,"height":240,"video_kbps":600,"audio_kbps":64}}],
                {part}}}"#
        ))
    }

    #[test]
    fn parts_commit_under_their_plan_and_fan_in_to_one_stitch() {
        let seg: TranscodeJob = parse(
            part_json(r#""stage":"segment","index":2,"start_s":4.0,"end_s":6.0,"frames":50"#)
                .as_bytes(),
        )
        .unwrap();
        let base = "outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/";
        assert_eq!(
            seg.commit_prefix().as_str(),
            format!("{base}parts/0123456789abcdef/seg-00002/")
        );
        assert_eq!(seg.part().unwrap().label(), "segment 3/4");
        let fan_in = seg.fan_in().unwrap();
        assert_eq!(fan_in.awaits.len(), 5, "four segments and the audio");
        assert_eq!(
            fan_in.awaits[4].as_str(),
            format!("{base}parts/0123456789abcdef/audio/")
        );
        let stitch = fan_in.then;
        assert_eq!(
            stitch.commit_prefix().as_str(),
            base,
            "the stitch commits the task"
        );
        assert!(stitch.fan_in().is_none() && stitch.part().is_none());
        assert_eq!(stitch.inputs(), Inputs::Parts(fan_in.awaits));
        // A job that is not a part reads its source and commits its task.
        let whole: TranscodeJob = parse(transcode_json("").as_bytes()).unwrap();
        assert_eq!(
            (whole.inputs(), whole.commit_prefix().as_str()),
            (Inputs::Source, base)
        );
    }

    #[test]
    fn hostile_parts_are_poison() {
        let segment = |fields: &str| format!(r#""stage":"segment",{fields}"#);
        for (body, why) in [
            (
                part_json_of("../../../../etc/", r#""stage":"audio""#),
                "plan",
            ),
            (
                part_json(&segment(r#""index":4,"start_s":0.0,"frames":1"#)),
                "index",
            ),
            (
                part_json(&segment(r#""index":0,"start_s":-1.0,"frames":1"#)),
                "range",
            ),
            (
                part_json(&segment(
                    r#""index":0,"start_s":3.0,"end_s":2.0,"frames":1"#,
                )),
                "range",
            ),
            (
                part_json(&segment(r#""index":0,"start_s":0.0,"frames":0"#)),
                "frame",
            ),
            (
                part_json(r#""stage":"stitch""#).replace(r#""segments":4"#, r#""segments":100000"#),
                "segments",
            ),
        ] {
            let err = parse::<TranscodeJob>(body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(why), "{body}: {err}");
        }
    }

    /// Whatever the one-pass reading accepts, the checked reading accepts as the same job:
    /// the well-formed seeds, every one-byte deletion and substitution of them, and the
    /// shapes a struct reads differently from a map (arrays, duplicate keys, numbers in
    /// other forms). So the fast path can only ever make `parse` cheaper, not different.
    #[test]
    fn the_one_pass_reading_takes_nothing_the_checked_reading_reads_otherwise() {
        fn agrees<J: JobMessage + PartialEq + std::fmt::Debug>(body: &[u8]) -> bool {
            let Some(direct) = parse_direct::<J>(body) else {
                return false;
            };
            let checked = parse_checked::<J>(body);
            assert_eq!(
                checked.as_ref(),
                Ok(&direct),
                "{}",
                String::from_utf8_lossy(body)
            );
            true
        }
        let thumbnail = r#"{"schema":1,"task":"thumbnail","job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
            "source":"uploads/x/source.mp4","output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/thumbnail/",
            "count":3,"width":160}"#;
        let seeds = [
            transcode_json(""),
            part_json(r#""stage":"segment","index":2,"start_s":4.0,"end_s":6.0,"frames":50"#),
            thumbnail.to_owned(),
        ];
        let mut taken = 0;
        for seed in &seeds {
            let seed = seed.as_bytes();
            assert!(
                agrees::<TranscodeJob>(seed) || agrees::<ThumbnailJob>(seed),
                "a well-formed message takes the one-pass reading"
            );
            for i in 0..seed.len() {
                let mut deleted = seed.to_vec();
                deleted.remove(i);
                let mut variants = vec![deleted];
                for b in [b'"', b'0', b'2', b'x', b'{', b',', b'[', b' ', b'.'] {
                    let mut replaced = seed.to_vec();
                    replaced[i] = b;
                    variants.push(replaced);
                }
                for body in variants {
                    taken += usize::from(agrees::<TranscodeJob>(&body));
                    taken += usize::from(agrees::<ThumbnailJob>(&body));
                }
            }
        }
        assert!(taken > 0, "some variants are still well-formed");
        let job = r#""job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e","source":"uploads/x/source.mp4","output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/""#;
        for body in [
            r#"[1,"transcode","6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e","a","b/"]"#.to_owned(),
            format!(r#"{{"schema":1,"schema":2,"task":"transcode",{job}}}"#),
            format!(r#"{{"schema":2,"schema":1,"task":"transcode",{job}}}"#),
            format!(r#"{{"schema":1,"task":"thumbnail","task":"transcode",{job}}}"#),
            format!(r#"{{"schema":1,"task":"transcode",{job},"source":"uploads/y"}}"#),
            format!(r#"{{"schema":2,"task":"transcode",{job}}}"#),
            format!(r#"{{"schema":1,"task":"thumbnail",{job}}}"#),
            format!(r#"{{"schema":1.0,"task":"transcode",{job}}}"#),
            format!(r#"{{"schema":"1","task":"transcode",{job}}}"#),
            format!(r#"{{"schema":1,"task":"trans\u0063ode",{job}}}"#),
            format!(r#"  {{"schema":1,"task":"transcode",{job}}} "#),
            format!(r#"{{"schema":1,"task":"transcode",{job}}}x"#),
        ] {
            agrees::<TranscodeJob>(body.as_bytes());
        }
    }

    #[test]
    fn transcode_round_trips_with_defaults() {
        let job: TranscodeJob = parse(transcode_json("").as_bytes()).unwrap();
        assert_eq!(job.formats, vec![OutputFormat::Mp4, OutputFormat::Hls]);
        assert!(job.renditions.is_empty());
        let again: TranscodeJob = parse(&to_body(&job)).unwrap();
        assert_eq!(job, again);
    }

    #[test]
    fn thumbnail_round_trips_with_defaults() {
        let body = r#"{"schema":1,"task":"thumbnail","job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
            "source":"uploads/x/source.mp4","output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/thumbnail/",
            "sprite":{"interval_s":2,"columns":10,"width":160}}"#;
        let job: ThumbnailJob = parse(body.as_bytes()).unwrap();
        assert!(job.poster);
        assert_eq!(
            (job.count, job.width, job.format),
            (10, 320, ImageFormat::Jpeg)
        );
        let again: ThumbnailJob = parse(&to_body(&job)).unwrap();
        assert_eq!(job, again);
    }

    #[test]
    fn fractional_timestamps_survive_the_round_trip_exactly() {
        // Found by the `parse_message` fuzz target: without serde_json's
        // `float_roundtrip`, some times came back one unit in the last place off.
        let body = r#"{"schema":1,"task":"thumbnail","job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
            "source":"uploads/x/source.mp4","output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/thumbnail/",
            "timestamps":[13479.531075614921, 1e-42, 3.12]}"#;
        let job: ThumbnailJob = parse(body.as_bytes()).unwrap();
        let again: ThumbnailJob = parse(&to_body(&job)).unwrap();
        assert_eq!(job.timestamps, again.timestamps);
    }

    #[test]
    fn outputs_must_go_under_the_jobs_own_folder() {
        let other = transcode_json("").replace(
            "outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/",
            "outputs/0e0e0e0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/",
        );
        let err = parse::<TranscodeJob>(other.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("must end with this job's"),
            "{err}"
        );
        let tenant =
            transcode_json("").replace("outputs/6f1c1f0e", "tenants/acme/outputs/6f1c1f0e");
        assert!(parse::<TranscodeJob>(tenant.as_bytes()).is_ok());
        let wrong_task = transcode_json("").replace("/transcode/", "/thumbnail/");
        assert!(parse::<TranscodeJob>(wrong_task.as_bytes()).is_err());
    }

    #[test]
    fn invalid_json_is_poison() {
        assert!(matches!(
            parse::<TranscodeJob>(b"{not json"),
            Err(PoisonError::Malformed { .. })
        ));
    }

    #[test]
    fn unknown_schema_is_poison() {
        let body = transcode_json("").replace(r#""schema":1"#, r#""schema":7"#);
        assert_eq!(
            parse::<TranscodeJob>(body.as_bytes()),
            Err(PoisonError::UnknownSchema { found: 7 })
        );
    }

    #[test]
    fn wrong_task_is_poison() {
        let body = transcode_json("").replace(r#""task":"transcode""#, r#""task":"thumbnail""#);
        assert!(matches!(
            parse::<TranscodeJob>(body.as_bytes()),
            Err(PoisonError::WrongTask { .. })
        ));
    }

    #[test]
    fn traversal_in_key_is_poison() {
        let body = transcode_json("").replace("uploads/x/source.mp4", "uploads/../../etc/passwd");
        assert!(matches!(
            parse::<TranscodeJob>(body.as_bytes()),
            Err(PoisonError::Malformed { .. })
        ));
    }

    #[test]
    fn oversized_message_is_poison() {
        let body = vec![b' '; MAX_MESSAGE_BYTES + 1];
        assert!(matches!(
            parse::<TranscodeJob>(&body),
            Err(PoisonError::TooLarge(_))
        ));
    }

    #[test]
    fn out_of_range_rendition_is_poison() {
        let body = transcode_json(
            r#","renditions":[{"name":"huge","height":9000,"video_kbps":1000,"audio_kbps":128}]"#,
        );
        let err = parse::<TranscodeJob>(body.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("height 9000"), "{err}");
    }

    #[test]
    fn ladder_mode_defaults_to_fixed_and_a_misspelling_is_poison() {
        let job: TranscodeJob = parse(transcode_json("").as_bytes()).unwrap();
        assert_eq!(
            job.ladder,
            LadderMode::Fixed,
            "old messages keep the fixed ladder"
        );
        let auto: TranscodeJob = parse(transcode_json(r#","ladder":"auto""#).as_bytes()).unwrap();
        assert_eq!(auto.ladder, LadderMode::Auto);
        assert_eq!(parse::<TranscodeJob>(&to_body(&auto)).unwrap(), auto);
        let err = parse::<TranscodeJob>(transcode_json(r#","ladder":"autp""#).as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown variant `autp`"), "{err}");
        assert!(err.contains("`fixed`") && err.contains("`auto`"), "{err}");
    }

    #[test]
    fn a_part_with_a_crf_out_of_range_is_poison() {
        let with_crf = |crf: u32| {
            part_json(r#""stage":"audio""#).replace(
                r#""audio_kbps":64}"#,
                &format!(r#""audio_kbps":64,"crf":{crf}}}"#),
            )
        };
        let ok: TranscodeJob = parse(with_crf(28).as_bytes()).unwrap();
        assert_eq!(ok.part.unwrap().ladder[0].crf, Some(28));
        for crf in [0, 60] {
            let err = parse::<TranscodeJob>(with_crf(crf).as_bytes()).unwrap_err();
            assert!(err.to_string().contains("crf"), "{crf}: {err}");
        }
    }

    #[test]
    fn codecs_default_to_h264_and_are_checked_against_the_formats() {
        let job = parse::<TranscodeJob>(transcode_json("").as_bytes()).unwrap();
        assert_eq!(job.codecs, [VideoCodec::H264]);
        let job = parse::<TranscodeJob>(
            transcode_json(r#","formats":["cmaf","hls"],"codecs":["h264","hevc","av1"]"#)
                .as_bytes(),
        )
        .unwrap();
        assert_eq!(job.formats, [OutputFormat::Cmaf, OutputFormat::Hls]);
        assert_eq!(job.codecs, VideoCodec::ALL);
        for (extra, problem) in [
            (r#","codecs":["vp9"]"#, "unknown variant"),
            (r#","codecs":[]"#, "`codecs` is empty"),
            (r#","codecs":["av1","av1"]"#, "twice"),
            (
                r#","formats":["hls"],"codecs":["h264","hevc"]"#,
                "hevc can only be written as mp4 or cmaf",
            ),
            (
                r#","formats":["hls","mp4"],"codecs":["av1"]"#,
                "add h264 to `codecs`",
            ),
        ] {
            let err = parse::<TranscodeJob>(transcode_json(extra).as_bytes()).unwrap_err();
            assert!(err.to_string().contains(problem), "{extra}: {err}");
        }
    }

    #[test]
    fn a_format_named_twice_is_poison() {
        let body = transcode_json(r#","formats":["mp4","mp4"]"#);
        let err = parse::<TranscodeJob>(body.as_bytes()).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
    }

    #[test]
    fn thumbnail_limits_are_enforced() {
        let body = r#"{"schema":1,"task":"thumbnail","job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
            "source":"uploads/x/source.mp4","output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/thumbnail/","count":5000}"#;
        assert!(matches!(
            parse::<ThumbnailJob>(body.as_bytes()),
            Err(PoisonError::Invalid(_))
        ));
    }
}
