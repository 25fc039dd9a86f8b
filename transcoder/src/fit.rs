//! A ladder fitted to the content (`ladder: auto`, `producer upload --ladder auto`).
//!
//! A fixed ladder encodes every source at one CRF under one cap per rung: a slide deck
//! gets far more quality than anyone sees, while noise or fast motion hits the cap and is
//! starved. The fitted ladder runs a quick probe first ([`crate::probe`]: a few short
//! samples of the source, each rung encoded at two CRFs, luma SSIM/PSNR and bit rate
//! measured in-process) and then, per rung:
//!
//! - **CRF**: the one that reaches `transcoder.fit_target_ssim` at the rung's own size,
//!   interpolated between the two probe points (SSIM in dB is close to linear in CRF),
//!   within `fit_crf_min..=fit_crf_max`, rounded towards better quality;
//! - **cap** (VBV maxrate, buffer twice that, as the fixed ladder does): the highest
//!   sample's bit rate at that CRF with [`CAP_HEADROOM`], at most `fit_max_cap_ratio`
//!   times the rung's own `video_kbps`. Hard content gets room the fixed cap would deny
//!   it, and easy content a cap near what it needs, so an unsampled peak stays bounded;
//! - **drop**: a rung whose picture, scaled to the top rung's size, beats the next
//!   smaller kept rung's by less than `fit_min_gain_db` (SSIM dB) while costing more bits
//!   adds nothing and is left out. The smallest rung is always kept.
//!
//! The choice is pure ([`fit_ladder`], unit-tested); [`apply`] runs the probe and returns
//! the fitted plan with a report that goes into the task's manifest (`ladder_fit`). A
//! split transcode fits once, in its planner, and every part carries the fitted ladder.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;
use shared::JobContext;
use shared::media::MediaLimits;
use shared::messages::{LadderMode, TranscodeJob};

use crate::ladder::Planned;
use crate::probe;
use crate::quality::{ssim_db, ssim_of_db};
use crate::settings::TranscoderSettings;

/// The cap over the highest sample's bit rate: samples are a few seconds of the source,
/// and its hardest scene is likely not among them; the buffer (twice the cap) absorbs
/// short peaks on top.
pub const CAP_HEADROOM: f64 = 1.5;

/// The lowest and highest cap a fitted rung gets: the range of `video_kbps` a job (and a
/// part message) may carry, so a fitted plan always passes the parts' validation.
pub const MIN_CAP_KBPS: u32 = 50;
pub const MAX_CAP_KBPS: u32 = 100_000;

/// What the probe measured for one rung at one CRF, over every sample.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Measured {
    pub crf: u8,
    /// Mean luma SSIM at the rung's own size, against the source scaled to it.
    pub ssim: f64,
    /// Mean luma PSNR (dB) at the rung's own size.
    pub psnr_db: f64,
    /// Mean luma SSIM of the rung scaled up to the top rung's size, against the source
    /// at that size: comparable across rungs.
    pub top_ssim: f64,
    /// Mean bit rate over the samples, kbit/s.
    pub kbps: f64,
    /// The highest one sample had, kbit/s.
    pub peak_kbps: f64,
}

/// One rung's probe: the same samples at a better (`low`) and a worse (`high`) CRF.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RungProbe {
    pub low: Measured,
    pub high: Measured,
}

/// What a fitted rung encodes with, and what the probe predicts for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FittedRung {
    pub name: String,
    pub crf: u8,
    pub cap_kbps: u32,
    /// The probe's estimate at `crf`: SSIM and PSNR at the rung's size, SSIM at the top
    /// rung's size, mean bit rate.
    pub ssim: f64,
    pub psnr_db: f64,
    pub top_ssim: f64,
    pub kbps: f64,
    /// The two measured points the estimate comes from.
    pub probe: RungProbe,
}

/// A rung left out, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DroppedRung {
    pub name: String,
    pub reason: String,
}

/// What the manifest records of a fitted ladder (`ladder_fit`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitReport {
    pub target_ssim: f64,
    /// The samples encoded: start and length, seconds.
    pub samples: Vec<(f64, f64)>,
    pub probe_crfs: [u8; 2],
    /// Wall time of the probe, seconds.
    pub probe_s: f64,
    /// The kept rungs, in plan order.
    pub rungs: Vec<FittedRung>,
    pub dropped: Vec<DroppedRung>,
}

