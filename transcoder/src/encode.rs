//! One rendition's video encoder and muxers (libx264, or libx265 / SVT-AV1 for a job's
//! other codecs; each packet written to every container the job asked for that carries
//! the codec: MP4 with the index at the front, an HLS media playlist
//! with MPEG-TS segments, and/or a CMAF rendition of fMP4 segments). Encoding once per
//! rendition and muxing into each is what keeps the formats frame-identical and costs one
//! encode, not one per format.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ffmpeg::{ChannelLayout, Dictionary, Packet, Rational, codec, encoder, format, frame};
use ffmpeg_next as ffmpeg;
use shared::media::{pipeline_error, seconds};
use shared::messages::{OutputFormat, VideoCodec};
use shared::permanent;

use crate::cmaf;
use crate::hls;
use crate::ladder::Planned;
use crate::parts::{PartInfo, PartWriter, set_codec_tag};
use crate::settings::TranscoderSettings;

/// The AAC encoder's frame size: the audio filter graph cuts frames to exactly this.
pub const AAC_FRAME_SIZE: u32 = 1024;

/// A container being written.
struct Muxer {
    kind: OutputFormat,
    ctx: format::context::Output,
    path: PathBuf,
    /// The container's video stream (index, time base), if it has one.
    video: Option<(usize, Rational)>,
    /// The container's audio stream (index, time base), if it has one.
    audio: Option<(usize, Rational)>,
}

/// One rendition's MP4, HLS and/or CMAF containers: what the single pass writes its
/// encoders' packets into, and what the stitch of a segmented transcode copies the
/// segments' packets into (so both make the same files, with the same muxer options).
/// A CMAF rendition is video only: its sound is the audio rendition's
/// ([`Muxers::open_cmaf_audio`]), written once for the whole ladder.
pub(crate) struct Muxers {
    muxers: Vec<Muxer>,
}

/// A stream to add to a container: its codec parameters and timestamps' time base.
type StreamSpec<'a> = (&'a codec::Parameters, Rational);

impl Muxers {
    /// Writes the header of each container `formats` asks for, under `dir`, with a video
    /// stream of `video` (timestamps in `video_tb`) and an audio stream of `audio`.
    pub(crate) fn open(
        name: &str,
        cfg: &TranscoderSettings,
        video: &codec::Parameters,
        video_tb: Rational,
        audio: Option<StreamSpec<'_>>,
        formats: &[OutputFormat],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut muxers = Vec::new();
        for &kind in formats {
            let (path, fmt, opts, audio) = match kind {
                OutputFormat::Mp4 => {
                    let mut o = Dictionary::new();
                    // The index (moov) at the front: plays while still downloading.
                    o.set("movflags", "+faststart");
                    (dir.join(format!("{name}.mp4")), "mp4", o, audio)
                }
                OutputFormat::Hls => {
                    let (path, o) = hls_options(cfg, &dir.join("hls").join(name), false)?;
                    (path, "hls", o, audio)
                }
                OutputFormat::Cmaf => {
                    let (path, o) = hls_options(cfg, &cmaf::video_dir(dir, name), true)?;
                    (path, "hls", o, None)
                }
            };
            muxers.push(Muxer::open(
                kind,
                path,
                fmt,
                opts,
                Some((video, video_tb)),
                audio,
            )?);
        }
        Ok(Self { muxers })
    }

    /// The CMAF audio rendition under `dir`: fMP4 segments of `audio`'s packets, the
    /// sound every CMAF video rendition plays with.
    pub(crate) fn open_cmaf_audio(
        cfg: &TranscoderSettings,
        audio: StreamSpec<'_>,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let (path, o) = hls_options(cfg, &cmaf::audio_dir(dir), true)?;
        let muxer = Muxer::open(OutputFormat::Cmaf, path, "hls", o, None, Some(audio))?;
        Ok(Self {
            muxers: vec![muxer],
        })
    }

