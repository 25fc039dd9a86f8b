//! The fitted ladder's complexity probe: a few short samples spread over the source,
//! each rung encoded at two CRFs with the job's own x264 settings (the encoder of
//! [`crate::encode`]), decoded again and compared with the source in-process (luma SSIM
//! and PSNR, [`crate::quality`]), bytes counted. [`crate::fit`] chooses from the result.
//!
//! Cost: every rung encodes its samples twice (once per CRF) and decodes them again.
//! The samples (`fit_samples` of `fit_sample_secs`, 3 × 2 s by default) cover at most
//! `fit_max_share` of the source (5%), but at least one sample is taken: on sources of a
//! minute or more the probe encodes about a tenth of what the transcode does; a source
//! shorter than a sample is probed whole.

use std::path::Path;

use anyhow::Context as _;
use ffmpeg::{Packet, codec, format, frame, software::scaling};
use ffmpeg_next as ffmpeg;
use shared::JobContext;
use shared::media::{self, MediaLimits, Source, VideoDecoder, pipeline_error, seconds};

use crate::encode::{self, FrameClock};
use crate::fit::{Measured, RungProbe};
use crate::hls;
use crate::ladder::Planned;
use crate::pipeline::{VideoSetup, encoder_threads};
use crate::quality::{self, Plane};
use crate::settings::TranscoderSettings;

/// At most this many frames per sample (2 s at 30 fps): bounds the probe's memory
/// (the samples are held as pictures at the top rung's size) and time on high frame rates.
pub const MAX_SAMPLE_FRAMES: usize = 60;

/// Top-size SSIM is measured on every this many frames: it needs an upscale and a
/// comparison at the largest size per rung, and neighbouring frames say the same.
const TOP_EVERY: usize = 4;

/// The probe encodes without a cap (the cap is what it is there to choose): a maxrate
/// this high never binds.
const UNCAPPED_KBPS: u32 = 100_000;

/// What the probe measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Probed {
    /// One per planned rung, in plan order.
    pub probes: Vec<RungProbe>,
    /// Where the samples were: start and length, seconds.
    pub samples: Vec<(f64, f64)>,
    pub crfs: [u8; 2],
}

/// The two CRFs every rung is probed at: a little better than the transcoder's own and
/// a clearly worse one, inside the fitted range (validation keeps it 2 wide at least).
pub fn probe_crfs(cfg: &TranscoderSettings) -> [u8; 2] {
    let low = cfg
        .crf
        .saturating_sub(3)
        .clamp(cfg.fit_crf_min, cfg.fit_crf_max - 1);
    let high = (low + 8).min(cfg.fit_crf_max);
    [low, high]
}

/// Up to `count` windows of `secs` seconds spread evenly over `duration` seconds (each
/// in the middle of its share), together at most `max_share` of it (but at least one);
/// a source shorter than one window is one window, the whole source.
pub fn sample_windows(duration: f64, count: u32, secs: f64, max_share: f64) -> Vec<(f64, f64)> {
    let duration = if duration.is_finite() {
        duration.max(0.0)
    } else {
        0.0
    };
    if duration <= secs {
        return vec![(0.0, duration.max(secs))];
    }
    let fit = ((duration * max_share / secs).floor() as u32).clamp(1, count.max(1));
    let share = duration / f64::from(fit);
    (0..fit)
        .map(|k| {
            let start = (share * (f64::from(k) + 0.5) - secs / 2.0).clamp(0.0, duration - secs);
            ((start * 1000.0).round() / 1000.0, secs)
        })
        .collect()
}

/// Running sums of one rung at one CRF: its samples' comparisons added up, the seconds
/// they cover and the highest sample's bit rate.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    compared: Compared,
    seconds: f64,
    peak_kbps: f64,
}

impl Sums {
    /// Adds one sample of `seconds`, compared.
    fn add(&mut self, one: &Compared, seconds: f64) {
        let c = &mut self.compared;
        c.frames += one.frames;
        c.ssim += one.ssim;
        c.psnr += one.psnr;
        c.top_frames += one.top_frames;
        c.top_ssim += one.top_ssim;
        c.bytes += one.bytes;
        self.seconds += seconds;
        self.peak_kbps = self.peak_kbps.max(kbps(one.bytes, seconds));
    }