/// The rules of the choice, from the settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    pub target_ssim: f64,
    pub crf_min: u8,
    pub crf_max: u8,
    pub max_cap_ratio: f64,
    pub min_gain_db: f64,
}

impl Rules {
    pub fn of(cfg: &TranscoderSettings) -> Self {
        Self {
            target_ssim: cfg.fit_target_ssim,
            crf_min: cfg.fit_crf_min,
            crf_max: cfg.fit_crf_max,
            max_cap_ratio: cfg.fit_max_cap_ratio,
            min_gain_db: cfg.fit_min_gain_db,
        }
    }
}

/// The probe's estimate at `crf`: quality linear in CRF (SSIM and PSNR in dB), bit rate
/// log-linear (x264's rate roughly halves every 6 CRF), extrapolated past the points.
fn estimate(p: &RungProbe, crf: f64) -> Measured {
    let span = f64::from(p.high.crf) - f64::from(p.low.crf);
    let t = if span > 0.0 {
        (crf - f64::from(p.low.crf)) / span
    } else {
        0.0
    };
    let lin = |a: f64, b: f64| a + (b - a) * t;
    let log = |a: f64, b: f64| (a.max(1e-3).ln() + (b.max(1e-3).ln() - a.max(1e-3).ln()) * t).exp();
    let db = |f: fn(&Measured) -> f64| ssim_of_db(lin(ssim_db(f(&p.low)), ssim_db(f(&p.high))));
    Measured {
        crf: crf.round().clamp(0.0, 51.0) as u8,
        ssim: db(|m| m.ssim),
        psnr_db: lin(p.low.psnr_db, p.high.psnr_db),
        top_ssim: db(|m| m.top_ssim),
        kbps: log(p.low.kbps, p.high.kbps),
        peak_kbps: log(p.low.peak_kbps, p.high.peak_kbps),
    }
}

/// The CRF that reaches the target at this rung, within the rules' range.
pub fn choose_crf(p: &RungProbe, rules: &Rules) -> u8 {
    let target = ssim_db(rules.target_ssim);
    let (q_low, q_high) = (ssim_db(p.low.ssim), ssim_db(p.high.ssim));
    let span = f64::from(p.high.crf) - f64::from(p.low.crf);
    // Quality that does not fall as the CRF rises (a still picture x264 codes perfectly
    // either way) says nothing about the slope: the worst CRF if it is good enough.
    let crf = if span <= 0.0 || q_low - q_high < 0.01 {
        if q_high.min(q_low) >= target {
            f64::from(rules.crf_max)
        } else {
            f64::from(rules.crf_min)
        }
    } else {
        f64::from(p.low.crf) + (q_low - target) / (q_low - q_high) * span
    };
    // Rounded down: towards more quality, never below the target by rounding (the
    // epsilon keeps an exact hit, computed as 23.999…, at 24).
    (crf + 1e-6)
        .floor()
        .clamp(f64::from(rules.crf_min), f64::from(rules.crf_max)) as u8
}

/// One rung's CRF and cap (`rung_kbps`: the rung's own cap in the fixed ladder).
pub fn fit_rung(name: &str, p: &RungProbe, rung_kbps: u32, rules: &Rules) -> FittedRung {
    let crf = choose_crf(p, rules);
    let at = estimate(p, f64::from(crf));
    let ceiling = (f64::from(rung_kbps) * rules.max_cap_ratio)
        .clamp(f64::from(MIN_CAP_KBPS), f64::from(MAX_CAP_KBPS));
    let cap = (at.peak_kbps * CAP_HEADROOM)
        .clamp(f64::from(MIN_CAP_KBPS), ceiling)
        .round() as u32;
    FittedRung {
        name: name.to_owned(),
        crf,
        cap_kbps: cap,
        ssim: round(at.ssim, 5),
        psnr_db: round(at.psnr_db, 2),
        top_ssim: round(at.top_ssim, 5),
        kbps: round(at.kbps, 1),
        probe: *p,
    }
}