    /// Writes one packet (timestamps in `tb`) to every container: the video stream's, or
    /// with `audio` the audio stream's.
    pub(crate) fn write(
        &mut self,
        packet: &Packet,
        audio: bool,
        tb: Rational,
    ) -> anyhow::Result<()> {
        for m in &mut self.muxers {
            // A CMAF video rendition has no audio stream (the audio rendition has it).
            let Some((index, to)) = (if audio { m.audio } else { m.video }) else {
                continue;
            };
            let mut p = packet.clone();
            p.set_stream(index);
            p.set_position(-1);
            p.rescale_ts(tb, to);
            p.write_interleaved(&mut m.ctx)
                .map_err(|e| pipeline_error(&format!("writing {}", m.path.display()), e))?;
        }
        Ok(())
    }

    /// Closes every container: `(format, path)` of each one's main file.
    pub(crate) fn finish(mut self) -> anyhow::Result<Vec<(OutputFormat, PathBuf)>> {
        let mut files = Vec::new();
        for m in &mut self.muxers {
            m.ctx
                .write_trailer()
                .map_err(|e| pipeline_error(&format!("finishing {}", m.path.display()), e))?;
            files.push((m.kind, m.path.clone()));
        }
        Ok(files)
    }
}

impl Muxer {
    /// Creates `path` as a `fmt` container with the given streams (video first) and
    /// writes its header.
    fn open(
        kind: OutputFormat,
        path: PathBuf,
        fmt: &str,
        opts: Dictionary,
        video: Option<StreamSpec<'_>>,
        audio: Option<StreamSpec<'_>>,
    ) -> anyhow::Result<Self> {
        let mut ctx = format::output_as(&path, fmt)
            .map_err(|e| pipeline_error(&format!("creating {}", path.display()), e))?;
        let mut indices = [None, None];
        for (slot, spec, what) in [(0, video, "video"), (1, audio, "audio")] {
            let Some((params, tb)) = spec else { continue };
            let mut ost = ctx
                .add_stream(encoder::find(params.id()))
                .map_err(|e| pipeline_error(&format!("adding the {what} stream"), e))?;
            let mut params = params.clone();
            // HEVC as `hvc1` (parameter sets in the sample entry only): what Apple's
            // players require; FFmpeg's default `hev1` they refuse.
            if params.id() == codec::Id::HEVC {
                set_codec_tag(&mut params, u32::from_le_bytes(*b"hvc1"));
            }
            ost.set_parameters(params);
            ost.set_time_base(tb);
            indices[slot] = Some(ost.index());
        }
        ctx.write_header_with(opts)
            .map_err(|e| pipeline_error(&format!("writing the {fmt} header"), e))?;
        // The muxer may pick its own time base per stream while writing the header.
        let tb_of = |i: Option<usize>| {
            i.map(|i| {
                (
                    i,
                    ctx.stream(i).map_or(Rational::new(1, 1), |s| s.time_base()),
                )
            })
        };
        let (video, audio) = (tb_of(indices[0]), tb_of(indices[1]));
        Ok(Self {
            kind,
            ctx,
            path,
            video,
            audio,
        })
    }
}

/// The `hls` muxer's options for a VOD media playlist `index.m3u8` in `dir` (made here),
/// cut into `hls_segment_s` segments on keyframes: MPEG-TS segments, or with `fmp4` an
/// `init.mp4` and `.m4s` fragments (what CMAF serves to HLS and DASH alike).
fn hls_options(
    cfg: &TranscoderSettings,
    dir: &Path,
    fmp4: bool,
) -> anyhow::Result<(PathBuf, Dictionary<'static>)> {
    std::fs::create_dir_all(dir).context("scratch space")?;
    let mut o = Dictionary::new();
    o.set("hls_time", &format!("{}", cfg.hls_segment_s));
    o.set("hls_list_size", "0");
    o.set("hls_playlist_type", "vod");
    o.set("hls_flags", "independent_segments");
    let segment = if fmp4 {
        o.set("hls_segment_type", "fmp4");
        // Beside the playlist (the muxer puts it in the playlist's directory).
        o.set("hls_fmp4_init_filename", cmaf::INIT);
        "seg_%05d.m4s"
    } else {
        "seg_%05d.ts"
    };
    o.set("hls_segment_filename", &dir.join(segment).to_string_lossy());
    Ok((dir.join("index.m3u8"), o))
}

