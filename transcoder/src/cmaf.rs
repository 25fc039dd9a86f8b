//! CMAF packaging: one set of fMP4 segments per rendition, served by both an HLS master
//! playlist and a DASH MPD.
//!
//! ```text
//! cmaf/master.m3u8            HLS (version 7): EXT-X-MEDIA audio group + one variant each
//! cmaf/manifest.mpd           DASH: video and audio adaptation sets, SegmentTimeline
//! cmaf/video/<rendition>/     init.mp4, seg_00000.m4s …, index.m3u8 (EXT-X-MAP)
//! cmaf/audio/                 the one audio rendition, same layout
//! ```
//!
//! FFmpeg's `hls` muxer (`hls_segment_type=fmp4`) writes each rendition's init segment,
//! media segments and media playlist while the pipeline encodes (see `encode::Muxers`);
//! every rendition's encoder puts an IDR frame at the same fixed interval and the muxer
//! cuts only on keyframes, so segments start with an IDR and line up across renditions.
//! This module then reads back what was written — timescales, edits, each segment's
//! start and duration and the codec strings from the init segments ([`crate::fmp4`]) —
//! and writes the two manifests from those facts, so both describe the same files.
//!
//! Audio is encoded once, at the ladder's highest audio bit rate, as a rendition of its
//! own (an `EXT-X-MEDIA` group in HLS, an audio adaptation set in DASH), instead of
//! being muxed into every video rendition.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use serde_json::json;
use shared::TaskOutput;

use crate::fmp4::{self, Fragment, InitInfo};
use crate::hls;
use crate::ladder::Planned;

/// The init segment's name in every rendition's directory.
pub const INIT: &str = "init.mp4";
/// The segments' names as FFmpeg numbers them (from 0), for the MPD's template.
const SEGMENT_TEMPLATE: &str = "seg_$Number%05d$.m4s";
/// The HLS master playlist and the DASH MPD, relative to the output directory.
pub const MASTER: &str = "cmaf/master.m3u8";
pub const MPD: &str = "cmaf/manifest.mpd";
/// The audio rendition's directory (and its id in both manifests).
const AUDIO: &str = "audio";

/// Where rendition `name`'s CMAF files go under `dir`.
pub fn video_dir(dir: &Path, name: &str) -> PathBuf {
    dir.join("cmaf").join("video").join(name)
}

/// Where the CMAF audio rendition goes under `dir`.
pub fn audio_dir(dir: &Path) -> PathBuf {
    dir.join("cmaf").join(AUDIO)
}

/// One rendition's CMAF files as read back from disk.
#[derive(Debug, Clone)]
pub struct Track {
    /// Directory relative to `cmaf/`, e.g. `video/720p`.
    pub dir: String,
    pub init: InitInfo,
    /// Segment file names, in order, with their place on the timeline.
    pub segments: Vec<(String, Fragment)>,
    /// Peak and average bit rate of the segments, bits/s.
    pub peak_bps: u64,
    pub average_bps: u64,
}

impl Track {
    /// Reads the rendition whose media playlist is `playlist` (in `cmaf/<dir>/`).
    pub fn read(playlist: &Path, dir: &str) -> anyhow::Result<Self> {
        let (peak_bps, average_bps, names) = hls::measure(playlist).context("scratch space")?;
        let base = playlist.parent().unwrap_or(Path::new("."));
        let init_path = base.join(INIT);
        let init = fmp4::read_init(&std::fs::read(&init_path).context("scratch space")?)
            .with_context(|| format!("reading {}", init_path.display()))?;
        let mut segments = Vec::with_capacity(names.len());
        for (i, n) in names.into_iter().enumerate() {
            // The MPD names segments by number: the files must be numbered as it says.
            if n != format!("seg_{i:05}.m4s") {
                bail!("{dir}: segment {i} is named {n}, not as the MPD's template says");
            }
            let data = head_of(&base.join(&n)).context("scratch space")?;
            let f = fmp4::read_fragment(&data).with_context(|| format!("reading {dir}/{n}"))?;
            // Players switch renditions at segment boundaries: a segment that does not
            // start on a keyframe would show garbage after a switch, so it fails the job.
            if !f.starts_with_sync {
                bail!("{dir}/{n} does not start with a keyframe");
            }
            segments.push((n, f));
        }
        if segments.is_empty() {
            bail!("{dir}: the muxer wrote no segments");
        }
        Ok(Self {
            dir: dir.to_owned(),
            init,
            segments,
            peak_bps,
            average_bps,
        })
    }

