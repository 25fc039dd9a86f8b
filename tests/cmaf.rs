//! Integration tests of `formats: ["cmaf"]`: the transcoder worker as a real process on
//! the real broker, fixtures made by the `ffmpeg` CLI, every segment checked by `ffprobe`.
//! Playback in real players is `players::`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use shared::manifest::Manifest;

use crate::support::TestEnv;
use crate::support::fixtures::{self, ffprobe};

const WORKER: &str = "transcoder";
const PATIENCE: Duration = Duration::from_secs(120);

/// A 640x360 clip with sound as CMAF (and `formats`' others) in two renditions of each
/// of `codecs`; its manifest.
pub async fn two_rendition_cmaf(
    env: &mut TestEnv,
    seconds: u32,
    codecs: &[&str],
    formats: &[&str],
    settings: &[(&str, &str)],
) -> Manifest {
    let clip = fixtures::sample_mp4(env.data.path(), "clip.mp4", seconds, 640, 360);
    env.spawn_worker(WORKER, "t1", settings);
    let job = json!({
        "renditions": [
            {"name": "360p", "height": 360, "video_kbps": 800, "audio_kbps": 96},
            {"name": "180p", "height": 180, "video_kbps": 300, "audio_kbps": 64}
        ],
        "formats": formats,
        "codecs": codecs,
    });
    let prefix = env.submit_file("transcode", &clip, job).await.1;
    env.wait_manifest(&prefix, PATIENCE).await
}

/// The directory holding `cmaf/master.m3u8`.
pub fn cmaf_dir(env: &TestEnv, manifest: &Manifest) -> PathBuf {
    let master = env.output_path(manifest, "cmaf/master.m3u8");
    master.parent().expect("cmaf/").to_path_buf()
}

