//! Thumbnailer benchmark: our handler vs the `ffmpeg` CLI on a generated 1080p clip
//! (40 s). Prints wall-time and peak-memory ratios measured in this run; not a pass/fail
//! test.
//!
//! `cargo bench -p thumbnailer --bench thumbs` (release build).
//!
//! - 10 thumbnails at given times vs one `ffmpeg -ss T -i … -frames:v 1` per thumbnail
//!   (input seeking, the fast way to use the CLI);
//! - a sprite sheet (a tile every 2 s) vs the CLI's `fps,scale,tile` filter chain, on
//!   the clip above (keyframes 8.3 s apart, x264's default) and on the same picture with
//!   a keyframe every 2 s (phones, streaming encoders).
//!
//! Both sides run as child processes measured the same way: the benchmark re-runs itself
//! with `VIDPIPE_BENCH_CHILD` set to run our handler.

#[path = "../../benches/support/measure.rs"]
mod measure;

use std::path::Path;
use std::process::Command;

use shared::messages::ThumbnailJob;
use shared::{Handler, JobContext};
use thumbnailer::ThumbnailHandler;
use tokio_util::sync::CancellationToken;

const CHILD: &str = "VIDPIPE_BENCH_CHILD";
const SECONDS: u32 = 40;
const TIMES: [f64; 10] = [1.5, 5.2, 9.9, 13.1, 17.6, 21.0, 24.4, 29.7, 33.3, 38.8];

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        return child(&spec);
    }
    let dir = std::env::temp_dir().join("vidpipe-bench-thumbs");
    std::fs::create_dir_all(&dir).unwrap();
    let source = dir.join("source-1080p-40s.mp4");
    measure::clip(&source, SECONDS, "1920x1080");
    let out = |name: &str| {
        let d = dir.join(name);
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    // The same picture with a keyframe every 2 s, as phones and streaming encoders (and
    // our own transcoder) write them.
    let short_gop = dir.join("source-1080p-40s-gop2s.mp4");
    measure::clip_with(&short_gop, SECONDS, "1920x1080", &["-g", "60"]);
    let exe = std::env::current_exe().unwrap();
    let ours_on = |source: &Path, job: &str, name: &str| {
        let d = out(name);
        measure::best_of(3, name, || {
            let mut c = Command::new(&exe);
            c.env(CHILD, format!("{}|{}|{job}", source.display(), d.display()));
            c
        })
    };
    let ours = |job: &str, name: &str| ours_on(&source, job, name);

    let times: Vec<String> = TIMES.iter().map(|t| t.to_string()).collect();
    let thumbs_job = format!(
        r#"{{"poster":false,"timestamps":[{}],"width":320,"format":"jpeg"}}"#,
        times.join(",")
    );
    let our_thumbs = ours(&thumbs_job, "ours-thumbs");
    let cli_thumbs = {
        let d = out("cli-thumbs");
        let runs: Vec<measure::Measured> = TIMES
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let mut c = Command::new("ffmpeg");
                c.args([
                    "-y",
                    "-hide_banner",
                    "-loglevel",
                    "error",
                    "-ss",
                    &t.to_string(),
                    "-i",
                ])
                .arg(&source)
                .args(["-frames:v", "1", "-vf", "scale=320:-2", "-q:v", "3"])
                .arg(d.join(format!("{i}.jpg")));
                measure::run("ffmpeg thumbnail", &mut c)
            })
            .collect();
        measure::Measured::sequence(&runs)
    };

    let sprite_job =
        r#"{"poster":false,"count":0,"sprite":{"interval_s":2,"columns":10,"width":160}}"#;
    let our_sprite = ours(sprite_job, "ours-sprite");
    let fast_job = r#"{"poster":false,"count":0,"sprite":{"interval_s":2,"columns":10,"width":160,"keyframes_only":true}}"#;
    let our_fast_sprite = ours(fast_job, "ours-sprite-keyframes");
    let cli_sprite_on = |source: &Path| {
        let d = out("cli-sprite");
        measure::best_of(3, "ffmpeg tile", || {
            let mut c = Command::new("ffmpeg");
            c.args(["-y", "-hide_banner", "-loglevel", "error", "-i"])
                .arg(source)
                .args([
                    "-vf",
                    "fps=1/2,scale=160:-2,tile=10x2",
                    "-frames:v",
                    "1",
                    "-q:v",
                    "3",
                ])
                .arg(d.join("sheet.jpg"));
            c
        })
    };
    let cli_sprite = cli_sprite_on(&source);
    let our_short_gop_sprite = ours_on(&short_gop, sprite_job, "ours-sprite-gop2s");
    let cli_short_gop_sprite = cli_sprite_on(&short_gop);
    println!("thumbnailer on a {SECONDS} s 1080p clip");
    measure::report("10 thumbnails", our_thumbs, cli_thumbs, "ffmpeg -ss x10");
    measure::report(
        "sprite every 2 s",
        our_sprite,
        cli_sprite,
        "ffmpeg fps,scale,tile",
    );
    measure::report(
        "sprite every 2 s, source with a keyframe every 2 s",
        our_short_gop_sprite,
        cli_short_gop_sprite,
        "ffmpeg fps,scale,tile",
    );
    measure::report(
        "sprite, keyframes only",
        our_fast_sprite,
        cli_sprite,
        "ffmpeg fps,scale,tile",
    );
}

/// The child side: run our handler once on `source|out_dir|job_fields_json`.
fn child(spec: &str) {
    let mut parts = spec.splitn(3, '|');
    let (source, out, fields) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let mut job: serde_json::Value = serde_json::from_str(fields).unwrap();
    let map = job.as_object_mut().unwrap();
    map.insert("job_id".into(), uuid::Uuid::nil().to_string().into());
    map.insert("source".into(), "bench/source".into());
    map.insert("output_prefix".into(), "bench/out/".into());
    let job: ThumbnailJob = serde_json::from_value(job).unwrap();
    shared::media::init();
    let ctx = JobContext::standalone(Path::new(source), Path::new(out), CancellationToken::new());
    ThumbnailHandler::default()
        .handle(&job, &ctx)
        .expect("our thumbnail job failed");
}
