//! Runs the thumbnail pipeline on a local file without a broker or storage: for trying a
//! problem source by hand.
//!
//! `cargo run --release -p thumbnailer --example thumbnail_local -- SOURCE OUT_DIR [JOB_JSON]`
//! where JOB_JSON holds thumbnail job fields, e.g. `{"count":4,"sprite":{"interval_s":1,"columns":5,"width":120}}`.

use std::path::PathBuf;

use shared::JobContext;
use shared::messages::ThumbnailJob;
use thumbnailer::ThumbnailHandler;
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(source), Some(out)) = (args.next(), args.next()) else {
        anyhow::bail!("usage: thumbnail_local SOURCE OUT_DIR [JOB_JSON]");
    };
    let mut fields: serde_json::Value =
        serde_json::from_str(&args.next().unwrap_or_else(|| "{}".into()))?;
    let map = fields
        .as_object_mut()
        .ok_or_else(|| anyhow::anyhow!("JOB_JSON must be an object"))?;
    map.insert("job_id".into(), uuid::Uuid::nil().to_string().into());
    map.insert("source".into(), "local/source".into());
    map.insert("output_prefix".into(), "local/out/".into());
    let job: ThumbnailJob = serde_json::from_value(fields)?;
    let out = PathBuf::from(out);
    std::fs::create_dir_all(&out)?;
    shared::media::init();
    let ctx = JobContext::standalone(source.as_ref(), &out, CancellationToken::new());
    let started = std::time::Instant::now();
    let output = shared::Handler::handle(&ThumbnailHandler::default(), &job, &ctx)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for f in &output.files {
        println!("{}  {}", f.name, f.meta);
    }
    println!("{}", output.summary["frames_decoded"]);
    println!("{:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}
