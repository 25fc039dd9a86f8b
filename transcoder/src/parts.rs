//! Part files: the intermediate files of a segmented transcode (one segment's video of one
//! rendition, or the whole AAC audio of one bit rate), written by the segment and audio
//! steps and read back by the stitch.
//!
//! They are NUT files. NUT keeps every presentation timestamp exactly, in the stream's own
//! time base (any rational, no millisecond rounding as Matroska, no 90 kHz clock and
//! wrap-around as MPEG-TS, no edit lists that shift what is read back as MP4), with the
//! keyframe flags and the codec's extradata. What it does not keep, and how we make up
//! for it:
//!
//! - negative timestamps: NUT refuses them, and libavformat's default fix shifts the whole
//!   file by an amount nobody records. AAC's first packet is always negative (1024
//!   samples of encoder priming before the first sample), and x264's first decoding
//!   times are. So every timestamp is stored plus [`PTS_BIAS`] (named in the file's
//!   stream metadata as `vidpipe-pts-bias`) with the automatic shift turned off, and the
//!   reader takes it off again: what comes back is exactly what went in.
//! - decoding timestamps and durations: NUT stores neither (its demuxer guesses them).
//!   The stitch gives them again: every video packet lasts one frame at the nominal rate
//!   (stored as `vidpipe-frame-rate`), as the single pass does, and decoding times are
//!   derived from the presentation times ([`crate::stitch`]); an AAC packet lasts until
//!   the next one, the last until the audio part's recorded end.
//!
//! The reader opens only our own files: the `nut` demuxer forced, `file` the only
//! protocol. They never pass through [`shared::media::open`], which is for uploads.
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use ffmpeg::codec::packet::Ref as _;
use ffmpeg::format::context::{Input, Output};
use ffmpeg::{Dictionary, Packet, Rational, codec, encoder, format};
use ffmpeg_next as ffmpeg;
use shared::media::pipeline_error;

use crate::encode::PacketStats;

/// Added to every timestamp stored in a part file (in its stream's time base), so that
/// none is negative; see the module docs.
pub const PTS_BIAS: i64 = 1 << 40;

/// One stream written into a part file.
pub(crate) struct PartWriter {
    ctx: Output,
    path: PathBuf,
    /// The time base packets come in (the encoder's), which facts and readers use.
    time_base: Rational,
    /// The stream's time base as the muxer settled it (NUT may pick a finer one that
    /// divides it, e.g. 1/51200 for 1/12800): what is stored.
    stored: Rational,
    stats: PacketStats,
}

/// What a finished part file holds.
pub struct PartInfo {
    pub path: PathBuf,
    /// The time base of its timestamps as written and as [`PartReader`] gives them back.
    pub time_base: Rational,
    /// Packets written, first and last timestamps in `time_base`.
    pub stats: PacketStats,
}

impl PartWriter {
    /// Creates `path` with one stream of `params` whose timestamps come in `time_base`;
    /// `frame_rate` is recorded for video.
    pub fn create(
        path: &Path,
        params: &codec::Parameters,
        time_base: Rational,
        frame_rate: Option<Rational>,
    ) -> anyhow::Result<Self> {
        let mut ctx = format::output_as(&path, "nut")
            .map_err(|e| pipeline_error(&format!("creating {}", path.display()), e))?;
        {
            let mut ost = ctx
                .add_stream(encoder::find(params.id()))
                .map_err(|e| pipeline_error("adding the part's stream", e))?;
            ost.set_parameters(params.clone());
            ost.set_time_base(time_base);
            let mut meta = Dictionary::new();
            meta.set("vidpipe-pts-bias", &PTS_BIAS.to_string());
            meta.set(
                "vidpipe-time-base",
                &format!("{}/{}", time_base.numerator(), time_base.denominator()),
            );
            if let Some(r) = frame_rate {
                meta.set(
                    "vidpipe-frame-rate",
                    &format!("{}/{}", r.numerator(), r.denominator()),
                );
            }
            ost.set_metadata(meta);
        }
        let mut opts = Dictionary::new();
        // The bias keeps timestamps non-negative; libavformat must not shift them again.
        opts.set("avoid_negative_ts", "disabled");
        ctx.write_header_with(opts)
            .map_err(|e| pipeline_error(&format!("writing {}", path.display()), e))?;
        let stored = ctx.stream(0).map_or(time_base, |s| s.time_base());
        Ok(Self {
            ctx,
            path: path.to_owned(),
            time_base,
            stored,
            stats: PacketStats::default(),
        })
    }