    /// Seconds from the first shown instant to the end of the last segment.
    pub fn duration_s(&self) -> f64 {
        let end = self
            .segments
            .last()
            .map_or(0, |(_, f)| f.start + f.duration as i64);
        (end - self.init.media_time) as f64 / f64::from(self.init.timescale)
    }
}

/// A segment's first bytes: its `styp`, `sidx` and `moof` come before the media, so the
/// media itself (most of a long transcode's output) is not read again. A megabyte holds
/// the `moof` of thousands of frames.
fn head_of(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read as _;
    let mut head = Vec::new();
    std::fs::File::open(path)?
        .take(1 << 20)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// A video rendition as the manifests list it.
#[derive(Debug, Clone)]
pub struct VideoTrack {
    /// The rendition's name: its id in the MPD.
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub track: Track,
}

/// The HLS master playlist: the audio rendition as an `EXT-X-MEDIA` group, each video
/// rendition as a variant of that group (its `CODECS` and `BANDWIDTH` include the audio,
/// as the HLS spec asks).
pub fn master_playlist(video: &[VideoTrack], audio: Option<&Track>, frame_rate: f64) -> String {
    let group = audio.map(|a| hls::AudioGroup {
        id: AUDIO.to_owned(),
        uri: format!("{}/index.m3u8", a.dir),
    });
    let variants: Vec<hls::Variant> = video
        .iter()
        .map(|v| {
            let (mut codecs, mut peak, mut average) = (
                v.track.init.codec.clone(),
                v.track.peak_bps,
                v.track.average_bps,
            );
            if let Some(a) = audio {
                codecs = format!("{codecs},{}", a.init.codec);
                peak += a.peak_bps;
                average += a.average_bps;
            }
            hls::Variant {
                uri: format!("{}/index.m3u8", v.track.dir),
                bandwidth: peak,
                average_bandwidth: average,
                width: v.width,
                height: v.height,
                frame_rate,
                codecs,
            }
        })
        .collect();
    hls::master_playlist_with(7, group.as_ref(), &variants)
}

/// The DASH MPD (static, live profile's SegmentTemplate with a SegmentTimeline taken from
/// the segments themselves) over the same files as the HLS playlists.
pub fn mpd(video: &[VideoTrack], audio: Option<&Track>, frame_rate: f64) -> String {
    let duration = video
        .iter()
        .map(|v| v.track.duration_s())
        .chain(audio.map(Track::duration_s))
        .fold(0.0, f64::max);
    let max_segment = video
        .iter()
        .map(|v| &v.track)
        .chain(audio)
        .flat_map(|t| {
            t.segments
                .iter()
                .map(|(_, f)| f.duration as f64 / f64::from(t.init.timescale))
        })
        .fold(1.0, f64::max);
    let mut out = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        out,
        "<MPD xmlns=\"urn:mpeg:dash:schema:mpd:2011\" \
         profiles=\"urn:mpeg:dash:profile:isoff-live:2011,urn:mpeg:dash:profile:cmaf:2019\" \
         type=\"static\" mediaPresentationDuration=\"PT{duration:.3}S\" \
         minBufferTime=\"PT{:.1}S\">",
        max_segment.ceil()
    );
    out.push_str("  <Period id=\"0\" start=\"PT0S\">\n");
    // One adaptation set per codec: players switch within a set, and pick the set whose
    // codec they decode.
    let mut families: Vec<&str> = Vec::new();
    for v in video {
        let family = codec_family(&v.track.init.codec);
        if !families.contains(&family) {
            families.push(family);
        }
    }
    for (id, family) in families.iter().enumerate() {
        let set: Vec<&VideoTrack> = video
            .iter()
            .filter(|v| codec_family(&v.track.init.codec) == *family)
            .collect();
        let (w, h) = set
            .iter()
            .fold((0, 0), |(w, h), v| (w.max(v.width), h.max(v.height)));
        let _ = writeln!(
            out,
            "    <AdaptationSet id=\"{id}\" contentType=\"video\" mimeType=\"video/mp4\" \
             segmentAlignment=\"true\" startWithSAP=\"1\" maxWidth=\"{w}\" maxHeight=\"{h}\" \
             frameRate=\"{}\">",
            frame_rate_attr(frame_rate)
        );
        for v in set {
            let _ = writeln!(
                out,
                "      <Representation id=\"{}\" bandwidth=\"{}\" codecs=\"{}\" width=\"{}\" \
                 height=\"{}\" sar=\"1:1\">",
                v.name,
                v.track.peak_bps.max(1),
                v.track.init.codec,
                v.width,
                v.height
            );
            segment_template(&mut out, &v.track);
            out.push_str("      </Representation>\n");
        }
        out.push_str("    </AdaptationSet>\n");
    }
    if let Some(a) = audio {
        let _ = writeln!(
            out,
            "    <AdaptationSet id=\"{}\" contentType=\"audio\" mimeType=\"audio/mp4\" \
             lang=\"und\" segmentAlignment=\"true\" startWithSAP=\"1\">",
            families.len()
        );
        let _ = writeln!(
            out,
            "      <Representation id=\"{AUDIO}\" bandwidth=\"{}\" codecs=\"{}\" \
             audioSamplingRate=\"{}\">\n        <AudioChannelConfiguration \
             schemeIdUri=\"urn:mpeg:dash:23003:3:audio_channel_configuration:2011\" \
             value=\"2\"/>",
            a.peak_bps.max(1),
            a.init.codec,
            a.init.timescale
        );
        segment_template(&mut out, a);
        out.push_str("      </Representation>\n    </AdaptationSet>\n");
    }
    out.push_str("  </Period>\n</MPD>\n");
    out
}

