//! Segmented transcoding against the single pass, on real FFmpeg: fixtures generated with
//! the `ffmpeg` CLI, both transcodes run in-process, outputs read back with `ffprobe` and
//! the CLI. Each test proves one behaviour.

mod common;

use std::path::Path;

use common::*;
use shared::JobError;
use shared::media::MediaLimits;
use shared::messages::OutputFormat;
use tokio_util::sync::CancellationToken;

const BOTH: [OutputFormat; 2] = [OutputFormat::Mp4, OutputFormat::Hls];

/// Runs both transcodes of `source` (MP4 and HLS, two renditions, 2 s segments) and
/// checks each stitched rendition against the single pass: the same frame count, video
/// and audio starting and ending within one frame of the single pass's. Returns the
/// working directory (`single/`, `stitched/`).
fn agrees_with_single_pass(name: &str, source: &Path) -> std::path::PathBuf {
    let dir = source.parent().unwrap().to_owned();
    let cfg = settings();
    single_pass(source, &dir.join("single"), &two_renditions(), &BOTH, &cfg);
    let (_, finished) = segmented(
        source,
        &dir.join("work"),
        &dir.join("stitched"),
        &two_renditions(),
        &BOTH,
        &cfg,
        2.0,
    );
    assert_eq!(finished.len(), 2);
    for f in &finished {
        let r = &f.plan.name;
        let single = dir.join("single").join(format!("{r}.mp4"));
        let stitched = dir.join("stitched").join(format!("{r}.mp4"));
        let (a, b) = (video_times(&single), video_times(&stitched));
        assert_eq!(a.len(), b.len(), "{name} {r}: frame count");
        // Not only as many frames: the same timestamps, in the same time base. (The
        // decoding order may differ near a seam that the single pass did not have a
        // keyframe on: there the segment's encoder starts afresh with an IDR picture.)
        let pts = |p: &Path| {
            let mut v: Vec<i64> = probe_rows(p, "v:0", "packet=pts")
                .iter()
                .map(|r| r[0].parse().unwrap())
                .collect();
            v.sort_unstable();
            v
        };
        assert_eq!(pts(&single), pts(&stitched), "{name} {r}: video timestamps");
        assert_eq!(
            probe_rows(&single, "v:0", "stream=time_base"),
            probe_rows(&stitched, "v:0", "stream=time_base"),
            "{name} {r}: video time base"
        );
        let frame = (a[a.len() - 1] - a[0]) / (a.len() - 1) as f64;
        for stream in ["v:0", "a:0"] {
            let (s, t) = (span(&single, stream), span(&stitched, stream));
            match (s, t) {
                (Some(s), Some(t)) => assert!(
                    (s.0 - t.0).abs() <= frame + 1e-3 && (s.1 - t.1).abs() <= frame + 1e-3,
                    "{name} {r} {stream}: single pass {s:?}, stitched {t:?}"
                ),
                (None, None) => {}
                other => panic!("{name} {r} {stream}: {other:?}"),
            }
        }
        let (sv, sa) = (span(&stitched, "v:0").unwrap(), span(&stitched, "a:0"));
        if let (Some(a), Some(src_a), Some(src_v)) = (sa, span(source, "a:0"), span(source, "v:0"))
        {
            // The audio keeps its place against the video, as in the source.
            let gap = (a.0 - sv.0) - (src_a.0 - src_v.0);
            assert!(
                gap.abs() <= frame + 0.03,
                "{name} {r}: audio offset moved by {gap}"
            );
        }
    }
    dir
}

