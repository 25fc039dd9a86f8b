//! Decoding and filtering shared by both workers.
//!
//! [`VideoDecoder`] wraps FFmpeg's decoder with threading on and maps its failures to
//! permanent job errors that say where in the source they happened. It also holds every
//! frame it hands out to the [`MediaLimits`]: a header can lie (a stream that says
//! 160x120 and switches to 8K, a raw stream with no declared duration), the decoded
//! frames cannot. FFmpeg's `max_pixels` keeps an oversized picture from being allocated
//! at all. [`FrameGraph`] is a
//! libavfilter graph with one input and any number of outputs (one `split`): the
//! transcoder uses it to turn rotated video upright and to resample audio, the thumbnailer
//! to turn frames into upright RGB pictures of a given width. Rotation follows the display
//! matrix the way the `ffmpeg` CLI's autorotate does.

use anyhow::Context as _;
use ffmpeg::format::context::Input;
use ffmpeg::{Packet, Rational, codec, decoder, filter, frame};
use ffmpeg_next as ffmpeg;

use super::probe::{AudioInfo, MediaLimits, VideoInfo};
use super::{pipeline_error, seconds};
use crate::outcome::{PermanentExt as _, permanent};

/// The source's main video stream, decoding.
pub struct VideoDecoder {
    pub decoder: decoder::Video,
    pub stream_index: usize,
    pub time_base: Rational,
    /// What every decoded frame is checked against.
    limits: MediaLimits,
    /// Seconds where the stream starts: durations are measured from here.
    origin_s: f64,
    /// The picture size the decoder opened with; a frame of another size is a change
    /// mid-stream, which the filter graphs built for this size cannot take.
    size: (u32, u32),
    /// The pixel aspect ratio it opened with. Size and ratio were held to the limits at
    /// open, so a frame that has both as opened needs no second look (and no per-frame
    /// allocation of its description).
    sar: Rational,
    /// Seconds per frame, for frames with no timestamp (raw streams have none).
    frame_s: f64,
    /// Time of the last frame that had one, and frames decoded since without one.
    last_s: Option<f64>,
    untimed: u32,
}

impl VideoDecoder {
    /// Opens a decoder for `video` with frame threading (`threads` = 0: one per core);
    /// every frame it decodes is held to `limits`.
    pub fn open(
        input: &Input,
        video: &VideoInfo,
        threads: usize,
        limits: &MediaLimits,
    ) -> anyhow::Result<Self> {
        let stream = input
            .stream(video.index)
            .ok_or_else(|| permanent("source video stream vanished"))?;
        let mut ctx = codec::context::Context::from_parameters(stream.parameters())
            .context("cannot read the source video")
            .permanent()?;
        super::admit::set_max_pixels(&mut ctx, limits.max_pixels());
        ctx.set_threading(codec::threading::Config {
            kind: codec::threading::Type::Frame,
            count: threads,
            ..Default::default()
        });
        let mut decoder = ctx.decoder();
        decoder.set_packet_time_base(stream.time_base());
        let decoder = decoder
            .video()
            .with_context(|| {
                format!(
                    "cannot open a decoder for the source video (`{}`)",
                    video.codec
                )
            })
            .permanent()?;
        let sar = decoder.aspect_ratio();
        check_shape(limits, "source", video.width, video.height, sar)?;
        let origin_s = super::source::stream_start_s(&stream).unwrap_or(0.0);
        Ok(Self {
            decoder,
            stream_index: video.index,
            time_base: stream.time_base(),
            limits: limits.clone(),
            origin_s,
            size: (video.width, video.height),
            sar,
            // Unknown rate: count frames as if at 60 fps, a loose bound but a bound.
            frame_s: 1.0
                / if video.frame_rate > 0.0 {
                    video.frame_rate
                } else {
                    60.0
                },
            last_s: None,
            untimed: 0,
        })
    }

