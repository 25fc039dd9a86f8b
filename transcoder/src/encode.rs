//! One rendition's video encoder and muxers (libx264; each packet written to every
//! container the job asked for (MP4 with the index at the front, and/or an HLS
//! media playlist with MPEG-TS segments). Encoding once per rendition and muxing twice is
//! what keeps MP4 and HLS frame-identical and costs one encode, not two.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ffmpeg::{ChannelLayout, Dictionary, Packet, Rational, codec, encoder, format, frame};
use ffmpeg_next as ffmpeg;
use shared::media::{pipeline_error, seconds};
use shared::messages::OutputFormat;
use shared::permanent;

use crate::hls;
use crate::ladder::Planned;
use crate::settings::TranscoderSettings;

/// The AAC encoder's frame size: the audio filter graph cuts frames to exactly this.
pub const AAC_FRAME_SIZE: u32 = 1024;

/// A container being written.
struct Muxer {
    kind: OutputFormat,
    ctx: format::context::Output,
    path: PathBuf,
    video_tb: Rational,
    audio_tb: Rational,
}

/// Everything one rendition writes.
pub struct RenditionOutput {
    pub plan: Planned,
    pub level: u32,
    video: encoder::Video,
    video_tb: Rational,
    /// One frame at the nominal rate, in `video_tb`: the duration of packets the encoder
    /// leaves without one (the last frame would otherwise have none, and the output would
    /// be a frame short).
    frame_duration: i64,
    /// Time base of the AAC packets this rendition muxes (encoded by an [`AudioEncoder`]
    /// shared by the renditions of one audio bit rate).
    audio: Option<Rational>,
    muxers: Vec<Muxer>,
    /// End of the last video packet, seconds.
    video_end_s: f64,
}

/// What a finished rendition wrote.
pub struct Finished {
    pub plan: Planned,
    pub level: u32,
    pub duration_s: f64,
    pub has_audio: bool,
    /// `(format, path)` of each container's main file (the MP4, or the media playlist).
    pub files: Vec<(OutputFormat, PathBuf)>,
}

/// The video frames a rendition is fed: their nominal rate, and the time base of their
/// timestamps (the decoder's, or the rotation filter graph's).
#[derive(Debug, Clone, Copy)]
pub struct FrameClock {
    pub rate: Rational,
    pub time_base: Rational,
}

impl RenditionOutput {
    /// Opens the encoders (x264 with `threads` threads) and writes each container's
    /// header.
    pub fn open(
        plan: Planned,
        cfg: &TranscoderSettings,
        threads: usize,
        clock: FrameClock,
        audio: Option<&AudioEncoder>,
        formats: &[OutputFormat],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let (frame_rate, video_tb) = (clock.rate, clock.time_base);
        let fps = f64::from(frame_rate);
        let level = hls::h264_level(plan.width, plan.height, fps);
        let video = open_video_encoder(&plan, cfg, threads, frame_rate, video_tb, level)?;
        let mut muxers = Vec::new();
        for &kind in formats {
            let (path, fmt, opts) = match kind {
                OutputFormat::Mp4 => {
                    let mut o = Dictionary::new();
                    // The index (moov) at the front: plays while still downloading.
                    o.set("movflags", "+faststart");
                    (dir.join(format!("{}.mp4", plan.name)), "mp4", o)
                }
                OutputFormat::Hls => {
                    let hls_dir = dir.join("hls").join(&plan.name);
                    std::fs::create_dir_all(&hls_dir).context("scratch space")?;
                    let mut o = Dictionary::new();
                    o.set("hls_time", &format!("{}", cfg.hls_segment_s));
                    o.set("hls_list_size", "0");
                    o.set("hls_playlist_type", "vod");
                    o.set("hls_flags", "independent_segments");
                    o.set(
                        "hls_segment_filename",
                        &hls_dir.join("seg_%05d.ts").to_string_lossy(),
                    );
                    (hls_dir.join("index.m3u8"), "hls", o)
                }
            };
            let mut ctx = format::output_as(&path, fmt)
                .map_err(|e| pipeline_error(&format!("creating {}", path.display()), e))?;
            {
                let mut ost = ctx
                    .add_stream(encoder::find_by_name("libx264"))
                    .map_err(|e| pipeline_error("adding the video stream", e))?;
                ost.set_parameters(&video);
                ost.set_time_base(video_tb);
            }
            if let Some(a) = audio {
                let mut ost = ctx
                    .add_stream(encoder::find(codec::Id::AAC))
                    .map_err(|e| pipeline_error("adding the audio stream", e))?;
                ost.set_parameters(&a.encoder);
                ost.set_time_base(a.time_base);
            }
            ctx.write_header_with(opts)
                .map_err(|e| pipeline_error(&format!("writing the {fmt} header"), e))?;
            let video_tb = ctx.stream(0).map_or(video_tb, |s| s.time_base());
            let audio_tb = ctx.stream(1).map_or(Rational::new(1, 1), |s| s.time_base());
            muxers.push(Muxer {
                kind,
                ctx,
                path,
                video_tb,
                audio_tb,
            });
        }
        let frame_duration = shared::media::timestamp(1.0 / fps.max(1.0), video_tb).max(1);
        Ok(Self {
            plan,
            level,
            video,
            video_tb,
            frame_duration,
            audio: audio.map(|a| a.time_base),
            muxers,
            video_end_s: 0.0,
        })
    }