    fn measured(&self, crf: u8) -> Measured {
        let c = &self.compared;
        let n = c.frames.max(1) as f64;
        Measured {
            crf,
            ssim: c.ssim / n,
            psnr_db: c.psnr / n,
            top_ssim: c.top_ssim / c.top_frames.max(1) as f64,
            kbps: kbps(c.bytes, self.seconds),
            peak_kbps: self.peak_kbps,
        }
    }
}

fn kbps(bytes: u64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        bytes as f64 * 8.0 / seconds / 1000.0
    } else {
        0.0
    }
}

/// Probes every rung of `plan` on the source at `source`.
pub fn measure(
    source: &Path,
    plan: &[Planned],
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
    ctx: &JobContext,
) -> anyhow::Result<Probed> {
    let mut src = media::open(source, limits)?;
    let VideoSetup {
        decoder: mut vdec,
        mut upright,
        clock,
    } = VideoSetup::open(&src, cfg)?;
    let area = |p: &Planned| u64::from(p.width) * u64::from(p.height);
    let top = (0..plan.len())
        .max_by_key(|&i| (area(&plan[i]), std::cmp::Reverse(i)))
        .context("an empty ladder has nothing to probe")?;
    let samples = sample_windows(
        src.info.duration_s,
        cfg.fit_samples,
        cfg.fit_sample_secs,
        cfg.fit_max_share,
    );
    let crfs = probe_crfs(cfg);
    let frame_s = 1.0 / f64::from(clock.rate).max(1.0);
    let mut sums = vec![[Sums::default(); 2]; plan.len()];
    for &(start, secs) in &samples {
        ctx.check_cancelled()?;
        let (tw, th) = (plan[top].width, plan[top].height);
        let sample = Sample {
            start,
            secs,
            width: tw,
            height: th,
            clock,
        };
        let top_refs = sample.decode(&mut src, &mut vdec, upright.as_mut())?;
        if top_refs.is_empty() {
            continue;
        }
        let seconds = top_refs.len() as f64 * frame_s;
        for (i, rung) in plan.iter().enumerate() {
            let scaled;
            let refs = if (rung.width, rung.height) == (tw, th) {
                &top_refs
            } else {
                let mut scaler = Scaler::default();
                scaled = top_refs
                    .iter()
                    .map(|f| scaler.scale(f, rung.width, rung.height))
                    .collect::<anyhow::Result<Vec<_>>>()?;
                &scaled
            };
            for (k, &crf) in crfs.iter().enumerate() {
                ctx.check_cancelled()?;
                let one = encode_and_compare(rung, crf, refs, &top_refs, clock, cfg)
                    .with_context(|| format!("probing rendition {} at crf {crf}", rung.name))?;
                sums[i][k].add(&one, seconds);
            }
        }
    }
    if sums.iter().all(|s| s[0].compared.frames == 0) {
        return Err(shared::permanent(
            "the probe decoded no frames from the source",
        ));
    }
    let probes = sums
        .iter()
        .map(|s| RungProbe {
            low: s[0].measured(crfs[0]),
            high: s[1].measured(crfs[1]),
        })
        .collect();
    Ok(Probed {
        probes,
        samples,
        crfs,
    })
}

/// One sample window, decoded into pictures of the top rung's size.
struct Sample {
    start: f64,
    secs: f64,
    width: u32,
    height: u32,
    clock: FrameClock,
}

