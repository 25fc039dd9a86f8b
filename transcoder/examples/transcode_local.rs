//! Transcodes a local file into a directory with the worker's own pipeline and default
//! settings, without a broker or storage: for trying a problem source by hand.
//!
//! `cargo run --release -p transcoder --example transcode_local -- SOURCE OUT_DIR [mp4,hls,cmaf] [h264,hevc,av1]`

use std::path::PathBuf;

use shared::JobContext;
use shared::messages::{OutputFormat, TranscodeJob, VideoCodec};
use shared::storage_key::StorageKey;
use tokio_util::sync::CancellationToken;
use transcoder::TranscodeHandler;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(source), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: transcode_local SOURCE OUT_DIR [mp4,hls,cmaf] [h264,hevc,av1]");
    };
    let formats = args
        .next()
        .unwrap_or_else(|| "mp4,hls".into())
        .split(',')
        .map(|f| match f {
            "mp4" => Ok(OutputFormat::Mp4),
            "hls" => Ok(OutputFormat::Hls),
            "cmaf" => Ok(OutputFormat::Cmaf),
            other => Err(anyhow::anyhow!("unknown format {other}")),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let codecs = args
        .next()
        .unwrap_or_else(|| "h264".into())
        .split(',')
        .map(|c| VideoCodec::from_name(c).ok_or_else(|| anyhow::anyhow!("unknown codec {c}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    shared::media::init();
    let job = TranscodeJob {
        job_id: uuid::Uuid::nil(),
        source: StorageKey::new("local/source")?,
        output_prefix: StorageKey::new("local/out/")?,
        renditions: Vec::new(),
        formats,
        codecs,
        segments: Default::default(),
        ladder: Default::default(),
        part: None,
    };
    let ctx = JobContext::standalone(source.as_ref(), &out, CancellationToken::new());
    let handler = TranscodeHandler::default();
    let started = std::time::Instant::now();
    let output =
        shared::Handler::handle(&handler, &job, &ctx).map_err(|e| anyhow::anyhow!("{e}"))?;
    for f in &output.files {
        println!("{}  {}", f.name, f.meta);
    }
    println!("{:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}