/// The segment names of a media playlist, after checking it is an fMP4 one.
fn media_segments(playlist: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(playlist).unwrap();
    assert!(text.contains("#EXT-X-MAP:URI=\"init.mp4\""), "{text}");
    assert!(text.contains("#EXT-X-ENDLIST"), "{text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// `ffprobe` of a media segment as a player sees it: its init segment, then it.
fn probe_segment(dir: &Path, segment: &str, packets: bool) -> Value {
    let joined = dir.join(format!("probe-{segment}.mp4"));
    let mut bytes = std::fs::read(dir.join("init.mp4")).unwrap();
    bytes.extend(std::fs::read(dir.join(segment)).unwrap());
    std::fs::write(&joined, bytes).unwrap();
    let mut args = vec!["-v", "error", "-print_format", "json", "-show_streams"];
    if packets {
        args.extend(["-show_packets", "-select_streams", "v:0"]);
    }
    let out = Command::new("ffprobe")
        .args(&args)
        .arg(&joined)
        .output()
        .unwrap();
    std::fs::remove_file(&joined).unwrap();
    assert!(
        out.status.success(),
        "ffprobe refused {segment} in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The `CODECS` string ffprobe's view of an H.264 stream implies (High profile: 0x64,
/// no constraint flags, the level as encoded).
fn avc1_of(stream: &Value) -> String {
    assert_eq!(stream["profile"], "High", "{stream}");
    format!("avc1.6400{:02x}", stream["level"].as_u64().unwrap())
}

/// Two renditions as CMAF: fMP4 segments (init + segment decodable by ffprobe, video only,
/// starting on a keyframe at the same time in both renditions), an audio rendition of its
/// own, an HLS master (version 7, audio group, CODECS as encoded) and a DASH MPD naming
/// the very same files; every file is in the task manifest.
#[tokio::test]
async fn cmaf_writes_fmp4_renditions_that_hls_and_dash_share() {
    let mut env = TestEnv::new().await;
    let manifest = two_rendition_cmaf(&mut env, 9, &["h264"], &["cmaf"], &[]).await;
    let root = cmaf_dir(&env, &manifest);
    let master = std::fs::read_to_string(root.join("master.m3u8")).unwrap();
    let mpd = std::fs::read_to_string(root.join("manifest.mpd")).unwrap();
    assert!(master.contains("#EXT-X-VERSION:7\n"), "{master}");
    assert!(
        master.contains("#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"audio\"")
            && master.contains("URI=\"audio/index.m3u8\""),
        "{master}"
    );

    let mut starts: Vec<Vec<String>> = Vec::new();
    for (name, w, h) in [("360p", 640, 360), ("180p", 320, 180)] {
        let dir = root.join("video").join(name);
        let segments = media_segments(&dir.join("index.m3u8"));
        assert!(segments.len() >= 3, "9 s at 4 s segments: {segments:?}");
        let mut codecs = None;
        let mut rendition_starts = Vec::new();
        for s in &segments {
            let probe = probe_segment(&dir, s, true);
            let streams = probe["streams"].as_array().unwrap();
            assert_eq!(streams.len(), 1, "{name}/{s}: video only: {streams:?}");
            let v = &streams[0];
            assert_eq!(v["codec_name"], "h264");
            assert_eq!(
                (v["width"].as_u64(), v["height"].as_u64()),
                (Some(w), Some(h))
            );
            codecs = Some(avc1_of(v));
            let first = &probe["packets"][0];
            assert!(
                first["flags"].as_str().unwrap().starts_with('K'),
                "{name}/{s} does not start with a keyframe: {first}"
            );
            rendition_starts.push(first["pts_time"].as_str().unwrap().to_owned());
        }
        starts.push(rendition_starts);
        let codecs = codecs.unwrap();
        let inf = variant_line(&master, name);
        assert!(
            inf.contains(&format!("CODECS=\"{codecs},mp4a.40.2\""))
                && inf.contains(&format!("RESOLUTION={w}x{h}"))
                && inf.contains("AUDIO=\"audio\""),
            "{inf}"
        );
        // The MPD's representation: the same codecs, the same init and segment files.
        let rep = mpd
            .split("<Representation ")
            .find(|r| r.starts_with(&format!("id=\"{name}\"")))
            .unwrap_or_else(|| panic!("{name} missing from the MPD:\n{mpd}"));
        assert!(rep.contains(&format!("codecs=\"{codecs}\"")), "{rep}");
        assert!(
            rep.contains(&format!("initialization=\"video/{name}/init.mp4\""))
                && rep.contains(&format!("media=\"video/{name}/seg_$Number%05d$.m4s\""))
                && rep.contains("startNumber=\"0\""),
            "{rep}"
        );
        assert_eq!(timeline_count(rep), segments.len(), "{rep}");
        for (i, s) in segments.iter().enumerate() {
            assert_eq!(*s, format!("seg_{i:05}.m4s"), "the MPD's template names it");
        }
    }
    assert_eq!(starts[0], starts[1], "segments start at different times");

    // The audio rendition: AAC only, in the MPD's audio set and the master's group.
    let audio = root.join("audio");
    let segments = media_segments(&audio.join("index.m3u8"));
    for s in &segments {
        let probe = probe_segment(&audio, s, false);
        let streams = probe["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 1, "audio/{s}: {streams:?}");
        assert_eq!(streams[0]["codec_name"], "aac");
        assert_eq!(streams[0]["profile"], "LC");
    }
    let rep = mpd
        .split("<Representation ")
        .find(|r| r.starts_with("id=\"audio\""))
        .unwrap_or_else(|| panic!("no audio in the MPD:\n{mpd}"));
    assert!(rep.contains("codecs=\"mp4a.40.2\"") && rep.contains("media=\"audio/seg_"));
    assert_eq!(timeline_count(rep), segments.len(), "{rep}");

    // The manifest lists exactly the files written.
    let listed: BTreeSet<String> = manifest
        .outputs
        .iter()
        .map(|o| o.name.clone())
        .filter(|n| n.starts_with("cmaf/"))
        .collect();
    assert_eq!(listed, files_under(&root, "cmaf"));
}

/// Segments a `SegmentTimeline` describes (each `S` plus its repeats).
fn timeline_count(representation: &str) -> usize {
    let timeline = representation.split("</SegmentTimeline>").next().unwrap();
    timeline
        .split("<S ")
        .skip(1)
        .map(|s| {
            s.split("r=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .map_or(1, |r| r.parse::<usize>().unwrap() + 1)
        })
        .sum()
}

/// Every file under `dir`, named as `prefix/relative/path`.
fn files_under(dir: &Path, prefix: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = format!("{prefix}/{}", e.file_name().to_string_lossy());
        if e.file_type().unwrap().is_dir() {
            out.extend(files_under(&e.path(), &name));
        } else {
            out.insert(name);
        }
    }
    out
}

/// A source without sound: CMAF with no audio rendition, and no audio codec announced.
#[tokio::test]
async fn cmaf_of_a_silent_source_has_no_audio_rendition() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::x264_clip(env.data.path(), "silent.mp4", "320x240", 3, &[]);
    env.spawn_worker(WORKER, "t1", &[]);
    let prefix = env
        .submit_file("transcode", &clip, json!({"formats": ["cmaf"]}))
        .await
        .1;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    let root = cmaf_dir(&env, &manifest);
    let master = std::fs::read_to_string(root.join("master.m3u8")).unwrap();
    let mpd = std::fs::read_to_string(root.join("manifest.mpd")).unwrap();
    assert!(
        !master.contains("EXT-X-MEDIA") && !master.contains("mp4a"),
        "{master}"
    );
    assert!(master.contains("CODECS=\"avc1.64"), "{master}");
    assert!(!mpd.contains("contentType=\"audio\""), "{mpd}");
    assert!(!root.join("audio").exists());
}

/// A source long enough to be split is still transcoded in one pass when the job asks
/// for CMAF (the stitch cannot write it), and every format asked for is written.
#[tokio::test]
async fn cmaf_job_of_a_long_source_is_not_split() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::segmentable_clip(env.data.path());
    env.spawn_worker(
        WORKER,
        "t1",
        &[
            ("VIDPIPE__TRANSCODER__SEGMENT_THRESHOLD_SECS", "2"),
            ("VIDPIPE__TRANSCODER__SEGMENT_SECS", "2"),
            ("VIDPIPE__TRANSCODER__HLS_SEGMENT_S", "2"),
        ],
    );
    let prefix = env
        .submit_file("transcode", &clip, json!({"formats": ["mp4", "cmaf"]}))
        .await
        .1;
    let manifest = env.wait_manifest(&prefix, PATIENCE).await;
    let summary = &manifest.summary;
    assert!(summary.get("segments").is_none(), "split: {summary}");
    assert_eq!(summary["formats"], json!(["mp4", "cmaf"]));
    let names: Vec<&str> = manifest.outputs.iter().map(|o| o.name.as_str()).collect();
    assert!(
        names.contains(&"cmaf/manifest.mpd") && names.contains(&"240p.mp4"),
        "{names:?}"
    );
    let probe = ffprobe(&env.output_path(&manifest, "240p.mp4"));
    assert_eq!(probe["streams"].as_array().unwrap().len(), 2, "{probe}");
}

/// `ffmpeg` decodes every frame of a media segment (its init segment, then it) without
/// a word on stderr: how HEVC, which Chromium plays only with a hardware decoder, is
/// checked.
fn decodes_cleanly(dir: &Path, segment: &str) {
    let joined = dir.join(format!("decode-{segment}.mp4"));
    let mut bytes = std::fs::read(dir.join("init.mp4")).unwrap();
    bytes.extend(std::fs::read(dir.join(segment)).unwrap());
    std::fs::write(&joined, bytes).unwrap();
    let out = Command::new("ffmpeg")
        .args(["-v", "error", "-xerror", "-i"])
        .arg(&joined)
        .args(["-f", "null", "-"])
        .output()
        .unwrap();
    std::fs::remove_file(&joined).unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}/{segment} does not decode cleanly: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `#EXTINF` durations of a media playlist: equal lists mean equal boundaries.
fn durations(playlist: &Path) -> Vec<String> {
    std::fs::read_to_string(playlist)
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("#EXTINF:"))
        .map(str::to_owned)
        .collect()
}

/// `codecs: [h264, hevc, av1]`: a ladder of each from one decode, as MP4 (HEVC tagged
/// `hvc1`) and CMAF; CODECS strings from the profile and level actually encoded; every
/// HEVC segment decodes; segments of all six renditions start on keyframes at the same
/// boundaries; the MPD has one video adaptation set per codec; SVT-AV1's banner is kept
/// out of the worker's log.
#[tokio::test]
async fn each_codec_is_a_ladder_of_its_own_with_codecs_as_encoded() {
    let mut env = TestEnv::new().await;
    let codecs = ["h264", "hevc", "av1"];
    let manifest = two_rendition_cmaf(&mut env, 6, &codecs, &["cmaf", "mp4"], &[]).await;
    assert_eq!(manifest.summary["codecs"], json!(codecs));
    let root = cmaf_dir(&env, &manifest);
    let master = std::fs::read_to_string(root.join("master.m3u8")).unwrap();
    let mpd = std::fs::read_to_string(root.join("manifest.mpd")).unwrap();
    let boundaries = durations(&root.join("video/360p/index.m3u8"));
    assert!(boundaries.len() >= 2, "{boundaries:?}");
    for (name, codec_name, tag) in [
        ("360p.hevc", "hevc", "hvc1"),
        ("180p.hevc", "hevc", "hvc1"),
        ("360p.av1", "av1", "av01"),
        ("180p.av1", "av1", "av01"),
    ] {
        let mp4 = ffprobe(&env.output_path(&manifest, &format!("{name}.mp4")));
        let v = &mp4["streams"][0];
        assert_eq!(
            (&v["codec_name"], &v["codec_tag_string"]),
            (&json!(codec_name), &json!(tag))
        );
        assert_eq!(v["profile"], "Main", "{v}");
        let level = v["level"].as_u64().unwrap();
        let expected = match codec_name {
            "hevc" => format!("hvc1.1.6.L{level}."),
            _ => format!("av01.0.{level:02}M.08"),
        };
        let dir = root.join("video").join(name);
        let playlist = dir.join("index.m3u8");
        let inf = variant_line(&master, name);
        assert!(
            inf.contains(&format!("CODECS=\"{expected}")),
            "{name}: {inf}"
        );
        let listed = manifest
            .outputs
            .iter()
            .find(|o| o.name == format!("{name}.mp4"))
            .unwrap();
        assert!(
            listed.facts["codecs"]
                .as_str()
                .unwrap()
                .starts_with(&expected),
            "{name}.mp4: {:?}",
            listed.facts
        );
        assert_eq!(durations(&playlist), boundaries, "{name}: other boundaries");
        for s in media_segments(&playlist) {
            let probe = probe_segment(&dir, &s, true);
            assert_eq!(probe["streams"][0]["codec_name"], codec_name);
            let first = &probe["packets"][0];
            assert!(
                first["flags"].as_str().unwrap().starts_with('K'),
                "{name}/{s}: {first}"
            );
            if codec_name == "hevc" {
                decodes_cleanly(&dir, &s);
            }
        }
    }
    assert_eq!(durations(&root.join("video/180p/index.m3u8")), boundaries);
    for family in ["avc1", "hvc1", "av01"] {
        let sets: Vec<&str> = mpd
            .split("<AdaptationSet ")
            .skip(1)
            .filter(|set| set.contains(&format!("codecs=\"{family}")))
            .collect();
        assert_eq!(sets.len(), 1, "{family}: {mpd}");
        assert_eq!(
            sets[0].matches("<Representation ").count(),
            2,
            "{family}: {mpd}"
        );
    }
    // MPEG-TS HLS stays H.264: no other codec was asked for it here, and none is written.
    assert!(!manifest.outputs.iter().any(|o| o.name.starts_with("hls/")));
    // SVT-AV1's banner stays out of the worker's log (SVT_LOG=1 unless set).
    let logs = env.logs();
    assert!(!logs.contains("Svt[info]"), "{logs}");
}

/// HEVC asked for MPEG-TS HLS only: the job is dead at once with a reason saying why.
#[tokio::test]
async fn hevc_in_mpeg_ts_hls_only_is_refused_with_a_reason() {
    let mut env = TestEnv::new().await;
    let clip = fixtures::sample_mp4(env.data.path(), "clip.mp4", 1, 320, 240);
    env.spawn_worker(WORKER, "t1", &[]);
    let job = json!({"formats": ["hls"], "codecs": ["h264", "hevc"]});
    env.submit_file("transcode", &clip, job).await;
    let dead = env.wait_dead(1, PATIENCE).await;
    assert!(
        dead[0]
            .reason()
            .contains("hevc can only be written as mp4 or cmaf"),
        "{}",
        dead[0].reason()
    );
    assert_eq!(dead[0].attempts(), Some(1), "refused, never retried");
}

/// The `#EXT-X-STREAM-INF` line of rendition `name`'s variant in a CMAF master playlist.
fn variant_line<'m>(master: &'m str, name: &str) -> &'m str {
    master
        .lines()
        .zip(master.lines().skip(1))
        .find(|(_, uri)| *uri == format!("video/{name}/index.m3u8"))
        .map(|(inf, _)| inf)
        .unwrap_or_else(|| panic!("{name} missing from the master:\n{master}"))
}