impl Sample {
    /// Seeks to the keyframe before the window, decodes to its end (at most
    /// [`MAX_SAMPLE_FRAMES`]), turns frames upright and scales them. Timestamps are made
    /// regular (one frame apart from 0): the encoder's rate control reads them.
    fn decode(
        &self,
        src: &mut Source,
        vdec: &mut VideoDecoder,
        mut upright: Option<&mut media::FrameGraph>,
    ) -> anyhow::Result<Vec<frame::Video>> {
        let origin = src.video_start_s();
        vdec.flush();
        // A source that cannot seek is read from its start; frames before the window
        // are skipped below either way.
        let _ = src.seek(origin + self.start);
        let (end, tb) = (self.start + self.secs, vdec.time_base);
        let step = encode::frame_duration(self.clock.rate, self.clock.time_base);
        let mut scaler = Scaler::default();
        let mut out: Vec<frame::Video> = Vec::new();
        let mut keep = |frame: &frame::Video, out: &mut Vec<frame::Video>| -> anyhow::Result<()> {
            let mut picture = scaler.scale(frame, self.width, self.height)?;
            picture.set_pts(Some(out.len() as i64 * step));
            out.push(picture);
            Ok(())
        };
        let mut packet = Packet::empty();
        let mut packets = src.packets();
        let mut frame = frame::Video::empty();
        let mut eof = false;
        while out.len() < MAX_SAMPLE_FRAMES {
            if !eof {
                match packets.read(&mut packet) {
                    Ok(true) if packet.stream() != vdec.stream_index => continue,
                    Ok(true) => vdec.send(&packet)?,
                    Ok(false) => {
                        vdec.send_eof();
                        eof = true;
                    }
                    Err(corrupt) => return Err(corrupt.error(None)),
                }
            }
            let mut past_end = false;
            let mut any = false;
            while out.len() < MAX_SAMPLE_FRAMES && vdec.receive(&mut frame)? {
                any = true;
                let t = frame.timestamp().map(|ts| seconds(ts, tb) - origin);
                if t.is_some_and(|t| t < self.start - 1e-3) {
                    continue;
                }
                if t.is_some_and(|t| t >= end - 1e-3) {
                    past_end = true;
                    break;
                }
                match upright.as_deref_mut() {
                    None => keep(&frame, &mut out)?,
                    Some(graph) => {
                        graph.push(&frame)?;
                        let mut up = frame::Video::empty();
                        while graph.pull(0, &mut up)? {
                            keep(&up, &mut out)?;
                        }
                    }
                }
            }
            if past_end || (eof && !any) {
                break;
            }
        }
        Ok(out)
    }
}

/// A swscale context (bilinear, to 4:2:0, as the pipeline scales), remade when the
/// input changes.
#[derive(Default)]
struct Scaler {
    ctx: Option<(scaling::Context, ScaleKey)>,
}

/// What a scaler was made for: input format, width, height; output width, height.
type ScaleKey = (format::Pixel, u32, u32, u32, u32);

impl Scaler {
    fn scale(&mut self, input: &frame::Video, w: u32, h: u32) -> anyhow::Result<frame::Video> {
        let key = (input.format(), input.width(), input.height(), w, h);
        if self.ctx.as_ref().is_none_or(|(_, k)| *k != key) {
            let ctx = scaling::Context::get(
                key.0,
                key.1,
                key.2,
                format::Pixel::YUV420P,
                w,
                h,
                scaling::Flags::BILINEAR,
            )
            .map_err(|e| pipeline_error("creating a scaler", e))?;
            self.ctx = Some((ctx, key));
        }
        let (ctx, _) = self.ctx.as_mut().expect("scaler just made");
        let mut out = frame::Video::new(format::Pixel::YUV420P, w, h);
        ctx.run(input, &mut out)
            .map_err(|e| pipeline_error("scaling", e))?;
        out.set_pts(input.pts());
        Ok(out)
    }
}

/// Sums of one sample encoded at one CRF.
#[derive(Debug, Clone, Copy, Default)]
struct Compared {
    frames: usize,
    ssim: f64,
    psnr: f64,
    top_frames: usize,
    top_ssim: f64,
    bytes: u64,
}

fn luma(f: &frame::Video) -> Plane<'_> {
    Plane {
        data: f.data(0),
        stride: f.stride(0),
        width: f.width() as usize,
        height: f.height() as usize,
    }
}