/// Everything one rendition writes: the MP4/HLS containers of a single pass, or (for one
/// segment of a segmented transcode) a video-only part file.
pub struct RenditionOutput {
    pub plan: Planned,
    pub codec: VideoCodec,
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
    muxers: Muxers,
    /// The segment's part file, when this is one segment of a segmented transcode.
    part: Option<PartWriter>,
    /// End of the last video packet, seconds.
    video_end_s: f64,
    /// What came out of the video encoder: packets, first and last timestamps.
    stats: PacketStats,
}

/// What a finished rendition wrote.
pub struct Finished {
    pub plan: Planned,
    pub codec: VideoCodec,
    /// The H.264 level asked of x264 (H.264 renditions only).
    pub level: u32,
    pub duration_s: f64,
    pub has_audio: bool,
    /// `(format, path)` of each container's main file (the MP4, or the media playlist).
    pub files: Vec<(OutputFormat, PathBuf)>,
    /// The part file, for one segment of a segmented transcode.
    pub part: Option<PartInfo>,
    /// Video packets written, with their first and last presentation timestamps (in the
    /// encoder's time base, the frames' own).
    pub video: PacketStats,
}

/// Packets written to one stream and where they start and end, in its time base.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PacketStats {
    pub packets: u64,
    pub first_pts: Option<i64>,
    pub last_pts: Option<i64>,
    /// The end of the latest packet: its timestamp plus its duration.
    pub end_pts: Option<i64>,
}

impl PacketStats {
    /// Counts `packet` in.
    pub fn add(&mut self, packet: &Packet) {
        self.packets += 1;
        if let Some(pts) = packet.pts() {
            self.first_pts = Some(self.first_pts.map_or(pts, |f| f.min(pts)));
            self.last_pts = Some(self.last_pts.map_or(pts, |l| l.max(pts)));
            let end = pts + packet.duration().max(0);
            self.end_pts = Some(self.end_pts.map_or(end, |e| e.max(end)));
        }
    }
}

/// The video frames a rendition is fed: their nominal rate, and the time base of their
/// timestamps (the decoder's, or the rotation filter graph's).
#[derive(Debug, Clone, Copy)]
pub struct FrameClock {
    pub rate: Rational,
    pub time_base: Rational,
}

impl FrameClock {
    /// One frame at the nominal rate in the clock's time base (at least one tick).
    pub fn frame_duration(&self) -> i64 {
        frame_duration(self.rate, self.time_base)
    }
}

/// One frame at `rate` in `time_base` (at least one tick): the duration every video
/// packet gets.
pub fn frame_duration(rate: Rational, time_base: Rational) -> i64 {
    shared::media::timestamp(1.0 / f64::from(rate).max(1.0), time_base).max(1)
}