    /// Writes `packet` (timestamps in the time base the writer was created with).
    pub fn write(&mut self, packet: &Packet) -> anyhow::Result<()> {
        let mut p = packet.clone();
        p.set_stream(0);
        p.set_position(-1);
        self.stats.add(&p);
        p.rescale_ts(self.time_base, self.stored);
        p.set_pts(p.pts().map(|t| t + PTS_BIAS));
        p.set_dts(p.dts().map(|t| t + PTS_BIAS));
        p.write_interleaved(&mut self.ctx)
            .map_err(|e| pipeline_error(&format!("writing {}", self.path.display()), e))
    }

    pub fn finish(mut self) -> anyhow::Result<PartInfo> {
        self.ctx
            .write_trailer()
            .map_err(|e| pipeline_error(&format!("finishing {}", self.path.display()), e))?;
        Ok(PartInfo {
            path: self.path,
            time_base: self.time_base,
            stats: self.stats,
        })
    }
}

/// A part file opened for reading.
pub(crate) struct PartReader {
    input: Input,
    pub path: PathBuf,
    /// The time base the writer was given: timestamps come back in it.
    pub time_base: Rational,
    /// The time base they are stored in.
    stored: Rational,
    pub params: codec::Parameters,
    /// The video's nominal frame rate, as recorded by the writer.
    pub frame_rate: Option<Rational>,
    bias: i64,
}

impl PartReader {
    /// Opens one of our own part files (not an upload: the `nut` demuxer is forced and
    /// only the `file` protocol allowed). A file that is missing or unreadable is a
    /// transient failure: it came through storage, and another attempt may fetch it whole.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        shared::media::init();
        let nut = nut_demuxer().context("this FFmpeg build has no NUT demuxer")?;
        let mut opts = Dictionary::new();
        opts.set("protocol_whitelist", "file");
        opts.set("format_whitelist", "nut");
        let ctx = format::open_with(&path, &ffmpeg::Format::Input(nut), opts)
            .with_context(|| format!("cannot read the part file {}", path.display()))?;
        let format::context::Context::Input(input) = ctx else {
            anyhow::bail!("{} opened as an output", path.display());
        };
        let stream = input
            .stream(0)
            .with_context(|| format!("the part file {} has no stream", path.display()))?;
        let meta = stream.metadata();
        let bias = meta
            .get("vidpipe-pts-bias")
            .and_then(|b| b.parse().ok())
            .with_context(|| format!("{} is not a vidpipe part file", path.display()))?;
        let frame_rate = meta.get("vidpipe-frame-rate").and_then(|r| {
            let (n, d) = r.split_once('/')?;
            Some(Rational::new(n.parse().ok()?, d.parse().ok()?))
        });
        let (stored, params) = (stream.time_base(), stream.parameters());
        let time_base = meta
            .get("vidpipe-time-base")
            .and_then(|r| {
                let (n, d) = r.split_once('/')?;
                Some(Rational::new(n.parse().ok()?, d.parse().ok()?))
            })
            .unwrap_or(stored);
        Ok(Self {
            path: path.to_owned(),
            time_base,
            stored,
            params,
            frame_rate,
            bias,
            input,
        })
    }

    /// The next packet, its timestamps as written (bias off, no decoding time); `None`
    /// at the end.
    pub fn next(&mut self) -> anyhow::Result<Option<Packet>> {
        let mut packet = Packet::empty();
        match packet.read(&mut self.input) {
            Ok(()) => {}
            Err(ffmpeg::Error::Eof) => return Ok(None),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("reading the part file {}", self.path.display())));
            }
        }
        let pts = packet
            .pts()
            .with_context(|| format!("a packet without a timestamp in {}", self.path.display()))?;
        let pts =
            exact_rescale(pts - self.bias, self.stored, self.time_base).with_context(|| {
                format!(
                    "{}: timestamp {pts} in {} is not whole in {}",
                    self.path.display(),
                    self.stored,
                    self.time_base
                )
            })?;
        packet.set_pts(Some(pts));
        packet.set_dts(None);
        packet.set_duration(0);
        packet.set_position(-1);
        Ok(Some(packet))
    }

    /// The codec's extradata (H.264: SPS and PPS), to check parts fit together.
    pub fn extradata(&self) -> Vec<u8> {
        extradata(&self.params)
    }
}

