//! STUB (replaced by the media-seg branch).
use crate::ladder::Planned;
use crate::settings::TranscoderSettings;
use serde::{Deserialize, Serialize};
use shared::JobContext;
use shared::media::MediaLimits;
use std::path::{Path, PathBuf};
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentRange {
    pub index: u32,
    pub start_s: f64,
    pub end_s: Option<f64>,
    pub frames: u64,
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartFile {
    pub rendition: String,
    pub path: PathBuf,
    pub frames: u64,
    pub first_pts: i64,
    pub last_pts: i64,
    pub time_base: (i32, i32),
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioPart {
    pub kbps: u32,
    pub path: PathBuf,
    pub packets: u64,
    pub first_pts: i64,
    pub last_pts: i64,
    pub time_base: (i32, i32),
}
pub fn plan_ranges(
    _s: &Path,
    _l: &MediaLimits,
    _seg: f64,
    _hls: f64,
) -> anyhow::Result<Option<Vec<SegmentRange>>> {
    Ok(None)
}
pub fn encode_segment(
    _s: &Path,
    _r: &SegmentRange,
    _p: &[Planned],
    _c: &TranscoderSettings,
    _l: &MediaLimits,
    _x: &JobContext,
) -> anyhow::Result<Vec<PartFile>> {
    anyhow::bail!("stub")
}
pub fn encode_audio(
    _s: &Path,
    _k: &[u32],
    _c: &TranscoderSettings,
    _l: &MediaLimits,
    _x: &JobContext,
) -> anyhow::Result<Vec<AudioPart>> {
    anyhow::bail!("stub")
}
