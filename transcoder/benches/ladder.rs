//! Transcoder benchmark: our handler vs the `ffmpeg` CLI making the same ladder with the
//! same codec settings, on a generated 1080p clip (24 s). Prints wall-time, CPU-time and
//! peak-memory ratios measured in this run; not a pass/fail test.
//!
//! `cargo bench -p transcoder --bench ladder` (release build; takes a few minutes).
//!
//! - (a) one `ffmpeg` command that decodes once and encodes every rendition (`split`);
//! - (b) one `ffmpeg` command per rendition, as most scripts do;
//! - the floor under (b): one decode plus x264's own work for the ladder (measured with
//!   the CLI) spread over every core, as a ratio to (b)'s baseline. No pipeline with these
//!   x264 settings gets below it.
//!
//! Both sides run as child processes measured the same way: the benchmark re-runs itself
//! with `VIDPIPE_BENCH_CHILD` set to run our handler.

#[path = "../../benches/support/measure.rs"]
mod measure;

use std::path::{Path, PathBuf};
use std::process::Command;

use shared::messages::DEFAULT_LADDER;
use shared::messages::{OutputFormat, TranscodeJob};
use shared::storage_key::StorageKey;
use shared::{Handler, JobContext};
use tokio_util::sync::CancellationToken;
use transcoder::ladder::plan;
use transcoder::{TranscodeHandler, TranscoderSettings};

const CHILD: &str = "VIDPIPE_BENCH_CHILD";

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        return child(&spec);
    }
    let dir = std::env::temp_dir().join("vidpipe-bench-transcode");
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("source-1080p-24s.mp4");
    measure::clip(&source, 24, "1920x1080");
    let cfg = TranscoderSettings::default();
    let (ladder, _) = plan(&[], 1920, 1080);
    assert_eq!(ladder.len(), DEFAULT_LADDER.len());
    println!(
        "transcode ladder {} of a 24 s 1080p clip, libx264 preset {} crf {}, MP4 only",
        ladder
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join("/"),
        cfg.preset,
        cfg.crf
    );
    let out = |name: &str| {
        let d = dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let exe = std::env::current_exe().unwrap();
    let ours = measure::best_of(2, "vidpipe transcoder", || {
        let mut c = Command::new(&exe);
        c.env(
            CHILD,
            format!("{}|{}", source.display(), out("ours").display()),
        );
        c
    });

    // The same settings for the CLI: scale per rendition, x264 options, AAC per rendition.
    let gop = (30.0 * cfg.keyframe_interval_s).round() as u32;
    let x264 = |kbps: u32| -> Vec<String> {
        [
            "-c:v",
            "libx264",
            "-preset",
            &cfg.preset,
            "-crf",
            &cfg.crf.to_string(),
            "-maxrate",
            &format!("{kbps}k"),
            "-bufsize",
            &format!("{}k", kbps * 2),
            "-profile:v",
            "high",
            "-pix_fmt",
            "yuv420p",
            "-x264-params",
            &format!("keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0"),
            "-movflags",
            "+faststart",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let split = measure::best_of(2, "ffmpeg split", || {
        let d = out("cli-split");
        let mut graph = format!("[0:v]split={}", ladder.len());
        for i in 0..ladder.len() {
            graph.push_str(&format!("[s{i}]"));
        }
        for (i, r) in ladder.iter().enumerate() {
            graph.push_str(&format!(";[s{i}]scale={}:{}[v{i}]", r.width, r.height));
        }
        let mut c = ffmpeg(&source);
        c.args(["-filter_complex", &graph]);
        for (i, r) in ladder.iter().enumerate() {
            c.args(["-map", &format!("[v{i}]"), "-map", "0:a"]);
            c.args(x264(r.video_kbps));
            c.args(["-c:a", "aac", "-b:a", &format!("{}k", r.audio_kbps)]);
            c.arg(d.join(format!("{}.mp4", r.name)));
        }
        c
    });
    measure::report("(a) one pass", ours, split, "ffmpeg split");
    let per_rendition = {
        let runs: Vec<measure::Measured> = ladder
            .iter()
            .map(|r| {
                let d = out(&format!("cli-{}", r.name));
                // Best of two, as for our side.
                measure::best_of(2, "ffmpeg per rendition", || {
                    let mut c = ffmpeg(&source);
                    c.args(["-vf", &format!("scale={}:{}", r.width, r.height)]);
                    c.args(x264(r.video_kbps));
                    c.args(["-c:a", "aac", "-b:a", &format!("{}k", r.audio_kbps)]);
                    c.arg(d.join(format!("{}.mp4", r.name)));
                    c
                })
            })
            .collect();
        measure::Measured::sequence(&runs)
    };
    measure::report("(b) per rendition", ours, per_rendition, "ffmpeg x4");

    // The floor under (b): whatever makes this ladder with these x264 settings spends at
    // least one decode of the source plus x264's own work for every rendition. x264's
    // work is measured as the CPU of a video-only encode to nowhere minus that of the same
    // decode and scale without the encode. Scaling, audio and muxing are left out, so the
    // floor is a lower bound.
    let cpu = |what: &str, args: &[String]| {
        let mut c = ffmpeg(&source);
        c.arg("-an").args(args).args(["-f", "null", "-"]);
        measure::run(what, &mut c).cpu
    };
    let decode_once = cpu("ffmpeg decode", &[]);
    let x264_work: std::time::Duration = ladder
        .iter()
        .map(|r| {
            let scale = vec!["-vf".to_owned(), format!("scale={}:{}", r.width, r.height)];
            let encode = [scale.clone(), x264(r.video_kbps)].concat();
            cpu("ffmpeg encode", &encode).saturating_sub(cpu("ffmpeg decode and scale", &scale))
        })
        .sum();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let floor = (decode_once + x264_work).as_secs_f64() / cores as f64;
    let busy = |m: &measure::Measured| m.cpu.as_secs_f64() / m.wall.as_secs_f64();
    println!(
        "(b) floor: one decode {:.2} s CPU + x264 for the ladder {:.2} s CPU, on {cores} cores all busy = {:.2} s -> wall ratio at best {:.2} (vidpipe's cores busy {:.2}, ffmpeg x4's {:.2})",
        decode_once.as_secs_f64(),
        x264_work.as_secs_f64(),
        floor,
        floor / per_rendition.wall.as_secs_f64(),
        busy(&ours),
        busy(&per_rendition),
    );
}

fn ffmpeg(source: &Path) -> Command {
    let mut c = Command::new("ffmpeg");
    c.args(["-y", "-hide_banner", "-loglevel", "error", "-i"])
        .arg(source);
    c
}

/// The child side: run our handler once on `source|out_dir`.
fn child(spec: &str) {
    let (source, out) = spec.split_once('|').expect("source|out");
    let job = TranscodeJob {
        job_id: uuid::Uuid::nil(),
        source: StorageKey::new("bench/source").unwrap(),
        output_prefix: StorageKey::new("bench/out/").unwrap(),
        renditions: Vec::new(),
        formats: vec![OutputFormat::Mp4],
        codecs: vec![shared::messages::VideoCodec::H264],
        segments: Default::default(),
        ladder: Default::default(),
        part: None,
    };
    shared::media::init();
    let ctx = JobContext::standalone(
        Path::new(source),
        &PathBuf::from(out),
        CancellationToken::new(),
    );
    TranscodeHandler::default()
        .handle(&job, &ctx)
        .expect("our transcode failed");
}