impl RenditionOutput {
    /// Opens the encoders (`codec`'s with `threads` threads) and writes the header of each
    /// container of `formats` that can carry `codec` (MPEG-TS HLS is H.264 only).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        plan: Planned,
        codec: VideoCodec,
        cfg: &TranscoderSettings,
        threads: usize,
        clock: FrameClock,
        audio: Option<&AudioEncoder>,
        formats: &[OutputFormat],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut out = Self::open_encoder(plan, codec, cfg, threads, clock)?;
        let video = codec::Parameters::from(&out.video);
        let audio_params = audio.map(|a| (codec::Parameters::from(&a.encoder), a.time_base));
        let formats: Vec<OutputFormat> = formats
            .iter()
            .copied()
            .filter(|f| codec == VideoCodec::H264 || *f != OutputFormat::Hls)
            .collect();
        out.muxers = Muxers::open(
            &out.plan.name,
            cfg,
            &video,
            clock.time_base,
            audio_params.as_ref().map(|(p, tb)| (p, *tb)),
            &formats,
            dir,
        )?;
        out.audio = audio.map(|a| a.time_base);
        Ok(out)
    }

    /// Opens the encoder of one segment of a segmented transcode: the same x264 settings
    /// as [`Self::open`], video only, into the part file `<dir>/<rendition>.nut`.
    pub fn open_part(
        plan: Planned,
        cfg: &TranscoderSettings,
        threads: usize,
        clock: FrameClock,
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let mut out = Self::open_encoder(plan, VideoCodec::H264, cfg, threads, clock)?;
        let path = dir.join(format!("{}.nut", out.plan.name));
        let params = codec::Parameters::from(&out.video);
        out.part = Some(PartWriter::create(
            &path,
            &params,
            clock.time_base,
            Some(clock.rate),
        )?);
        Ok(out)
    }

    fn open_encoder(
        plan: Planned,
        codec: VideoCodec,
        cfg: &TranscoderSettings,
        threads: usize,
        clock: FrameClock,
    ) -> anyhow::Result<Self> {
        let (frame_rate, video_tb) = (clock.rate, clock.time_base);
        let level = hls::h264_level(plan.width, plan.height, f64::from(frame_rate));
        let video = open_video_encoder(&plan, codec, cfg, threads, frame_rate, video_tb, level)?;
        Ok(Self {
            plan,
            codec,
            level,
            video,
            video_tb,
            frame_duration: clock.frame_duration(),
            audio: None,
            muxers: Muxers { muxers: Vec::new() },
            part: None,
            video_end_s: 0.0,
            stats: PacketStats::default(),
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
            self.stats.add(&packet);
            if let Some(part) = self.part.as_mut() {
                part.write(&packet)?;
            }
            self.muxers.write(&packet, false, self.video_tb)?;
        }
        Ok(())
    }

    /// Muxes one AAC packet from this rendition's [`AudioEncoder`].
    pub fn write_audio(&mut self, packet: &Packet) -> anyhow::Result<()> {
        match self.audio {
            Some(tb) => self.muxers.write(packet, true, tb),
            None => Ok(()),
        }
    }

    /// Drains the encoders and closes every container.
    pub fn finish(mut self) -> anyhow::Result<Finished> {
        self.encode_video(None)?;
        let files = self.muxers.finish()?;
        let part = match self.part {
            Some(part) => Some(part.finish()?),
            None => None,
        };
        Ok(Finished {
            plan: self.plan,
            codec: self.codec,
            level: self.level,
            duration_s: self.video_end_s,
            has_audio: self.audio.is_some(),
            files,
            part,
            video: self.stats,
        })
    }
}

/// The FFmpeg encoder of `codec`.
fn encoder_name(codec: VideoCodec) -> &'static str {
    match codec {
        VideoCodec::H264 => "libx264",
        VideoCodec::Hevc => "libx265",
        VideoCodec::Av1 => "libsvtav1",
    }
}

/// The codec's quality target for the job's x264 CRF (`transcoder.crf`): the scales
/// differ, so each is offset to about the same quality. x265's sits about 5 above
/// x264's (its default 28 is x264's 23); SVT-AV1's runs 0-63 and its default 35 pairs
/// with x264's 23.
fn crf_for(codec: VideoCodec, x264_crf: u8) -> u8 {
    match codec {
        VideoCodec::H264 => x264_crf,
        VideoCodec::Hevc => (x264_crf + 5).min(51),
        VideoCodec::Av1 => (x264_crf + 12).min(63),
    }
}