/// Fits every rung of `plan` (`probes[i]` is rung i's) and drops those that add
/// nothing: the fitted plan (plan order) and the report's rungs and drops.
pub fn fit_ladder(
    plan: &[Planned],
    probes: &[RungProbe],
    rules: &Rules,
) -> (Vec<Planned>, Vec<FittedRung>, Vec<DroppedRung>) {
    assert_eq!(plan.len(), probes.len(), "one probe per rung");
    let fitted: Vec<FittedRung> = plan
        .iter()
        .zip(probes)
        .map(|(r, p)| fit_rung(&r.name, p, r.video_kbps, rules))
        .collect();
    // Smallest picture first; each larger rung must earn its place over the last kept.
    let area = |r: &Planned| u64::from(r.width) * u64::from(r.height);
    let mut order: Vec<usize> = (0..plan.len()).collect();
    order.sort_by_key(|&i| (area(&plan[i]), std::cmp::Reverse(plan[i].video_kbps)));
    let mut keep = vec![false; plan.len()];
    let mut dropped = Vec::new();
    let mut below: Option<usize> = None;
    for i in order {
        let Some(b) = below else {
            keep[i] = true;
            below = Some(i);
            continue;
        };
        let (this, lower) = (&fitted[i], &fitted[b]);
        let gain = ssim_db(this.top_ssim) - ssim_db(lower.top_ssim);
        if gain < rules.min_gain_db && this.kbps > lower.kbps {
            dropped.push(DroppedRung {
                name: this.name.clone(),
                reason: format!(
                    "adds {gain:.2} dB SSIM over {} (less than {} dB) at {:.1}x its bits",
                    lower.name,
                    rules.min_gain_db,
                    this.kbps / lower.kbps.max(1e-3)
                ),
            });
        } else {
            keep[i] = true;
            below = Some(i);
        }
    }
    let mut planned = Vec::new();
    let mut rungs = Vec::new();
    for (i, (r, f)) in plan.iter().zip(fitted).enumerate() {
        if keep[i] {
            planned.push(Planned {
                video_kbps: f.cap_kbps,
                crf: Some(f.crf),
                ..r.clone()
            });
            rungs.push(f);
        }
    }
    (planned, rungs, dropped)
}

/// The plan the job encodes: `plan` itself for a fixed ladder; for `ladder: auto`, the
/// fitted one (the probe runs on `source`), with the report for the manifest.
pub fn apply(
    job: &TranscodeJob,
    plan: Vec<Planned>,
    source: &Path,
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
    ctx: &JobContext,
) -> anyhow::Result<(Vec<Planned>, Option<FitReport>)> {
    if job.ladder == LadderMode::Fixed || plan.is_empty() {
        return Ok((plan, None));
    }
    let started = Instant::now();
    let measured = probe::measure(source, &plan, cfg, limits, ctx)?;
    let rules = Rules::of(cfg);
    let (fitted, rungs, dropped) = fit_ladder(&plan, &measured.probes, &rules);
    let report = FitReport {
        target_ssim: rules.target_ssim,
        samples: measured.samples,
        probe_crfs: measured.crfs,
        probe_s: round(started.elapsed().as_secs_f64(), 3),
        rungs,
        dropped,
    };
    tracing::info!(
        probe_s = report.probe_s,
        rungs = %report
            .rungs
            .iter()
            .map(|r| format!("{} crf {} cap {}k", r.name, r.crf, r.cap_kbps))
            .collect::<Vec<_>>()
            .join(", "),
        dropped = report.dropped.len(),
        "fitted the ladder to the content"
    );
    Ok((fitted, Some(report)))
}

