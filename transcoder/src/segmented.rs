//! Segment-parallel transcoding: how one transcode job becomes parts and back.
//!
//! ```text
//! transcode job ─ plan ─┬─ segment 0 ─┐   (any transcoder; same queue, retries,
//!   (long source)       ├─ segment 1 ─┤    dead letters and time limit as any job)
//!                       ├─ …          ├─ the last part to commit publishes ─ stitch
//!                       └─ audio ─────┘                                   (MP4 + HLS by
//!                                                                          stream copy)
//! ```
//!
//! The broker and storage side (fan-out with confirms, per-part commits, the race-free
//! fan-in, the stitch committed once) is [`shared::split`]'s; this module decides what
//! the parts are and runs each one:
//!
//! - **Plan** ([`plan`]): a source longer than `segment_threshold_secs` (and not
//!   uploaded with `--segments off`) is cut into frame-exact ranges of about
//!   `segment_secs`, on multiples of the HLS segment length ([`crate::segments`]).
//!   Every part carries the ladder the planner sized, so all parts encode the same one;
//!   with `ladder: auto` the planner fits it first (the probe runs once, on the whole
//!   source), so every part of a rendition encodes with one CRF and cap.
//! - **Segment**: decodes its range and encodes every rendition, video only.
//! - **Audio**: the whole sound track, once (never per segment: no seams in the sound,
//!   no AAC priming per piece).
//! - **Stitch**: joins the segments and the audio into the outputs a single pass makes,
//!   checking frame counts and seams first ([`crate::stitch`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use serde_json::json;
use shared::media::{self, MediaLimits};
use shared::messages::{OutputFormat, Segmenting, Stage, TranscodeJob, TranscodePart, VideoCodec};
use shared::split::FollowUp;
use shared::{JobContext, TaskOutput, permanent};

use crate::ladder::{self, Planned};
use crate::segment_encode;
use crate::segments::{self, SegmentRange};
use crate::settings::TranscoderSettings;
use crate::stitch::SegmentParts;

/// Runs one transcode job: the whole source in one pass, its plan (fan-out), or one of
/// its parts.
pub fn run(
    job: &TranscodeJob,
    ctx: &JobContext,
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
) -> anyhow::Result<TaskOutput> {
    let Some(part) = &job.part else {
        return match plan(job, &ctx.source_path, cfg, limits, ctx)? {
            Some(parts) => Ok(TaskOutput {
                fan_out: parts.iter().map(FollowUp::of).collect(),
                ..TaskOutput::default()
            }),
            None => crate::pipeline::transcode(job, ctx, cfg, limits),
        };
    };
    // Parts are only planned for jobs the stitch can finish (see `plan`); a part asking
    // for more was not made by a planner and is refused rather than stitched without it.
    if let Some(why) = one_pass_only(job) {
        return Err(permanent(format!(
            "a part of a segmented transcode cannot be done: {why}"
        )));
    }
    let ladder = &part.ladder;
    match &part.stage {
        Stage::Segment {
            index,
            start_s,
            end_s,
            frames,
        } => {
            let range = SegmentRange {
                index: *index,
                start_s: *start_s,
                end_s: *end_s,
                frames: *frames,
            };
            segment(job, &range, ladder, ctx, cfg, limits)
        }
        Stage::Audio => audio(ladder, ctx, cfg, limits),
        Stage::Stitch => stitch(job, part, ladder, ctx, cfg),
    }
}

/// Why `job` must be transcoded in one pass, if it must: the stitch copies H.264 parts
/// into MP4 and MPEG-TS HLS only.
fn one_pass_only(job: &TranscodeJob) -> Option<&'static str> {
    if job.formats.contains(&OutputFormat::Cmaf) {
        Some("CMAF is written by the single pass only")
    } else if job.codecs != [VideoCodec::H264] {
        Some("HEVC and AV1 are encoded by the single pass only")
    } else {
        None
    }
}

