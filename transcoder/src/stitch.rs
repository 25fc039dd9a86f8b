//! STUB
use crate::encode::Finished;
use crate::ladder::Planned;
use crate::segments::{AudioPart, PartFile, SegmentRange};
use crate::settings::TranscoderSettings;
use shared::JobContext;
use shared::messages::OutputFormat;
pub fn stitch(
    _p: &[Planned],
    _f: &[OutputFormat],
    _r: &[SegmentRange],
    _v: &[Vec<PartFile>],
    _a: &[AudioPart],
    _c: &TranscoderSettings,
    _x: &JobContext,
) -> anyhow::Result<Vec<Finished>> {
    anyhow::bail!("stub")
}
