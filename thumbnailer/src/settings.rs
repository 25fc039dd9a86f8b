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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every binary checks settings against `KNOWN_KEYS`: it must hold exactly the
    /// thumbnailer's keys, or a valid one would stop a process.
    #[test]
    fn known_keys_list_the_thumbnailer_section() {
        let value = serde_json::to_value(ThumbnailerSettings::default()).unwrap();
        let mut from_struct: Vec<String> = value
            .as_object()
            .unwrap()
            .keys()
            .map(|k| format!("thumbnailer.{k}"))
            .collect();
        from_struct.sort();
        let mut listed: Vec<String> = shared::settings::KNOWN_KEYS
            .iter()
            .filter(|k| k.starts_with("thumbnailer."))
            .map(|k| (*k).to_owned())
            .collect();
        listed.sort();
        assert_eq!(listed, from_struct);
    }
}