/// The parts of a long source at `source` (segments, then audio), or `None` to
/// transcode it in one pass: short, `--segments off`, or not safely splittable.
pub fn plan(
    job: &TranscodeJob,
    source: &std::path::Path,
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
    ctx: &JobContext,
) -> anyhow::Result<Option<Vec<TranscodeJob>>> {
    if job.segments == Segmenting::Off {
        return Ok(None);
    }
    // A slower single pass for a long source, but every format and codec is written.
    if let Some(why) = one_pass_only(job) {
        tracing::info!("not splitting the transcode: {why}");
        return Ok(None);
    }
    let src = media::open(source, limits)?;
    let info = src.info.clone();
    drop(src);
    if info.duration_s <= cfg.segment_threshold_secs {
        return Ok(None);
    }
    // A hostile "ten-hour" source must not fan out without bound: past the cap the
    // segments grow instead.
    let max = f64::from(shared::messages::MAX_SEGMENTS);
    let segment_s = cfg.segment_secs.max(info.duration_s / max);
    let Some(ranges) = segments::plan_ranges(source, limits, segment_s, cfg.hls_segment_s)? else {
        tracing::info!("source cannot be split frame-exactly; transcoding it in one pass");
        return Ok(None);
    };
    let (ladder, _) = ladder::plan(
        &job.renditions,
        info.video.display_width,
        info.video.display_height,
    );
    // A fitted ladder is chosen here, once: every part encodes each rendition with the
    // same CRF and cap (a probe per part would pick different ones, and seams would show).
    let (ladder, fit) = crate::fit::apply(job, ladder, source, cfg, limits, ctx)?;
    let fit = fit.map(|f| serde_json::to_value(f).unwrap_or_default());
    let segments = u32::try_from(ranges.len()).context("segment count")?;
    let plan_id = plan_id(&ranges, &ladder, cfg);
    let part = |stage: Stage| {
        let mut part_job = job.clone();
        part_job.part = Some(TranscodePart {
            plan: plan_id.clone(),
            segments,
            audio: info.audio.is_some(),
            ladder: ladder.clone(),
            fit: fit.clone(),
            stage,
        });
        part_job
    };
    let mut parts: Vec<TranscodeJob> = ranges
        .iter()
        .map(|r| {
            part(Stage::Segment {
                index: r.index,
                start_s: r.start_s,
                end_s: r.end_s,
                frames: r.frames,
            })
        })
        .collect();
    if info.audio.is_some() {
        parts.push(part(Stage::Audio));
    }
    tracing::info!(segments, plan = %plan_id, "split the transcode into parts");
    Ok(Some(parts))
}