    /// Feeds one packet of the video stream.
    pub fn send(&mut self, packet: &Packet) -> anyhow::Result<()> {
        match self.decoder.send_packet(packet) {
            Ok(()) => Ok(()),
            // FFmpeg guarantees a send succeeds once every frame has been received, and
            // every caller drains the decoder before it sends again; "try again" here would
            // mean a packet is being lost, so say so instead of dropping it quietly.
            Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => Err(permanent(
                "internal error: the decoder refused a packet before its frames were read",
            )),
            Err(e) => Err(self.corrupt(packet.pts(), e)),
        }
    }

    /// Signals the end of the stream; the remaining frames come out of [`Self::receive`].
    pub fn send_eof(&mut self) {
        // Only fails when already at EOF, which is what we want anyway.
        let _ = self.decoder.send_eof();
    }

    /// The next decoded frame, `Ok(false)` when the decoder needs more input (or is done).
    pub fn receive(&mut self, frame: &mut frame::Video) -> anyhow::Result<bool> {
        match self.decoder.receive_frame(frame) {
            Ok(()) => self.check(frame).map(|()| true),
            Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => Ok(false),
            Err(ffmpeg::Error::Eof) => Ok(false),
            Err(e) => Err(self.corrupt(None, e)),
        }
    }

    /// Holds a decoded frame to the limits: its size, its pixel aspect ratio, the size it
    /// is shown at, its time from the stream's start, and the size the decoder opened with.
    fn check(&mut self, frame: &frame::Video) -> anyhow::Result<()> {
        let at = self.frame_seconds(frame);
        // How far into the stream this frame is: its own time, else counted in frames
        // from the last frame that had one.
        let elapsed = match at {
            Some(t) => {
                (self.last_s, self.untimed) = (Some(t), 0);
                t - self.origin_s
            }
            None => {
                self.untimed = self.untimed.saturating_add(1);
                self.last_s.unwrap_or(self.origin_s) - self.origin_s
                    + f64::from(self.untimed) * self.frame_s
            }
        };
        let (w, h, sar) = (frame.width(), frame.height(), frame.aspect_ratio());
        let what = || match at {
            Some(t) => format!("source frame at {t:.2} s"),
            None => "a source frame".to_owned(),
        };
        if (w, h) != self.size || sar != self.sar {
            check_shape(&self.limits, &what(), w, h, sar)?;
        }
        if elapsed > self.limits.max_duration_s {
            return Err(permanent(format!(
                "source runs past the {} s limit (a frame at {elapsed:.2} s), whatever its \
                 header says",
                self.limits.max_duration_s,
            )));
        }
        if (w, h) != self.size {
            return Err(permanent(format!(
                "{} changes the picture size from {}x{} to {w}x{h}; vidpipe takes videos \
                 of one picture size (re-encode the upload at one size)",
                what(),
                self.size.0,
                self.size.1
            )));
        }
        Ok(())
    }

    /// Forgets buffered frames (after a seek).
    pub fn flush(&mut self) {
        self.decoder.flush();
    }

    /// Presentation time of a decoded frame in seconds, if it has one.
    pub fn frame_seconds(&self, frame: &frame::Video) -> Option<f64> {
        frame.timestamp().map(|ts| seconds(ts, self.time_base))
    }

    /// A decoding failure. FFmpeg reports a picture over `max_pixels` the same way as
    /// corrupt data (it refuses to allocate it), so the reason names both.
    fn corrupt(&self, pts: Option<i64>, err: ffmpeg::Error) -> anyhow::Error {
        let near = pts.map_or_else(String::new, |pts| {
            format!(" near {:.2} s", seconds(pts, self.time_base))
        });
        permanent(format!(
            "source video cannot be decoded{near}: corrupt data, or a picture over the {}x{} \
             limit ({err})",
            self.limits.max_width, self.limits.max_height
        ))
    }
}