/// Frames carry their own index; decoding every stitched output (MP4 and the HLS
/// playlist) gives every index once, in order, across every seam — the same as the
/// single pass. The source's keyframes (every 37 frames) do not fall on the seams.
#[test]
fn seams_have_no_missing_repeated_or_reordered_frame() {
    let dir = scratch("seams");
    let source = indexed_clip(&dir, "indexed.mp4", 8, 25, &["-g", "37"]);
    let cfg = settings();
    let (ranges, finished) = segmented(
        &source,
        &dir.join("work"),
        &dir.join("stitched"),
        &two_renditions(),
        &BOTH,
        &cfg,
        2.0,
    );
    assert_eq!(ranges.len(), 4, "{ranges:?}");
    let expected: Vec<u32> = (0..200).collect();
    assert_eq!(frame_indices(&source), expected, "the fixture itself");
    for f in &finished {
        let r = &f.plan.name;
        for out in [
            dir.join("stitched").join(format!("{r}.mp4")),
            dir.join("stitched/hls").join(r).join("index.m3u8"),
        ] {
            let got = frame_indices(&out);
            let bad: Vec<_> = got
                .iter()
                .enumerate()
                .filter(|(i, n)| **n != *i as u32)
                .take(5)
                .collect();
            assert!(
                got == expected,
                "{}: {} frames, first wrong (position, index): {bad:?}",
                out.display(),
                got.len()
            );
        }
    }
}

/// Variable frame rate: the stitched frames keep the source's own timestamps, exactly the
/// single pass's (not re-invented at a constant rate).
#[test]
fn variable_frame_rate_keeps_single_pass_timestamps() {
    let dir = scratch("vfr");
    // 30 fps, then 15 fps from 2 s to 5 s, then 30 fps again: 7 s in all.
    let source = ffmpeg(
        &dir,
        "vfr.mkv",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=30:duration=5,\
             setpts='if(lt(N,60),N/30,if(lt(N,105),2+(N-60)/15,5+(N-105)/30))/TB'",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=7",
            "-fps_mode",
            "vfr",
            "-c:v",
            "libx264",
            "-g",
            "20",
            "-c:a",
            "aac",
        ],
    );
    let dir = agrees_with_single_pass("vfr", &source);
    for r in ["240p", "180p"] {
        let a = video_times(&dir.join("single").join(format!("{r}.mp4")));
        let b = video_times(&dir.join("stitched").join(format!("{r}.mp4")));
        assert_eq!(a, b, "{r}: frame times");
        // Really variable: both 1/30 and 1/15 s steps.
        let steps: Vec<f64> = b.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(steps.iter().any(|s| (s - 1.0 / 15.0).abs() < 0.002));
        assert!(steps.iter().any(|s| (s - 1.0 / 30.0).abs() < 0.002));
    }
}

/// A source with B-frames and open GOPs (leading pictures that refer back across the
/// keyframe a segment seeks to).
#[test]
fn open_gop_b_frame_source_matches_single_pass() {
    let dir = scratch("open-gop");
    let source = ffmpeg(
        &dir,
        "open-gop.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=7",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=7",
            "-c:v",
            "libx264",
            "-x264-params",
            "open-gop=1:bframes=3:keyint=30:min-keyint=30:scenecut=0",
            "-c:a",
            "aac",
        ],
    );
    agrees_with_single_pass("open-gop", &source);
}

/// No audio: video-only outputs, the stitch needs no audio part.
#[test]
fn source_without_audio_matches_single_pass() {
    let dir = scratch("no-audio");
    let source = ffmpeg(
        &dir,
        "silent.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=7",
            "-c:v",
            "libx264",
            "-g",
            "25",
        ],
    );
    let limits = MediaLimits::default();
    let ctx = shared::JobContext::standalone(&source, &dir.join("audio"), CancellationToken::new());
    std::fs::create_dir_all(dir.join("audio")).unwrap();
    let parts = transcoder::encode_audio(&source, &[96], &settings(), &limits, &ctx).unwrap();
    assert!(parts.is_empty());
    let dir = agrees_with_single_pass("no-audio", &source);
    assert!(span(&dir.join("stitched/240p.mp4"), "a:0").is_none());
}