/// The plan's id: 16 hex digits of a digest of everything that shapes the parts' output
/// (ranges, ladder, encoder settings). Two plans of one job that differ (a redelivery to
/// a worker with other settings) get different part folders and never mix.
fn plan_id(ranges: &[SegmentRange], ladder: &[Planned], cfg: &TranscoderSettings) -> String {
    let text = json!({"ranges": ranges, "ladder": ladder, "settings": cfg}).to_string();
    // FNV-1a, 64 bits: stable across builds and machines, which is all an id needs here
    // (it is not a security boundary: parts are validated when they are read).
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// Encodes one segment's range of every rendition; the files and their facts are the
/// part's outputs, the range and the source's probe its summary (the stitch reads them).
fn segment(
    job: &TranscodeJob,
    range: &SegmentRange,
    ladder: &[Planned],
    ctx: &JobContext,
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
) -> anyhow::Result<TaskOutput> {
    let started = Instant::now();
    let src = media::open(&ctx.source_path, limits)?;
    check_ladder(ladder, &src.info)?;
    let files = segment_encode::encode_segment(&ctx.source_path, range, ladder, cfg, limits, ctx)?;
    let mut out = TaskOutput::default();
    for f in &files {
        out.push(
            format!("{}.nut", f.rendition),
            f.path.clone(),
            json!({ "part_file": f }),
        );
    }
    // The first segment carries what the task's manifest says about the source.
    let source = if range.index == 0 {
        let (_, dropped) = ladder::plan(
            &job.renditions,
            src.info.video.display_width,
            src.info.video.display_height,
        );
        // The rate frames without timestamps are clocked at, as the single pass does.
        let rate = src.frame_rate().map_or(30.0, f64::from);
        json!({"info": src.info, "dropped_renditions": dropped, "frame_rate": rate})
    } else {
        serde_json::Value::Null
    };
    out.summary = json!({
        // The part as published: what an operator (or a test) needs to re-publish it.
        "part": job.part,
        "range": range,
        "source": source,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    Ok(out)
}

/// A part's ladder comes in its message: a hostile one must not make a worker encode
/// pictures larger than the source (the planner never upscales; 2 pixels of slack for
/// the even rounding of sizes).
fn check_ladder(ladder: &[Planned], info: &media::SourceInfo) -> anyhow::Result<()> {
    let (w, h) = (info.video.display_width, info.video.display_height);
    let (long, short) = (w.max(h) + 2, w.min(h) + 2);
    for r in ladder {
        if r.width.max(r.height) > long || r.width.min(r.height) > short {
            return Err(permanent(format!(
                "the part's rendition `{}` ({}x{}) is larger than the source ({w}x{h}); the \
                 planner never upscales, so this part was not made by it",
                r.name, r.width, r.height
            )));
        }
    }
    Ok(())
}

/// Encodes the whole audio once per distinct bit rate of the ladder.
fn audio(
    ladder: &[Planned],
    ctx: &JobContext,
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
) -> anyhow::Result<TaskOutput> {
    let mut kbps: Vec<u32> = ladder.iter().map(|p| p.audio_kbps).collect();
    kbps.sort_unstable();
    kbps.dedup();
    let parts = segment_encode::encode_audio(&ctx.source_path, &kbps, cfg, limits, ctx)?;
    let mut out = TaskOutput::default();
    for a in &parts {
        out.push(
            format!("aac-{}.nut", a.kbps),
            a.path.clone(),
            json!({ "audio_part": a }),
        );
    }
    out.summary = json!({"audio": true});
    Ok(out)
}

/// Reads the committed parts back (their facts from the manifests, their files as
/// local paths) and joins them.
fn stitch(
    job: &TranscodeJob,
    part: &TranscodePart,
    ladder: &[Planned],
    ctx: &JobContext,
    cfg: &TranscoderSettings,
) -> anyhow::Result<TaskOutput> {
    let started = Instant::now();
    let segments = usize::try_from(part.segments).context("segment count")?;
    let expected = segments + usize::from(part.audio);
    if ctx.parts.len() != expected {
        return Err(permanent(format!(
            "the stitch got {} parts, the plan has {expected}",
            ctx.parts.len()
        )));
    }
    let mut joined = Vec::with_capacity(segments);
    for (i, p) in ctx.parts[..segments].iter().enumerate() {
        let range: SegmentRange =
            serde_json::from_value(p.manifest.summary.get("range").cloned().unwrap_or_default())
                .with_context(|| format!("segment {i}'s manifest has no readable range"))
                .map_err(shared::outcome::mark_permanent)?;
        joined.push(SegmentParts {
            range,
            parts: part_files::<segment_encode::PartFile>(p, "part_file")?,
        });
    }
    let audio = match ctx.parts.get(segments) {
        Some(p) => part_files::<segment_encode::AudioPart>(p, "audio_part")?,
        None => Vec::new(),
    };
    let finished = crate::stitch::stitch(ladder, &job.formats, &joined, &audio, cfg, ctx)?;
    let source = ctx.parts[0]
        .manifest
        .summary
        .get("source")
        .cloned()
        .unwrap_or_default();
    let mut out = crate::pipeline::collect_outputs_of(
        job,
        source.get("info").cloned().unwrap_or_default(),
        &finished,
        None,
        &string_list(source.get("dropped_renditions")),
        source
            .get("frame_rate")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(30.0),
        ctx,
        started,
    )?;
    if let Some(summary) = out.summary.as_object_mut() {
        summary.insert(
            "segments".into(),
            json!({"count": part.segments, "plan": part.plan}),
        );
    }
    crate::pipeline::record_fit(&mut out, part.fit.clone());
    Ok(out)
}

/// The facts of a part's files (stored under `key` in each file's manifest entry),
/// each with its local path.
fn part_files<T: serde::de::DeserializeOwned + WithPath>(
    part: &shared::handler::CommittedPart,
    key: &str,
) -> anyhow::Result<Vec<T>> {
    part.manifest
        .outputs
        .iter()
        .zip(&part.files)
        .map(|(output, local)| {
            let mut fact: T =
                serde_json::from_value(output.facts.get(key).cloned().unwrap_or_default())
                    .with_context(|| format!("part file `{}` has no readable facts", output.name))
                    .map_err(shared::outcome::mark_permanent)?;
            fact.set_path(local.clone());
            Ok(fact)
        })
        .collect()
}

/// Part facts carry the path they were written at; the stitch reads them elsewhere.
pub trait WithPath {
    fn set_path(&mut self, path: PathBuf);
}

impl WithPath for segment_encode::PartFile {
    fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }
}

impl WithPath for segment_encode::AudioPart {
    fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }
}

fn string_list(value: Option<&serde_json::Value>) -> Vec<String> {
    value
        .and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::JobError;

    fn source(w: u32, h: u32) -> media::SourceInfo {
        media::SourceInfo {
            container: "mov,mp4,m4a,3gp,3g2,mj2".into(),
            duration_s: 600.0,
            size_bytes: 1,
            video: media::VideoInfo {
                index: 0,
                codec: "h264".into(),
                width: w,
                height: h,
                display_width: w,
                display_height: h,
                rotation: 0,
                frame_rate: 25.0,
                pixel_format: "yuv420p".into(),
            },
            audio: None,
        }
    }

    #[test]
    fn only_h264_jobs_without_cmaf_may_be_split() {
        let body = |extra: &str| {
            format!(
                r#"{{"schema":1,"task":"transcode","job_id":"6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e",
                "source":"uploads/x/source.mp4",
                "output_prefix":"outputs/6f1c1f0e-8a53-4b8e-9d5e-1b2f0a3c4d5e/transcode/"{extra}}}"#
            )
        };
        let job = |extra: &str| {
            shared::messages::parse::<TranscodeJob>(body(extra).as_bytes()).expect("a job")
        };
        assert_eq!(one_pass_only(&job("")), None);
        assert_eq!(
            one_pass_only(&job(r#","formats":["mp4","hls"],"codecs":["h264"]"#)),
            None
        );
        let cmaf = one_pass_only(&job(r#","formats":["cmaf"]"#));
        assert!(cmaf.is_some_and(|why| why.contains("CMAF")), "{cmaf:?}");
        let av1 = one_pass_only(&job(r#","formats":["mp4"],"codecs":["h264","av1"]"#));
        assert!(av1.is_some_and(|why| why.contains("AV1")), "{av1:?}");
    }

    #[test]
    fn a_part_may_not_ask_for_pictures_larger_than_the_source() {
        let (planned, _) = ladder::plan(&[], 1280, 720);
        check_ladder(&planned, &source(1280, 720)).expect("the planner's own ladder");
        let (portrait, _) = ladder::plan(&[], 720, 1280);
        check_ladder(&portrait, &source(720, 1280)).expect("portrait");
        let hostile = Planned {
            name: "huge".into(),
            width: 7680,
            height: 4320,
            video_kbps: 50_000,
            audio_kbps: 128,
            crf: None,
        };
        let err = check_ladder(&[hostile], &source(1280, 720)).unwrap_err();
        assert!(err.to_string().contains("larger than the source"), "{err}");
        assert!(matches!(JobError::classify(err), JobError::Permanent(_)));
    }

    #[test]
    fn plan_ids_follow_what_shapes_the_parts() {
        let ranges = |frames| {
            vec![SegmentRange {
                index: 0,
                start_s: 0.0,
                end_s: None,
                frames,
            }]
        };
        let cfg = TranscoderSettings::default();
        let id = plan_id(&ranges(10), &[], &cfg);
        assert_eq!(id.len(), 16);
        assert_eq!(id, plan_id(&ranges(10), &[], &cfg), "stable");
        assert_ne!(id, plan_id(&ranges(11), &[], &cfg));
        let crf = TranscoderSettings { crf: 30, ..cfg };
        assert_ne!(id, plan_id(&ranges(10), &[], &crf));
    }
}