/// A picture of `width`x`height` with pixel aspect ratio `sar` (`what` names it) held to
/// `limits`: its size, its ratio, and the size it is shown at.
fn check_shape(
    limits: &MediaLimits,
    what: &str,
    width: u32,
    height: u32,
    sar: Rational,
) -> anyhow::Result<()> {
    limits.check_picture(what, width, height)?;
    limits.check_pixel_aspect(what, sar.numerator(), sar.denominator())?;
    if sar.numerator() > 0 && sar.denominator() > 0 {
        let shown = super::probe::shown_width(width, sar);
        limits.check_picture(&format!("{what} as shown"), shown, height)?;
    }
    Ok(())
}

/// POSIX EAGAIN, as FFmpeg reports "need more input / output not ready".
const EAGAIN: i32 = 11;

/// A filter graph with one source and `outputs` sinks named `out0`, `out1`, ….
pub struct FrameGraph {
    graph: filter::Graph,
    outputs: usize,
}

impl FrameGraph {
    /// A video graph: frames from `decoder` (timestamps in `time_base`) are turned upright
    /// by `rotation` (clockwise degrees), then each output applies its own filter chain,
    /// e.g. `scale=640:360,setsar=1,format=yuv420p`.
    pub fn video(
        decoder: &decoder::Video,
        time_base: Rational,
        rotation: u32,
        chains: &[String],
    ) -> anyhow::Result<Self> {
        let sar = decoder.aspect_ratio();
        let sar = if sar.numerator() > 0 && sar.denominator() > 0 {
            sar
        } else {
            Rational::new(1, 1)
        };
        let args = format!(
            "video_size={}x{}:pix_fmt={}:time_base={}/{}:pixel_aspect={}/{}",
            decoder.width(),
            decoder.height(),
            ffmpeg::ffi::AVPixelFormat::from(decoder.format()) as i32,
            time_base.numerator(),
            time_base.denominator().max(1),
            sar.numerator(),
            sar.denominator()
        );
        Self::build("buffer", "buffersink", &args, orientation(rotation), chains)
    }

    /// An audio graph from `decoder`'s samples; each output applies its chain (e.g.
    /// `aresample=48000,aformat=sample_fmts=fltp:channel_layouts=stereo`) and hands out
    /// frames of exactly `frame_size` samples (what an AAC encoder wants), 0 for any size.
    pub fn audio(
        decoder: &decoder::Audio,
        time_base: Rational,
        chains: &[String],
        frame_size: u32,
    ) -> anyhow::Result<Self> {
        let layout = decoder.channel_layout();
        let layout = if layout.bits() == 0 {
            ffmpeg::ChannelLayout::default(i32::from(decoder.channels()))
        } else {
            layout
        };
        let args = format!(
            "time_base={}/{}:sample_rate={}:sample_fmt={}:channel_layout=0x{:x}",
            time_base.numerator(),
            time_base.denominator().max(1),
            decoder.rate(),
            decoder.format().name(),
            layout.bits()
        );
        let mut graph = Self::build("abuffer", "abuffersink", &args, "", chains)?;
        if frame_size > 0 {
            for i in 0..graph.outputs {
                if let Some(mut sink) = graph.graph.get(&format!("out{i}")) {
                    sink.sink().set_frame_size(frame_size);
                }
            }
        }
        Ok(graph)
    }

    fn build(
        source: &str,
        sink: &str,
        args: &str,
        pre: &str,
        chains: &[String],
    ) -> anyhow::Result<Self> {
        let err = |e| pipeline_error("building the filter graph", e);
        let mut graph = filter::Graph::new();
        let find = |name: &str| {
            filter::find(name)
                .ok_or_else(|| permanent(format!("this FFmpeg build lacks the `{name}` filter")))
        };
        graph.add(&find(source)?, "in", args).map_err(err)?;
        for i in 0..chains.len() {
            graph
                .add(&find(sink)?, &format!("out{i}"), "")
                .map_err(err)?;
        }
        let spec = graph_spec(pre, chains);
        let mut parser = graph.output("in", 0).map_err(err)?;
        for i in 0..chains.len() {
            parser = parser.input(&format!("out{i}"), 0).map_err(err)?;
        }
        parser.parse(&spec).map_err(err)?;
        graph.validate().map_err(err)?;
        Ok(Self {
            graph,
            outputs: chains.len(),
        })
    }