    /// Encodes one scaled frame; `None` drains the encoder at the end.
    pub fn encode_video(&mut self, frame: Option<&frame::Video>) -> anyhow::Result<()> {
        let sent = match frame {
            Some(f) => self.video.send_frame(f),
            None => self.video.send_eof(),
        };
        sent.map_err(|e| pipeline_error("encoding video", e))?;
        let mut packet = Packet::empty();
        while self.video.receive_packet(&mut packet).is_ok() {
            if packet.duration() <= 0 {
                packet.set_duration(self.frame_duration);
            }
            if let Some(pts) = packet.pts() {
                let end = seconds(pts + packet.duration().max(0), self.video_tb);
                self.video_end_s = self.video_end_s.max(end);
            }
            self.write(&packet, false)?;
        }
        Ok(())
    }

    /// Muxes one AAC packet from this rendition's [`AudioEncoder`].
    pub fn write_audio(&mut self, packet: &Packet) -> anyhow::Result<()> {
        if self.audio.is_none() {
            return Ok(());
        }
        self.write(packet, true)
    }

    fn write(&mut self, packet: &Packet, audio: bool) -> anyhow::Result<()> {
        let enc_tb = if audio {
            self.audio.unwrap_or(self.video_tb)
        } else {
            self.video_tb
        };
        for m in &mut self.muxers {
            let mut p = packet.clone();
            let (index, tb) = if audio {
                (1, m.audio_tb)
            } else {
                (0, m.video_tb)
            };
            p.set_stream(index);
            p.set_position(-1);
            p.rescale_ts(enc_tb, tb);
            p.write_interleaved(&mut m.ctx)
                .map_err(|e| pipeline_error(&format!("writing {}", m.path.display()), e))?;
        }
        Ok(())
    }

    /// Drains the encoders and closes every container.
    pub fn finish(mut self) -> anyhow::Result<Finished> {
        self.encode_video(None)?;
        let mut files = Vec::new();
        for m in &mut self.muxers {
            m.ctx
                .write_trailer()
                .map_err(|e| pipeline_error(&format!("finishing {}", m.path.display()), e))?;
            files.push((m.kind, m.path.clone()));
        }
        Ok(Finished {
            plan: self.plan,
            level: self.level,
            duration_s: self.video_end_s,
            has_audio: self.audio.is_some(),
            files,
        })
    }
}

