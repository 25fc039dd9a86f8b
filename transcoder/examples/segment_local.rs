//! Runs a segmented transcode of a local file the way the workers would (plan, every
//! segment, the audio, the stitch; one after the other, each in its own scratch
//! directory), without a broker or storage: for comparing it with `transcode_local` by
//! hand.
//!
//! `cargo run --release -p transcoder --example segment_local -- SOURCE OUT_DIR [SEGMENT_S]`

use std::path::PathBuf;
use std::time::Instant;

use shared::JobContext;
use shared::media::{self, MediaLimits};
use shared::messages::OutputFormat;
use tokio_util::sync::CancellationToken;
use transcoder::{
    SegmentParts, TranscoderSettings, encode_audio, encode_segment, ladder, plan_ranges, stitch,
};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(source), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: segment_local SOURCE OUT_DIR [SEGMENT_S]");
    };
    let segment_s: f64 = args.next().map_or(Ok(30.0), |s| s.parse())?;
    let (source, out) = (PathBuf::from(source), PathBuf::from(out));
    media::init();
    let cfg = TranscoderSettings::default();
    let limits = MediaLimits::default();
    let ctx = |dir: PathBuf| {
        std::fs::create_dir_all(&dir).expect("scratch directory");
        JobContext::standalone(&source, &dir, CancellationToken::new())
    };
    let info = media::open(&source, &limits)?.info;
    let (plan, _) = ladder::plan(&[], info.video.display_width, info.video.display_height);
    let started = Instant::now();
    let Some(ranges) = plan_ranges(&source, &limits, segment_s, cfg.hls_segment_s)? else {
        anyhow::bail!("this source is not split: transcode it in one pass");
    };
    println!(
        "plan: {} ranges, {:.2} s",
        ranges.len(),
        started.elapsed().as_secs_f64()
    );
    let mut segments = Vec::new();
    for r in ranges {
        let t = Instant::now();
        let parts = encode_segment(
            &source,
            &r,
            &plan,
            &cfg,
            &limits,
            &ctx(out.join(format!("parts/seg-{}", r.index))),
        )?;
        println!(
            "segment {} ({} frames): {:.2} s",
            r.index,
            r.frames,
            t.elapsed().as_secs_f64()
        );
        segments.push(SegmentParts { range: r, parts });
    }
    let t = Instant::now();
    let kbps: Vec<u32> = plan.iter().map(|p| p.audio_kbps).collect();
    let audio = encode_audio(&source, &kbps, &cfg, &limits, &ctx(out.join("parts/audio")))?;
    println!("audio: {:.2} s", t.elapsed().as_secs_f64());
    let t = Instant::now();
    let formats = [OutputFormat::Mp4, OutputFormat::Hls];
    let finished = stitch(&plan, &formats, &segments, &audio, &cfg, &ctx(out.clone()))?;
    println!("stitch: {:.2} s", t.elapsed().as_secs_f64());
    for f in &finished {
        for (_, path) in &f.files {
            println!("{}  {:.3} s", path.display(), f.duration_s);
        }
    }
    println!("total {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}