/// Encodes `refs` (the rung's pictures) at `crf` with the transcoder's x264 settings,
/// decodes the packets again and compares each picture with its reference; every
/// [`TOP_EVERY`]th also scaled up to the top size against `top_refs`.
fn encode_and_compare(
    rung: &Planned,
    crf: u8,
    refs: &[frame::Video],
    top_refs: &[frame::Video],
    clock: FrameClock,
    cfg: &TranscoderSettings,
) -> anyhow::Result<Compared> {
    let plan = Planned {
        crf: Some(crf),
        video_kbps: UNCAPPED_KBPS,
        ..rung.clone()
    };
    let threads = encoder_threads(std::slice::from_ref(&plan), cfg.threads)[0];
    let level = hls::h264_level(plan.width, plan.height, f64::from(clock.rate));
    let mut enc = encode::open_video_encoder(
        &plan,
        shared::messages::VideoCodec::H264,
        cfg,
        threads,
        clock.rate,
        clock.time_base,
        level,
    )?;
    let mut dec = codec::context::Context::from_parameters(codec::Parameters::from(&enc))
        .and_then(|c| c.decoder().video())
        .map_err(|e| pipeline_error("opening the probe's H.264 decoder", e))?;
    let mut out = Compared::default();
    let mut upscale = Scaler::default();
    let mut packet = Packet::empty();
    let mut decoded = frame::Video::empty();
    let mut compare = |dec: &mut ffmpeg::decoder::Video,
                       out: &mut Compared|
     -> anyhow::Result<()> {
        while dec.receive_frame(&mut decoded).is_ok() {
            let n = out.frames;
            let reference = refs
                .get(n)
                .context("the probe's decoder returned more frames than were encoded")?;
            out.ssim += quality::ssim(luma(reference), luma(&decoded));
            out.psnr += quality::psnr(luma(reference), luma(&decoded));
            if n.is_multiple_of(TOP_EVERY) {
                let top = &top_refs[n];
                let ssim = if (top.width(), top.height()) == (decoded.width(), decoded.height()) {
                    quality::ssim(luma(top), luma(&decoded))
                } else {
                    let up = upscale.scale(&decoded, top.width(), top.height())?;
                    quality::ssim(luma(top), luma(&up))
                };
                out.top_ssim += ssim;
                out.top_frames += 1;
            }
            out.frames += 1;
        }
        Ok(())
    };
    let mut drain = |enc: &mut ffmpeg::encoder::Video,
                     dec: &mut ffmpeg::decoder::Video,
                     out: &mut Compared|
     -> anyhow::Result<()> {
        while enc.receive_packet(&mut packet).is_ok() {
            out.bytes += packet.size() as u64;
            dec.send_packet(&packet)
                .map_err(|e| pipeline_error("decoding the probe's encode", e))?;
            compare(dec, out)?;
        }
        Ok(())
    };
    for picture in refs {
        enc.send_frame(picture)
            .map_err(|e| pipeline_error("encoding a probe sample", e))?;
        drain(&mut enc, &mut dec, &mut out)?;
    }
    enc.send_eof()
        .map_err(|e| pipeline_error("encoding a probe sample", e))?;
    drain(&mut enc, &mut dec, &mut out)?;
    let _ = dec.send_eof();
    compare(&mut dec, &mut out)?;
    anyhow::ensure!(
        out.frames == refs.len(),
        "the probe's encode of {} frames decoded to {}",
        refs.len(),
        out.frames
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_spread_over_the_source_within_their_share() {
        assert_eq!(
            sample_windows(60.0, 3, 2.0, 1.0),
            [(9.0, 2.0), (29.0, 2.0), (49.0, 2.0)]
        );
        // Three 2-second samples do not fit in 5 s without overlapping: two do.
        assert_eq!(sample_windows(5.0, 3, 2.0, 1.0), [(0.25, 2.0), (2.75, 2.0)]);
        // 5% of two minutes is 6 s: three samples; of one minute, one (in the middle).
        assert_eq!(sample_windows(120.0, 3, 2.0, 0.05).len(), 3);
        assert_eq!(sample_windows(60.0, 3, 2.0, 0.05), [(29.0, 2.0)]);
        // Shorter than a sample: the whole source, once.
        assert_eq!(sample_windows(1.5, 3, 2.0, 0.05), [(0.0, 2.0)]);
        assert_eq!(sample_windows(f64::NAN, 3, 2.0, 0.05), [(0.0, 2.0)]);
    }

    #[test]
    fn probe_crfs_straddle_the_transcoders_crf_inside_the_fitted_range() {
        let cfg = TranscoderSettings::default();
        assert_eq!(probe_crfs(&cfg), [20, 28]);
        let narrow = TranscoderSettings {
            crf: 40,
            fit_crf_min: 18,
            fit_crf_max: 24,
            ..cfg
        };
        assert_eq!(probe_crfs(&narrow), [23, 24]);
    }
}