/// `ts` in `from` as a whole number of `to` ticks; `None` when it is not one (the part's
/// stored time base is a refinement of the writer's, so it always is).
fn exact_rescale(ts: i64, from: Rational, to: Rational) -> Option<i64> {
    if from == to {
        return Some(ts);
    }
    let num = i128::from(ts) * i128::from(from.numerator()) * i128::from(to.denominator());
    let den = i128::from(from.denominator()) * i128::from(to.numerator());
    (den != 0 && num % den == 0).then(|| i64::try_from(num / den).ok())?
}

/// FFmpeg's NUT demuxer.
fn nut_demuxer() -> Option<format::format::Input> {
    // SAFETY: `av_find_input_format` takes a NUL-terminated name and returns a pointer to
    // one of FFmpeg's static demuxer descriptions (valid for the life of the process) or
    // null; `Input` only reads through it.
    unsafe {
        let ptr = ffmpeg::ffi::av_find_input_format(c"nut".as_ptr());
        (!ptr.is_null()).then(|| format::format::Input::wrap(ptr as *mut _))
    }
}

/// The extradata of `params`.
pub(crate) fn extradata(params: &codec::Parameters) -> Vec<u8> {
    // SAFETY: `params` owns a live AVCodecParameters; its extradata is either null or
    // `extradata_size` bytes it owns, read (copied) before `params` can change.
    unsafe {
        let p = params.as_ptr();
        if (*p).extradata.is_null() || (*p).extradata_size <= 0 {
            return Vec::new();
        }
        std::slice::from_raw_parts((*p).extradata, (*p).extradata_size as usize).to_vec()
    }
}

/// Clears the container's codec tag of `params` (NUT's `H264` fourcc, which the MP4
/// muxer refuses): each muxer then picks its own, as for the encoder's parameters.
pub(crate) fn clear_codec_tag(params: &mut codec::Parameters) {
    set_codec_tag(params, 0);
}

/// Sets the container's codec tag (fourcc, little-endian as FFmpeg's `MKTAG`) of
/// `params`; 0 lets the muxer choose.
pub(crate) fn set_codec_tag(params: &mut codec::Parameters, tag: u32) {
    // SAFETY: `params` owns a live AVCodecParameters; `codec_tag` is a plain integer.
    unsafe {
        (*params.as_mut_ptr()).codec_tag = tag;
    }
}

/// Whether the demuxer marked `packet` to be decoded but not shown (MP4 edit lists cut
/// the frames before the edit's start this way): the decoder drops its frame.
pub(crate) fn discarded(packet: &Packet) -> bool {
    // SAFETY: `packet` owns a live AVPacket; `flags` is a plain integer. The safe API
    // truncates flags it does not know, DISCARD among them.
    unsafe { (*packet.as_ptr()).flags & ffmpeg::ffi::AV_PKT_FLAG_DISCARD != 0 }
}