/// A representation's `SegmentTemplate`: its files by number, and a timeline of the
/// segments' measured starts and durations (runs of equal ones folded into `r`).
fn segment_template(out: &mut String, t: &Track) {
    let _ = writeln!(
        out,
        "        <SegmentTemplate timescale=\"{}\" presentationTimeOffset=\"{}\" \
         initialization=\"{dir}/{INIT}\" media=\"{dir}/{SEGMENT_TEMPLATE}\" startNumber=\"0\">\n\
         \x20         <SegmentTimeline>",
        t.init.timescale,
        t.init.media_time,
        dir = t.dir
    );
    // (start, duration, repeats); a start is written only where it does not follow on.
    let mut runs: Vec<(i64, u64, u32)> = Vec::new();
    for (_, f) in &t.segments {
        match runs.last_mut() {
            Some((start, d, r))
                if *d == f.duration && *start + (*d * u64::from(*r + 1)) as i64 == f.start =>
            {
                *r += 1;
            }
            _ => runs.push((f.start, f.duration, 0)),
        }
    }
    let mut next = None;
    for (start, d, r) in runs {
        out.push_str("            <S");
        if next != Some(start) {
            let _ = write!(out, " t=\"{start}\"");
        }
        let _ = write!(out, " d=\"{d}\"");
        if r > 0 {
            let _ = write!(out, " r=\"{r}\"");
        }
        out.push_str("/>\n");
        next = Some(start + (d * u64::from(r + 1)) as i64);
    }
    out.push_str("          </SegmentTimeline>\n        </SegmentTemplate>\n");
}

/// A finished video rendition's CMAF media playlist, with the rendition's facts.
pub struct Rendition<'a> {
    pub plan: &'a Planned,
    pub playlist: &'a Path,
}

