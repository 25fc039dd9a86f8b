//! The transcoder's own settings: `[transcoder]` in the settings file,
//! `VIDPIPE__TRANSCODER__*` in the environment.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TranscoderSettings {
    /// libx264 preset: `ultrafast` … `veryslow`. Slower is smaller at the same quality.
    pub preset: String,
    /// Constant rate factor (quality target, 0-51, lower is better); each rendition's
    /// `video_kbps` caps the peaks (VBV maxrate, buffer of twice that).
    pub crf: u8,
    /// Seconds between keyframes, the same in every rendition so players can switch
    /// between them at any segment boundary.
    pub keyframe_interval_s: f64,
    /// Target HLS segment length in seconds (segments are cut on keyframes).
    pub hls_segment_s: f64,
    /// Decoder and encoder threads; 0 = one per core.
    pub threads: usize,
    /// AAC sample rate of every output.
    pub audio_sample_rate: u32,
    /// Sources longer than this many seconds are split into segments encoded by many
    /// workers at once (unless the upload says `--segments off`).
    pub segment_threshold_secs: f64,
    /// About how long each segment is, in seconds (rounded to whole HLS segments).
    pub segment_secs: f64,
    /// Fitted ladder (`ladder: auto`, see [`crate::fit`]): the luma SSIM each rung's CRF
    /// is chosen to reach, measured at the rung's own size.
    pub fit_target_ssim: f64,
    /// The CRFs a fitted ladder may choose from, best first.
    pub fit_crf_min: u8,
    pub fit_crf_max: u8,
    /// Samples the probe encodes, spread over the source, and each one's length.
    pub fit_samples: u32,
    pub fit_sample_secs: f64,
    /// The samples cover at most this share of the source (at least one sample): what
    /// keeps the probe a small fraction of the encode on short sources.
    pub fit_max_share: f64,
    /// The highest cap a fitted rung may get, as a multiple of its rung's `video_kbps`:
    /// hard content may spend more than the fixed ladder's cap, but not without bound.
    pub fit_max_cap_ratio: f64,
    /// A rung is dropped when it beats the rung below by less than this (SSIM in dB,
    /// both measured at the top rung's size) while costing more bits.
    pub fit_min_gain_db: f64,
    /// libx265 preset of the `hevc` renditions (`codecs` of a job): the names of `preset`.
    pub hevc_preset: String,
    /// SVT-AV1 preset of the `av1` renditions: 0 (slowest, smallest) to 13 (fastest).
    pub av1_preset: u8,
}

impl Default for TranscoderSettings {
    fn default() -> Self {
        Self {
            preset: "veryfast".into(),
            crf: 23,
            keyframe_interval_s: 2.0,
            hls_segment_s: 4.0,
            threads: 0,
            audio_sample_rate: 48_000,
            segment_threshold_secs: 120.0,
            segment_secs: 30.0,
            fit_target_ssim: 0.99,
            fit_crf_min: 18,
            fit_crf_max: 32,
            fit_samples: 3,
            fit_sample_secs: 2.0,
            fit_max_share: 0.05,
            fit_max_cap_ratio: 2.0,
            fit_min_gain_db: 0.5,
            hevc_preset: "veryfast".into(),
            av1_preset: 10,
        }
    }
}

impl TranscoderSettings {
    /// Checks ranges once at start, so a typo stops the worker instead of every job.
    pub fn validate(&self) -> anyhow::Result<()> {
        const PRESETS: [&str; 10] = [
            "ultrafast",
            "superfast",
            "veryfast",
            "faster",
            "fast",
            "medium",
            "slow",
            "slower",
            "veryslow",
            "placebo",
        ];
        anyhow::ensure!(
            PRESETS.contains(&self.preset.as_str()),
            "transcoder.preset `{}` is not one of {}",
            self.preset,
            PRESETS.join(", ")
        );
        anyhow::ensure!(self.crf <= 51, "transcoder.crf {} is over 51", self.crf);
        // x265 takes x264's preset names (placebo included).
        anyhow::ensure!(
            PRESETS.contains(&self.hevc_preset.as_str()),
            "transcoder.hevc_preset `{}` is not one of {}",
            self.hevc_preset,
            PRESETS.join(", ")
        );
        anyhow::ensure!(
            self.av1_preset <= 13,
            "transcoder.av1_preset {} is over 13 (SVT-AV1's fastest)",
            self.av1_preset
        );
        anyhow::ensure!(
            (0.5..=10.0).contains(&self.keyframe_interval_s),
            "transcoder.keyframe_interval_s {} is outside 0.5..=10",
            self.keyframe_interval_s
        );
        anyhow::ensure!(
            self.hls_segment_s >= self.keyframe_interval_s && self.hls_segment_s <= 30.0,
            "transcoder.hls_segment_s {} must be between keyframe_interval_s and 30",
            self.hls_segment_s
        );
        anyhow::ensure!(
            [32_000, 44_100, 48_000].contains(&self.audio_sample_rate),
            "transcoder.audio_sample_rate {} is not 32000, 44100 or 48000",
            self.audio_sample_rate
        );
        anyhow::ensure!(
            self.segment_secs.is_finite() && self.segment_secs >= self.hls_segment_s,
            "transcoder.segment_secs {} must be at least hls_segment_s ({}): a segment is \
             whole HLS segments",
            self.segment_secs,
            self.hls_segment_s
        );
        anyhow::ensure!(
            self.segment_threshold_secs.is_finite()
                && self.segment_threshold_secs >= self.segment_secs,
            "transcoder.segment_threshold_secs {} must be at least segment_secs ({}): a \
             source shorter than two segments gains nothing from splitting",
            self.segment_threshold_secs,
            self.segment_secs
        );
        self.validate_fit()
    }