/// Audio that starts a second after the video still starts a second after it.
#[test]
fn late_audio_stays_late() {
    let dir = scratch("late-audio");
    let clip = ffmpeg(
        &dir,
        "clip.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=8",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=8",
            "-c:v",
            "libx264",
            "-g",
            "25",
            "-c:a",
            "aac",
        ],
    );
    let clip = clip.to_str().unwrap();
    let source = ffmpeg(
        &dir,
        "late.mp4",
        &[
            "-i",
            clip,
            "-itsoffset",
            "1",
            "-i",
            clip,
            "-map",
            "0:v",
            "-map",
            "1:a",
            "-c",
            "copy",
            "-t",
            "7",
        ],
    );
    let (v, a) = (span(&source, "v:0").unwrap(), span(&source, "a:0").unwrap());
    assert!(
        a.0 - v.0 > 0.9,
        "fixture audio should start late: {v:?} {a:?}"
    );
    let dir = agrees_with_single_pass("late-audio", &source);
    let out = dir.join("stitched/240p.mp4");
    let (v, a) = (span(&out, "v:0").unwrap(), span(&out, "a:0").unwrap());
    assert!(a.0 - v.0 > 0.9, "stitched audio starts late: {v:?} {a:?}");
}

/// A phone video stored sideways comes out upright, as from the single pass.
#[test]
fn rotated_video_matches_single_pass() {
    let dir = scratch("rotated");
    let clip = ffmpeg(
        &dir,
        "clip.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=320x240:rate=25:duration=7",
            "-f",
            "lavfi",
            "-i",
            "sine=duration=7",
            "-c:v",
            "libx264",
            "-g",
            "25",
            "-c:a",
            "aac",
        ],
    );
    let source = ffmpeg(
        &dir,
        "rotated.mp4",
        &[
            "-i",
            clip.to_str().unwrap(),
            "-c",
            "copy",
            "-metadata:s:v:0",
            "rotate=90",
        ],
    );
    let dir = agrees_with_single_pass("rotated", &source);
    let size = probe_rows(&dir.join("stitched/240p.mp4"), "v:0", "stream=width,height");
    assert_eq!(size[0], ["240", "320"], "upright portrait");
}

/// The HLS made from segments plays: every playlist and every segment probes as H.264
/// and AAC, and the segments' durations add up to the source's.
#[test]
fn hls_from_segments_plays() {
    let dir = scratch("hls");
    let source = indexed_clip(&dir, "indexed.mp4", 8, 25, &["-g", "25"]);
    let cfg = settings();
    let (_, finished) = segmented(
        &source,
        &dir.join("work"),
        &dir.join("stitched"),
        &two_renditions(),
        &[OutputFormat::Hls],
        &cfg,
        2.0,
    );
    let source_s = duration(&source);
    for f in &finished {
        let playlist = dir
            .join("stitched/hls")
            .join(&f.plan.name)
            .join("index.m3u8");
        assert!((duration(&playlist) - source_s).abs() < 0.1);
        let segments = hls_segments(&playlist);
        assert!(segments.len() >= 4, "{segments:?}");
        let total: f64 = segments.iter().map(|(_, d)| d).sum();
        assert!(
            (total - source_s).abs() < 0.05,
            "{}: segments add up to {total} s, source {source_s} s",
            f.plan.name
        );
        for (seg, _) in &segments {
            // (ffprobe lists a TS's streams under its program too: one of each is enough.)
            let codecs: Vec<String> = ["v:0", "a:0"]
                .iter()
                .map(|s| probe_rows(seg, s, "stream=codec_name")[0][0].clone())
                .collect();
            assert_eq!(codecs, ["h264", "aac"], "{}", seg.display());
        }
    }
}