/// Reads back every CMAF rendition written under `scratch` (video renditions and the
/// audio rendition's media playlist `audio`), writes the HLS master and the DASH MPD,
/// and lists every file (playlists, init segments, segments, manifests) in `out`.
pub fn package(
    out: &mut TaskOutput,
    scratch: &Path,
    renditions: &[Rendition<'_>],
    audio: Option<&Path>,
    frame_rate: f64,
) -> anyhow::Result<()> {
    let mut video = Vec::with_capacity(renditions.len());
    for r in renditions {
        let dir = format!("video/{}", r.plan.name);
        let track = Track::read(r.playlist, &dir)?;
        list_track(out, r.playlist, &track, &r.plan.name, Some(r.plan));
        video.push(VideoTrack {
            name: r.plan.name.clone(),
            width: r.plan.width,
            height: r.plan.height,
            track,
        });
    }
    let audio = match audio {
        Some(playlist) => {
            let track = Track::read(playlist, AUDIO)?;
            list_track(out, playlist, &track, AUDIO, None);
            Some(track)
        }
        None => None,
    };
    for (name, text, facts) in [
        (
            MASTER,
            master_playlist(&video, audio.as_ref(), frame_rate),
            json!({"format": "cmaf-hls-master-playlist", "variants": video.len()}),
        ),
        (
            MPD,
            mpd(&video, audio.as_ref(), frame_rate),
            json!({"format": "dash-mpd", "representations": video.len() + usize::from(audio.is_some())}),
        ),
    ] {
        let path = scratch.join(name);
        std::fs::write(&path, text).context("scratch space")?;
        out.push(name, path, facts);
    }
    Ok(())
}

/// Lists one CMAF rendition's files: its media playlist (with the rendition's facts),
/// init segment and segments.
fn list_track(
    out: &mut TaskOutput,
    playlist: &Path,
    track: &Track,
    rendition: &str,
    plan: Option<&Planned>,
) {
    let dir = playlist.parent().unwrap_or(Path::new("."));
    let prefix = format!("cmaf/{}", track.dir);
    let mut facts = json!({
        "format": "cmaf-media-playlist",
        "rendition": rendition,
        "duration_s": (track.duration_s() * 1000.0).round() / 1000.0,
        "segments": track.segments.len(),
        "peak_kbps": track.peak_bps / 1000,
        "average_kbps": track.average_bps / 1000,
        "codecs": track.init.codec,
    });
    if let Some(p) = plan {
        facts["width"] = json!(p.width);
        facts["height"] = json!(p.height);
    }
    out.push(format!("{prefix}/index.m3u8"), playlist, facts);
    out.push(
        format!("{prefix}/{INIT}"),
        dir.join(INIT),
        json!({"format": "cmaf-init", "rendition": rendition, "codecs": track.init.codec}),
    );
    for (name, _) in &track.segments {
        out.push(
            format!("{prefix}/{name}"),
            dir.join(name),
            json!({"format": "cmaf-segment", "rendition": rendition}),
        );
    }
}

/// The codec part of an RFC 6381 string (`avc1`, `hvc1`, `av01`).
fn codec_family(codec: &str) -> &str {
    codec.split('.').next().unwrap_or(codec)
}

/// A DASH `FrameRateType`: a whole number, or `N/1001` for the NTSC rates.
fn frame_rate_attr(fps: f64) -> String {
    if (fps - fps.round()).abs() < 0.001 {
        format!("{}", fps.round().max(1.0))
    } else if ((fps * 1.001) - (fps * 1.001).round()).abs() < 0.01 {
        format!("{}/1001", (fps * 1.001).round() * 1000.0)
    } else {
        format!("{}/1000", (fps * 1000.0).round())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn track(dir: &str, codec: &str, starts: &[(i64, u64)]) -> Track {
        Track {
            dir: dir.into(),
            init: InitInfo {
                timescale: 12_800,
                media_time: 1024,
                codec: codec.into(),
            },
            segments: starts
                .iter()
                .enumerate()
                .map(|(i, &(start, duration))| {
                    (
                        format!("seg_{i:05}.m4s"),
                        Fragment {
                            start,
                            duration,
                            starts_with_sync: true,
                        },
                    )
                })
                .collect(),
            peak_bps: 1_000_000,
            average_bps: 800_000,
        }
    }

    #[test]
    fn timeline_folds_equal_segments_and_states_gaps() {
        let t = track(
            "video/360p",
            "avc1.64001e",
            &[
                (1024, 51_200),
                (52_224, 51_200),
                (103_424, 25_600),
                (200_000, 100),
            ],
        );
        let mut out = String::new();
        segment_template(&mut out, &t);
        assert!(out.contains("presentationTimeOffset=\"1024\""), "{out}");
        assert!(
            out.contains(
                "<S t=\"1024\" d=\"51200\" r=\"1\"/>\n            <S d=\"25600\"/>\n            \
                 <S t=\"200000\" d=\"100\"/>"
            ),
            "{out}"
        );
    }

    #[test]
    fn master_groups_audio_and_adds_it_to_each_variant() {
        let v = VideoTrack {
            name: "360p".into(),
            width: 640,
            height: 360,
            track: track("video/360p", "avc1.64001e", &[(1024, 51_200)]),
        };
        let a = track(AUDIO, "mp4a.40.2", &[(0, 48_000)]);
        let text = master_playlist(&[v], Some(&a), 25.0);
        assert!(text.contains("#EXT-X-VERSION:7\n"), "{text}");
        assert!(
            text.contains(
                "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"audio\",NAME=\"audio\",DEFAULT=YES,\
                 AUTOSELECT=YES,CHANNELS=\"2\",URI=\"audio/index.m3u8\""
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "BANDWIDTH=2000000,AVERAGE-BANDWIDTH=1600000,RESOLUTION=640x360,\
                 CODECS=\"avc1.64001e,mp4a.40.2\",FRAME-RATE=25.000,AUDIO=\"audio\"\n\
                 video/360p/index.m3u8\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn frame_rates_are_dash_frame_rate_types() {
        assert_eq!(frame_rate_attr(25.0), "25");
        assert_eq!(frame_rate_attr(30_000.0 / 1001.0), "30000/1001");
        assert_eq!(frame_rate_attr(12.5), "12500/1000");
    }
}