    /// The fitted ladder's settings: bounded, so a typo cannot make the probe encode for
    /// hours or choose a CRF outside what a part message may carry.
    fn validate_fit(&self) -> anyhow::Result<()> {
        use shared::messages::{MAX_FITTED_CRF, MIN_FITTED_CRF};
        anyhow::ensure!(
            (0.5..=0.9999).contains(&self.fit_target_ssim),
            "transcoder.fit_target_ssim {} is outside 0.5..=0.9999",
            self.fit_target_ssim
        );
        anyhow::ensure!(
            (MIN_FITTED_CRF..=MAX_FITTED_CRF).contains(&self.fit_crf_min)
                && (MIN_FITTED_CRF..=MAX_FITTED_CRF).contains(&self.fit_crf_max)
                && self.fit_crf_min + 2 <= self.fit_crf_max,
            "transcoder.fit_crf_min {} and fit_crf_max {} must lie in \
             {MIN_FITTED_CRF}..={MAX_FITTED_CRF}, at least 2 apart",
            self.fit_crf_min,
            self.fit_crf_max
        );
        anyhow::ensure!(
            (1..=10).contains(&self.fit_samples),
            "transcoder.fit_samples {} is outside 1..=10",
            self.fit_samples
        );
        anyhow::ensure!(
            (0.5..=10.0).contains(&self.fit_sample_secs),
            "transcoder.fit_sample_secs {} is outside 0.5..=10",
            self.fit_sample_secs
        );
        anyhow::ensure!(
            (0.01..=1.0).contains(&self.fit_max_share),
            "transcoder.fit_max_share {} is outside 0.01..=1",
            self.fit_max_share
        );
        anyhow::ensure!(
            (1.0..=10.0).contains(&self.fit_max_cap_ratio),
            "transcoder.fit_max_cap_ratio {} is outside 1..=10",
            self.fit_max_cap_ratio
        );
        anyhow::ensure!(
            (0.0..=10.0).contains(&self.fit_min_gain_db),
            "transcoder.fit_min_gain_db {} is outside 0..=10",
            self.fit_min_gain_db
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys of a section's defaults, as `section.field`.
    fn keys_of(section: &str, defaults: impl Serialize) -> Vec<String> {
        let value = serde_json::to_value(defaults).unwrap();
        let mut keys: Vec<String> = value
            .as_object()
            .unwrap()
            .keys()
            .map(|k| format!("{section}.{k}"))
            .collect();
        keys.sort();
        keys
    }

    fn listed(section: &str) -> Vec<String> {
        let mut keys: Vec<String> = shared::settings::KNOWN_KEYS
            .iter()
            .filter(|k| k.starts_with(&format!("{section}.")))
            .map(|k| (*k).to_owned())
            .collect();
        keys.sort();
        keys
    }

    #[test]
    fn fit_settings_out_of_range_are_refused() {
        let ok = TranscoderSettings::default();
        ok.validate().expect("defaults are valid");
        for (bad, says) in [
            (
                TranscoderSettings {
                    fit_crf_min: 30,
                    fit_crf_max: 20,
                    ..ok.clone()
                },
                "fit_crf_min",
            ),
            (
                TranscoderSettings {
                    fit_samples: 1000,
                    ..ok.clone()
                },
                "fit_samples",
            ),
            (
                TranscoderSettings {
                    fit_target_ssim: f64::NAN,
                    ..ok.clone()
                },
                "fit_target_ssim",
            ),
        ] {
            let err = bad.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn codec_presets_are_checked_at_start() {
        let with = |hevc: &str, av1: u8| TranscoderSettings {
            hevc_preset: hevc.into(),
            av1_preset: av1,
            ..TranscoderSettings::default()
        };
        assert!(with("slow", 4).validate().is_ok());
        let err = with("veryfst", 4).validate().unwrap_err().to_string();
        assert!(err.contains("transcoder.hevc_preset `veryfst`"), "{err}");
        let err = with("slow", 14).validate().unwrap_err().to_string();
        assert!(err.contains("transcoder.av1_preset 14 is over 13"), "{err}");
    }

    /// Every binary checks settings against `KNOWN_KEYS`: it must hold exactly the
    /// transcoder's and the media limits' keys, or a valid one would stop a process.
    #[test]
    fn known_keys_list_the_transcoder_and_media_sections() {
        assert_eq!(
            listed("transcoder"),
            keys_of("transcoder", TranscoderSettings::default())
        );
        assert_eq!(
            listed("media"),
            keys_of("media", shared::media::MediaLimits::default())
        );
    }
}
