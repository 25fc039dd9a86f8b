//! The thumbnailer's own settings: `[thumbnailer]` in the settings file,
//! `VIDPIPE__THUMBNAILER__*` in the environment.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ThumbnailerSettings {
    /// Decoder threads; 0 = one per core.
    pub threads: usize,
    /// Tallest sprite sheet in pixels; longer videos get several sheets.
    pub max_sheet_height: u32,
    /// Frames considered for the poster (spread over the first half of the video).
    pub poster_candidates: u32,
}

impl Default for ThumbnailerSettings {
    fn default() -> Self {
        Self {
            threads: 0,
            max_sheet_height: 4096,
            poster_candidates: 6,
        }
    }
}

impl ThumbnailerSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (256..=16384).contains(&self.max_sheet_height),
            "thumbnailer.max_sheet_height {} is outside 256..=16384",
            self.max_sheet_height
        );
        anyhow::ensure!(
            (1..=50).contains(&self.poster_candidates),
            "thumbnailer.poster_candidates {} is outside 1..=50",
            self.poster_candidates
        );
        Ok(())
    }
}