/// The encoder of one rendition in `codec`: its size, the plan's CRF (a fitted ladder's,
/// else the transcoder's, each offset to the codec's scale), its cap. Also what the fitted
/// ladder's probe encodes its samples with, so probe and transcode make the same choices.
pub(crate) fn open_video_encoder(
    plan: &Planned,
    codec: VideoCodec,
    cfg: &TranscoderSettings,
    threads: usize,
    frame_rate: Rational,
    time_base: Rational,
    level: u32,
) -> anyhow::Result<encoder::Video> {
    let name = encoder_name(codec);
    let found = encoder::find_by_name(name)
        .ok_or_else(|| permanent(format!("this FFmpeg build has no {name} encoder")))?;
    let ctx = codec::context::Context::new_with_codec(found);
    let mut enc = ctx
        .encoder()
        .video()
        .map_err(|e| pipeline_error(&format!("creating the {name} encoder"), e))?;
    enc.set_width(plan.width);
    enc.set_height(plan.height);
    enc.set_format(format::Pixel::YUV420P);
    enc.set_time_base(time_base);
    enc.set_frame_rate(Some(frame_rate));
    enc.set_aspect_ratio(Rational::new(1, 1));
    let fps = f64::from(frame_rate).max(1.0);
    let gop = (fps * cfg.keyframe_interval_s).round().max(1.0) as u32;
    enc.set_gop(gop);
    // Extradata (parameter sets) out of band: MP4 needs it; the TS muxer re-inserts it in
    // band.
    enc.set_flags(codec::Flags::GLOBAL_HEADER);
    let kbps = plan.video_kbps;
    enc.set_max_bit_rate(kbps as usize * 1000);
    // A fitted ladder (`ladder: auto`) chose this rendition's own CRF, on x264's scale.
    let crf = crf_for(codec, plan.crf.unwrap_or(cfg.crf));
    let mut opts = Dictionary::new();
    // Every codec: a fixed GOP, no scene-cut keyframes, closed GOPs, so every rendition
    // (of every codec) gets keyframes on the same frames and segments line up across the
    // ladder. Each encoder gets the rendition's share of the threads (see
    // `pipeline::encoder_threads`).
    match codec {
        VideoCodec::H264 => {
            opts.set("threads", &threads.to_string());
            opts.set("preset", &cfg.preset);
            opts.set("crf", &crf.to_string());
            opts.set("maxrate", &format!("{kbps}k"));
            opts.set("bufsize", &format!("{}k", kbps * 2));
            opts.set("profile", "high");
            opts.set("level", &format!("{}.{}", level / 10, level % 10));
            opts.set(
                "x264-params",
                &format!("keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0"),
            );
        }
        VideoCodec::Hevc => {
            opts.set("preset", &cfg.hevc_preset);
            opts.set("crf", &crf.to_string());
            opts.set("profile", "main");
            // The peaks capped as for x264 (VBV); x265's own thread pool sized to the
            // rendition's share; its banner kept out of the worker's log.
            opts.set(
                "x265-params",
                &format!(
                    "keyint={gop}:min-keyint={gop}:scenecut=0:open-gop=0:vbv-maxrate={kbps}:\
                     vbv-bufsize={}:pools={threads}:log-level=error",
                    kbps * 2
                ),
            );
        }
        VideoCodec::Av1 => {
            // SVT-AV1 takes the GOP from `gop` above and the cap from the maximum bit
            // rate (its "capped CRF", looser than x264's VBV); `irefresh-type=2` makes
            // its keyframes closed key frames (its default, open intra-only frames, is
            // no place to start a segment).
            opts.set("preset", &cfg.av1_preset.to_string());
            opts.set("crf", &crf.to_string());
            opts.set(
                "svtav1-params",
                &format!("scd=0:irefresh-type=2:lp={threads}"),
            );
        }
    }
    enc.open_as_with(found, opts)
        .map_err(|e| pipeline_error(&format!("opening the {name} encoder"), e))
}

/// An AAC encoder (48 kHz stereo by default), one per distinct audio bit rate of the
/// ladder: renditions with the same audio share its packets instead of encoding the same
/// sound again.
pub struct AudioEncoder {
    pub kbps: u32,
    pub(crate) encoder: encoder::Audio,
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