    /// Feeds a decoded frame.
    pub fn push(&mut self, frame: &frame::Frame) -> anyhow::Result<()> {
        self.source()?
            .source()
            .add(frame)
            .map_err(|e| pipeline_error("filtering a frame", e))
    }

    /// Signals the end of input so the outputs drain.
    pub fn flush(&mut self) -> anyhow::Result<()> {
        self.source()?
            .source()
            .flush()
            .map_err(|e| pipeline_error("flushing the filter graph", e))
    }

    /// The next frame of output `index`, `Ok(false)` when it has none right now.
    pub fn pull(&mut self, index: usize, frame: &mut frame::Frame) -> anyhow::Result<bool> {
        let mut sink = self
            .graph
            .get(&format!("out{index}"))
            .ok_or_else(|| permanent(format!("filter output {index} missing")))?;
        match sink.sink().frame(frame) {
            Ok(()) => Ok(true),
            Err(ffmpeg::Error::Other { errno }) if errno == EAGAIN => Ok(false),
            Err(ffmpeg::Error::Eof) => Ok(false),
            Err(e) => Err(pipeline_error("filtering", e)),
        }
    }

    fn source(&mut self) -> anyhow::Result<filter::Context> {
        self.graph
            .get("in")
            .ok_or_else(|| permanent("filter input missing"))
    }
}

/// Filters that turn a picture stored `rotation` degrees off upright, as the `ffmpeg` CLI
/// does (its `autorotate`).
pub fn orientation(rotation: u32) -> &'static str {
    match rotation {
        90 => "transpose=clock,",
        180 => "hflip,vflip,",
        270 => "transpose=cclock,",
        _ => "",
    }
}

/// `[in]<pre>split=N[s0]…;[s0]<chain0>[out0];…`, or a plain chain for one output.
fn graph_spec(pre: &str, chains: &[String]) -> String {
    if chains.len() == 1 {
        return format!("[in]{pre}{}[out0]", chains[0]);
    }
    let is_audio = pre.is_empty() && chains.iter().all(|c| c.starts_with('a'));
    let split = if is_audio { "asplit" } else { "split" };
    let mut spec = format!("[in]{pre}{split}={}", chains.len());
    for i in 0..chains.len() {
        spec.push_str(&format!("[s{i}]"));
    }
    for (i, chain) in chains.iter().enumerate() {
        spec.push_str(&format!(";[s{i}]{chain}[out{i}]"));
    }
    spec
}

/// Opens the source's audio decoder.
pub fn open_audio_decoder(input: &Input, audio: &AudioInfo) -> anyhow::Result<decoder::Audio> {
    let stream = input
        .stream(audio.index)
        .ok_or_else(|| permanent("source audio stream vanished"))?;
    let ctx = codec::context::Context::from_parameters(stream.parameters())
        .context("cannot read the source audio")
        .permanent()?;
    let mut decoder = ctx.decoder();
    decoder.set_packet_time_base(stream.time_base());
    decoder
        .audio()
        .with_context(|| {
            format!(
                "cannot open a decoder for the source audio (`{}`)",
                audio.codec
            )
        })
        .permanent()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_output_is_a_plain_chain() {
        assert_eq!(
            graph_spec("transpose=clock,", &["scale=2:2".into()]),
            "[in]transpose=clock,scale=2:2[out0]"
        );
    }

    #[test]
    fn several_outputs_split_once() {
        assert_eq!(
            graph_spec("", &["scale=4:4".into(), "scale=2:2".into()]),
            "[in]split=2[s0][s1];[s0]scale=4:4[out0];[s1]scale=2:2[out1]"
        );
    }
}