fn round(x: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    (x * scale).round() / scale
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        target_ssim: 0.99,
        crf_min: 18,
        crf_max: 32,
        max_cap_ratio: 2.0,
        min_gain_db: 0.5,
    };

    fn point(crf: u8, ssim: f64, top_ssim: f64, kbps: f64) -> Measured {
        Measured {
            crf,
            ssim,
            psnr_db: 40.0,
            top_ssim,
            kbps,
            peak_kbps: kbps * 1.2,
        }
    }

    fn rung(name: &str, width: u32, height: u32, video_kbps: u32) -> Planned {
        Planned {
            name: name.into(),
            width,
            height,
            video_kbps,
            audio_kbps: 96,
            crf: None,
        }
    }

    /// A still slide: near-perfect at both probe CRFs and cheap.
    fn easy() -> RungProbe {
        RungProbe {
            low: point(20, 0.9995, 0.9995, 60.0),
            high: point(28, 0.9987, 0.9987, 45.0),
        }
    }

    /// Noise: far below the target even at the better CRF, and expensive.
    fn hard() -> RungProbe {
        RungProbe {
            low: point(20, 0.95, 0.95, 9000.0),
            high: point(28, 0.68, 0.68, 3600.0),
        }
    }

    #[test]
    fn easy_content_gets_a_higher_crf_than_hard_content() {
        assert_eq!(choose_crf(&easy(), &RULES), RULES.crf_max);
        assert_eq!(choose_crf(&hard(), &RULES), RULES.crf_min);
    }

    #[test]
    fn the_crf_is_interpolated_to_the_target() {
        // 23 dB at CRF 20 and 17 dB at CRF 28: 20 dB (SSIM 0.99) is halfway, CRF 24.
        let p = RungProbe {
            low: point(20, ssim_of_db(23.0), 0.99, 800.0),
            high: point(28, ssim_of_db(17.0), 0.98, 400.0),
        };
        assert_eq!(choose_crf(&p, &RULES), 24);
        let f = fit_rung("360p", &p, 800, &RULES);
        assert!((f.ssim - 0.99).abs() < 1e-4, "{f:?}");
        // Bit rate halfway on the log scale: sqrt(800 * 400).
        assert!((f.kbps - 565.7).abs() < 0.2, "{f:?}");
    }

    #[test]
    fn hard_content_gets_a_higher_cap_than_easy_content() {
        let slide = fit_rung("360p", &easy(), 800, &RULES);
        let noise = fit_rung("360p", &hard(), 800, &RULES);
        assert!(
            noise.cap_kbps > 800,
            "not starved below the fixed cap: {noise:?}"
        );
        assert_eq!(noise.cap_kbps, 1600, "bounded by fit_max_cap_ratio");
        assert!(
            slide.cap_kbps < 800,
            "the easy cap is near what it needs: {slide:?}"
        );
        assert!(slide.cap_kbps >= MIN_CAP_KBPS);
        // Never past what a message may carry, whatever the rung asked.
        let mut heavy = hard();
        (heavy.low.peak_kbps, heavy.high.peak_kbps) = (500_000.0, 300_000.0);
        assert_eq!(
            fit_rung("8k", &heavy, 90_000, &RULES).cap_kbps,
            MAX_CAP_KBPS
        );
    }

    #[test]
    fn a_rung_that_adds_no_quality_is_dropped() {
        let plan = [
            rung("720p", 1280, 720, 2800),
            rung("480p", 854, 480, 1400),
            rung("360p", 640, 360, 800),
        ];
        let probes = [
            // 720p looks no better than 480p at the top size, at more bits: dropped.
            RungProbe {
                low: point(20, 0.995, 0.981, 900.0),
                high: point(28, 0.985, 0.975, 500.0),
            },
            RungProbe {
                low: point(20, 0.995, 0.980, 600.0),
                high: point(28, 0.985, 0.974, 300.0),
            },
            RungProbe {
                low: point(20, 0.995, 0.950, 400.0),
                high: point(28, 0.985, 0.940, 200.0),
            },
        ];
        let (planned, rungs, dropped) = fit_ladder(&plan, &probes, &RULES);
        let names: Vec<&str> = planned.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["480p", "360p"]);
        assert_eq!(rungs.len(), 2);
        assert_eq!(dropped.len(), 1);
        assert_eq!(dropped[0].name, "720p");
        assert!(dropped[0].reason.contains("over 480p"), "{dropped:?}");
        // What is kept encodes with the fitted CRF and cap.
        assert_eq!(planned[0].crf, Some(rungs[0].crf));
        assert_eq!(planned[0].video_kbps, rungs[0].cap_kbps);
    }

    #[test]
    fn the_smallest_rung_is_always_kept() {
        let plan = [rung("only", 640, 360, 800)];
        let (planned, _, dropped) = fit_ladder(&plan, &[easy()], &RULES);
        assert_eq!(planned.len(), 1);
        assert!(dropped.is_empty());
        // Two rungs of one quality: the cheaper smaller one stays.
        let plan = [rung("big", 1280, 720, 2800), rung("small", 640, 360, 800)];
        let mut probes = [easy(), easy()];
        probes[0].low.kbps = 120.0;
        probes[0].high.kbps = 90.0;
        let (planned, _, dropped) = fit_ladder(&plan, &probes, &RULES);
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].name, "small");
        assert_eq!(dropped[0].name, "big");
    }

    #[test]
    fn a_rung_that_costs_no_more_bits_is_kept() {
        let plan = [rung("big", 1280, 720, 2800), rung("small", 640, 360, 800)];
        // Same quality, but the larger one is no dearer: nothing to save by dropping it.
        let (planned, _, dropped) = fit_ladder(&plan, &[easy(), easy()], &RULES);
        assert_eq!(planned.len(), 2, "{dropped:?}");
    }
}