/// Same quality and size as the single pass: PSNR against the source within 0.3 dB,
/// size within 5 %, on a clip with real motion.
#[test]
fn quality_and_size_match_single_pass() {
    let dir = scratch("quality");
    let source = ffmpeg(
        &dir,
        "motion.mp4",
        &[
            "-f",
            "lavfi",
            "-i",
            "mandelbrot=size=320x240:rate=25,trim=duration=10",
            "-c:v",
            "libx264",
            "-crf",
            "12",
            "-g",
            "40",
        ],
    );
    let cfg = settings();
    let renditions = &two_renditions()[..1];
    let formats = [OutputFormat::Mp4];
    single_pass(&source, &dir.join("single"), renditions, &formats, &cfg);
    segmented(
        &source,
        &dir.join("work"),
        &dir.join("stitched"),
        renditions,
        &formats,
        &cfg,
        2.0,
    );
    let (single, stitched) = (dir.join("single/240p.mp4"), dir.join("stitched/240p.mp4"));
    let (p1, p2) = (psnr(&single, &source), psnr(&stitched, &source));
    let (s1, s2) = (
        std::fs::metadata(&single).unwrap().len() as f64,
        std::fs::metadata(&stitched).unwrap().len() as f64,
    );
    eprintln!("PSNR single {p1:.2} dB, stitched {p2:.2} dB; size {s1} / {s2}");
    assert!((p1 - p2).abs() <= 0.3, "PSNR single {p1}, stitched {p2}");
    assert!(
        (s2 / s1 - 1.0).abs() <= 0.05,
        "size single {s1}, stitched {s2}"
    );
}

/// A segment whose encoded frame count differs from its plan fails itself, as a
/// transient error (it is retried), instead of handing a bad part to the stitch.
#[test]
fn a_segment_off_its_plan_fails_transiently() {
    let dir = scratch("off-plan");
    let source = indexed_clip(&dir, "indexed.mp4", 8, 25, &["-g", "25"]);
    let cfg = settings();
    let mut range = ranges(&source, 2.0, &cfg)[1].clone();
    range.frames += 1;
    let plan = plan_for(&source, &two_renditions());
    let ctx = shared::JobContext::standalone(&source, &dir, CancellationToken::new());
    let err =
        transcoder::encode_segment(&source, &range, &plan, &cfg, &MediaLimits::default(), &ctx)
            .expect_err("a miscounted segment fails");
    match JobError::classify(err) {
        JobError::Transient(reason) => assert!(
            reason.contains("segment 1: encoded 50 frames, planned 51"),
            "{reason}"
        ),
        other => panic!("expected a transient error, got {other:?}"),
    }
}

/// The stitch refuses parts that do not fit their seams, permanently (a bug in how they
/// were made, not something a retry fixes), before writing a finished output: here the
/// last segment is handed the parts of the one before it (every part matches its own
/// facts; only the seams are wrong).
#[test]
fn a_stitch_with_a_misplaced_part_is_refused_permanently() {
    let dir = scratch("misplaced");
    let source = indexed_clip(&dir, "indexed.mp4", 8, 25, &["-g", "25"]);
    let cfg = settings();
    let limits = MediaLimits::default();
    let plan = plan_for(&source, &two_renditions());
    let mut segments: Vec<transcoder::SegmentParts> = ranges(&source, 2.0, &cfg)
        .into_iter()
        .map(|r| {
            let work = dir.join(format!("seg-{}", r.index));
            std::fs::create_dir_all(&work).unwrap();
            let ctx = shared::JobContext::standalone(&source, &work, CancellationToken::new());
            let parts = transcoder::encode_segment(&source, &r, &plan, &cfg, &limits, &ctx)
                .expect("segment");
            transcoder::SegmentParts { range: r, parts }
        })
        .collect();
    let n = segments.len();
    segments[n - 1].parts = segments[n - 2].parts.clone();
    segments[n - 1].range.frames = segments[n - 2].range.frames;
    let out = dir.join("stitched");
    std::fs::create_dir_all(&out).unwrap();
    let ctx = shared::JobContext::standalone(&source, &out, CancellationToken::new());
    let Err(err) = transcoder::stitch(&plan, &[OutputFormat::Mp4], &segments, &[], &cfg, &ctx)
    else {
        panic!("misplaced parts were stitched");
    };
    match JobError::classify(err) {
        JobError::Permanent(reason) => assert!(reason.contains("seam error"), "{reason}"),
        other => panic!("expected a permanent error, got {other:?}"),
    }
    assert!(
        !out.join("240p.mp4").exists(),
        "nothing written before the checks"
    );
}