fn open_video_encoder(
    plan: &Planned,
    cfg: &TranscoderSettings,
    threads: usize,
    frame_rate: Rational,
    time_base: Rational,
    level: u32,
) -> anyhow::Result<encoder::Video> {
    let codec = encoder::find_by_name("libx264")
        .ok_or_else(|| permanent("this FFmpeg build has no libx264 encoder"))?;
    let ctx = codec::context::Context::new_with_codec(codec);
    let mut enc = ctx
        .encoder()
        .video()
        .map_err(|e| pipeline_error("creating the H.264 encoder", e))?;
    enc.set_width(plan.width);
    enc.set_height(plan.height);
    enc.set_format(format::Pixel::YUV420P);
    enc.set_time_base(time_base);
    enc.set_frame_rate(Some(frame_rate));
    enc.set_aspect_ratio(Rational::new(1, 1));
    let fps = f64::from(frame_rate).max(1.0);
    let gop = (fps * cfg.keyframe_interval_s).round().max(1.0) as u32;
    enc.set_gop(gop);
    // Extradata (SPS/PPS) out of band: MP4 needs it; the TS muxer re-inserts it in band.
    enc.set_flags(codec::Flags::GLOBAL_HEADER);
    let kbps = plan.video_kbps;
    enc.set_max_bit_rate(kbps as usize * 1000);
    let mut opts = Dictionary::new();
    // x264 runs its own frame-parallel threads; the pipeline gives each rendition its
    // share (see `pipeline::encoder_threads`).
    opts.set("threads", &threads.to_string());
    opts.set("preset", &cfg.preset);
    opts.set("crf", &cfg.crf.to_string());
    opts.set("maxrate", &format!("{kbps}k"));
    opts.set("bufsize", &format!("{}k", kbps * 2));
    opts.set("profile", "high");
    opts.set("level", &format!("{}.{}", level / 10, level % 10));
    // Fixed GOP, no scene-cut keyframes, closed GOPs: every rendition gets keyframes on
    // the same frames, so HLS segments line up across the ladder.
    opts.set(
        "x264-params",
        &format!("keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0"),
    );
    enc.open_as_with(codec, opts)
        .map_err(|e| pipeline_error("opening the H.264 encoder", e))
}

/// An AAC encoder (48 kHz stereo by default), one per distinct audio bit rate of the
/// ladder: renditions with the same audio share its packets instead of encoding the same
/// sound again.
pub struct AudioEncoder {
    pub kbps: u32,
    encoder: encoder::Audio,
    pub time_base: Rational,
}

impl AudioEncoder {
    pub fn open(kbps: u32, rate: u32) -> anyhow::Result<Self> {
        let codec = encoder::find(codec::Id::AAC)
            .ok_or_else(|| permanent("this FFmpeg build has no AAC encoder"))?;
        let mut enc = codec::context::Context::new_with_codec(codec)
            .encoder()
            .audio()
            .map_err(|e| pipeline_error("creating the AAC encoder", e))?;
        enc.set_rate(rate as i32);
        enc.set_channel_layout(ChannelLayout::STEREO);
        enc.set_channels(2);
        enc.set_format(format::Sample::F32(format::sample::Type::Planar));
        enc.set_bit_rate(kbps as usize * 1000);
        let time_base = Rational::new(1, rate as i32);
        enc.set_time_base(time_base);
        enc.set_flags(codec::Flags::GLOBAL_HEADER);
        let encoder = enc
            .open_as(codec)
            .map_err(|e| pipeline_error("opening the AAC encoder", e))?;
        Ok(Self {
            kbps,
            encoder,
            time_base,
        })
    }

    /// Encodes one frame ([`AAC_FRAME_SIZE`] samples of 48 kHz stereo); `None` drains.
    /// Returns the packets that came out.
    pub fn encode(&mut self, frame: Option<&frame::Audio>) -> anyhow::Result<Vec<Packet>> {
        let sent = match frame {
            Some(f) => self.encoder.send_frame(f),
            None => self.encoder.send_eof(),
        };
        sent.map_err(|e| pipeline_error("encoding audio", e))?;
        let mut packets = Vec::new();
        let mut packet = Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packets.push(packet.clone());
        }
        Ok(packets)
    }
}
