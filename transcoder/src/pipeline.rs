//! The transcode itself: one demux and decode pass over the source feeds every rendition.
//!
//! ```text
//!            this thread                          one thread per rendition
//! source ─ demux ─┬─ video decode ─ upright ───► 1080p ─ x264 ─┬─ 1080p.mp4, hls/1080p/…
//!                 │                                └► scale 720p ─ x264 ─┤
//!                 │                                     └► scale 480p … ─┤
//!                 └─ audio decode ─ 48 kHz stereo ─ AAC per bit rate ────┘
//!                                                      └─ highest rate ─ cmaf/audio/…
//! ```
//!
//! A job asking for more codecs than H.264 gets the ladder again per codec (`720p.hevc`,
//! `720p.av1`, …: more rendition threads fed the same way; at equal sizes the picture
//! is scaled once and handed on).
//!
//! A CMAF rendition is video only; the sound is written once, as the CMAF audio rendition
//! (from the AAC encoder of the highest bit rate), and [`crate::cmaf`] writes the HLS
//! master and DASH MPD over all of them at the end.
//!
//! Decoded frames are shared, not copied: a rendition thread gets a reference-counted
//! frame through a short bounded channel (back-pressure keeps memory flat), scales it with
//! its own swscale context, hands its picture on to the next smaller rendition (which
//! scales from it: fewer pixels to read than the source, see `ladder::scale_sources`)
//! and encodes it. Scaling and encoding of the renditions thus run in parallel with each
//! other and with decoding.
//!
//! Timestamps are kept from the source (shifted so the earliest stream starts at 0), so
//! variable frame rate stays variable and audio that starts late stays in sync.
//! Cancellation is checked on every packet, so shutdown and the per-job time limit take
//! effect well within a second.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use anyhow::Context as _;
use ffmpeg::{Packet, Rational, codec, frame, picture};
use ffmpeg_next as ffmpeg;
use serde_json::json;
use shared::media::{self, FrameGraph, MediaLimits, Source, VideoDecoder, seconds, timestamp};
use shared::messages::{OutputFormat, TranscodeJob, VideoCodec};
use shared::outcome::{Cancelled, mark_permanent};
use shared::{JobContext, TaskOutput, permanent};

use crate::cmaf;
use crate::encode::{AAC_FRAME_SIZE, AudioEncoder, Finished, FrameClock, Muxers, RenditionOutput};
use crate::hls;
use crate::ladder;
use crate::settings::TranscoderSettings;

/// Frames queued per rendition thread: enough to ride out encoder hiccups, few enough
/// that memory stays flat (each is a reference to a decoded picture).
const QUEUE: usize = 8;

/// What the decoding thread hands each rendition thread.
enum Msg {
    Video(Arc<frame::Video>),
    /// An AAC packet of the rendition's audio bit rate.
    Audio(Arc<Packet>),
}

/// Transcodes `ctx.source_path` into `ctx.scratch_dir()` as the job asks.
pub fn transcode(
    job: &TranscodeJob,
    ctx: &JobContext,
    cfg: &TranscoderSettings,
    limits: &MediaLimits,
) -> anyhow::Result<TaskOutput> {
    let started = Instant::now();
    let mut src = media::open(&ctx.source_path, limits)?;
    let info = src.info.clone();
    let (ladder, dropped) = ladder::plan(
        &job.renditions,
        info.video.display_width,
        info.video.display_height,
    );
    // The fitted ladder (`ladder: auto`) is probed with x264; other codecs take its CRFs
    // on their own scales (see `encode::crf_for`).
    let (ladder, fit) = crate::fit::apply(job, ladder, &ctx.source_path, cfg, limits, ctx)?;
    let (plan, codecs) = codec_ladders(&ladder, &job.codecs);
    let VideoSetup {
        decoder: mut vdec,
        upright,
        clock,
    } = VideoSetup::open(&src, cfg)?;
    let frame_rate = clock.rate;

    // MP4 and MPEG-TS renditions each carry the sound at their own rate; CMAF has one audio
    // rendition at the highest rate, so a CMAF-only job encodes just that one.
    let top = plan.iter().map(|p| p.audio_kbps).max().unwrap_or(0);
    let muxed = job.formats.iter().any(|f| *f != OutputFormat::Cmaf);
    let rates: Vec<u32> = plan
        .iter()
        .map(|p| if muxed { p.audio_kbps } else { top })
        .collect();
    let mut audio = match &info.audio {
        Some(a) => Some(AudioPath::open(&src, a, &rates, cfg)?),
        None => None,
    };
    // Every stream is shifted by the earliest start: outputs begin at 0.
    let start_s = src.start_s();
    if let Some(a) = audio.as_mut() {
        a.offset = timestamp(start_s, a.time_base);
    }

    let outputs = open_outputs(job, &plan, &codecs, audio.as_ref(), clock, cfg, ctx)?;
    if job.formats.contains(&OutputFormat::Cmaf)
        && let Some(a) = audio.as_mut()
    {
        a.write_cmaf(cfg, ctx.scratch_dir()?)?;
    }

    let mut video = VideoPath::new(&src, clock, upright, None);
    let finished = run(
        &mut src,
        &mut vdec,
        &mut video,
        audio.as_mut(),
        &plan,
        outputs,
        ctx,
    )?;
    if video.frames == 0 {
        return Err(permanent("source video has no decodable frames"));
    }
    ctx.progress(100.0);
    let cmaf_audio = match audio.as_mut() {
        Some(a) => a.finish_cmaf()?,
        None => None,
    };
    let mut out = collect_outputs(
        job,
        &info,
        &finished,
        cmaf_audio.as_deref(),
        &dropped,
        frame_rate,
        ctx,
        started,
    )?;
    record_fit(
        &mut out,
        fit.map(|f| serde_json::to_value(f).unwrap_or_default()),
    );
    Ok(out)
}

/// Puts a fitted ladder's report (`ladder: auto`) into the task's summary as
/// `ladder_fit`; nothing for a fixed ladder.
pub(crate) fn record_fit(out: &mut TaskOutput, fit: Option<serde_json::Value>) {
    if let (Some(fit), Some(summary)) = (fit, out.summary.as_object_mut()) {
        summary.insert("ladder_fit".into(), fit);
    }
}

/// The source's video, ready to decode: its decoder, the graph that turns rotated video
/// upright, and the clock its frames come with.
pub(crate) struct VideoSetup {
    pub decoder: VideoDecoder,
    pub upright: Option<FrameGraph>,
    pub clock: FrameClock,
}

impl VideoSetup {
    pub(crate) fn open(src: &Source, cfg: &TranscoderSettings) -> anyhow::Result<Self> {
        let info = &src.info;
        let v_tb = src.time_base(info.video.index)?;
        // An unknown rate only clocks frames without timestamps; 30 fps is a fair guess.
        let frame_rate = src.frame_rate().unwrap_or(Rational::new(30, 1));
        let decoder = src.decoder(cfg.threads)?;
        // Only rotated video goes through a filter graph here (to turn it upright once);
        // scaling happens in the rendition threads.
        let upright = match info.video.rotation {
            0 => None,
            r => Some(FrameGraph::video(
                &decoder.decoder,
                v_tb,
                r,
                &["null".to_owned()],
            )?),
        };
        Ok(Self {
            decoder,
            upright,
            clock: FrameClock {
                rate: frame_rate,
                time_base: v_tb,
            },
        })
    }
}

/// Runs the renditions, one thread each, while this thread demuxes and decodes the
/// source into them; what each rendition finished, or the error that explains the failure.
pub(crate) fn run(
    src: &mut Source,
    vdec: &mut VideoDecoder,
    video: &mut VideoPath,
    audio: Option<&mut AudioPath>,
    plan: &[ladder::Planned],
    outputs: Vec<RenditionOutput>,
    ctx: &JobContext,
) -> anyhow::Result<Vec<Finished>> {
    let aborted = AtomicBool::new(false);
    let sources = ladder::scale_sources(plan);
    std::thread::scope(|scope| {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            plan.iter().map(|_| sync_channel(QUEUE)).unzip();
        // Decoded frames go to the renditions scaled from the source; every other one
        // gets its pictures from the rendition it is scaled from. Audio goes to all.
        let roots: Vec<SyncSender<Msg>> = senders
            .iter()
            .zip(&sources)
            .filter(|(_, src)| src.is_none())
            .map(|(tx, _)| tx.clone())
            .collect();
        let mut workers = Vec::with_capacity(outputs.len());
        for (i, (out, rx)) in outputs.into_iter().zip(receivers).enumerate() {
            let children: Vec<SyncSender<Msg>> = sources
                .iter()
                .enumerate()
                .filter(|(_, src)| **src == Some(i))
                .map(|(j, _)| senders[j].clone())
                .collect();
            let aborted = &aborted;
            let name = out.plan.name.clone();
            workers.push(scope.spawn(move || {
                encode_rendition(out, rx, children, aborted)
                    .with_context(|| format!("rendition {name}"))
            }));
        }
        let routes = Routes {
            video: roots,
            all: senders,
        };
        let fed = feed(src, vdec, video, audio, &routes, ctx);
        if fed.is_err() {
            aborted.store(true, Ordering::Relaxed);
        }
        drop(routes);
        let results: Vec<anyhow::Result<Finished>> = workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(permanent("a rendition encoder panicked")))
            })
            .collect();
        first_error(fed, results)
    })
}

/// The error that explains a failed run, else what every rendition finished. A rendition
/// that failed closed its channel, and whoever fed it (the decoding side, or the larger
/// rendition it is scaled from) only says it stopped early: report the failed
/// rendition's own error then. Otherwise the decoding side's error (corrupt source,
/// cancellation) explains why the renditions stopped.
fn first_error(
    fed: anyhow::Result<()>,
    results: Vec<anyhow::Result<Finished>>,
) -> anyhow::Result<Vec<Finished>> {
    let mut finished = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(f) => finished.push(f),
            Err(e) => errors.push(e),
        }
    }
    errors.sort_by_key(|e| e.is::<StoppedEarly>());
    let chosen = match (fed, errors.into_iter().next()) {
        (Err(e), Some(own)) if e.is::<StoppedEarly>() => own,
        (Err(e), _) => e,
        (Ok(()), Some(own)) => own,
        (Ok(()), None) => return Ok(finished),
    };
    // Only a stop with no failure behind it is left unexplained; nothing retried changes it.
    if chosen.is::<StoppedEarly>() {
        return Err(mark_permanent(chosen));
    }
    Err(chosen)
}

/// The ladder once per codec of the job: what the rendition threads encode, and the
/// codec of each. H.264 renditions keep their names; another codec's are named
/// `<rendition>.<codec>` (`720p.hevc`: a dot no rendition name has, so never a clash).
/// Equal sizes scale once: the second codec's picture comes from the first's rendition
/// (`ladder::scale_sources`).
fn codec_ladders(
    ladder: &[ladder::Planned],
    codecs: &[VideoCodec],
) -> (Vec<ladder::Planned>, Vec<VideoCodec>) {
    let mut plan = Vec::with_capacity(ladder.len() * codecs.len());
    let mut of = Vec::with_capacity(plan.capacity());
    for &codec in codecs {
        for p in ladder {
            let mut p = p.clone();
            if codec != VideoCodec::H264 {
                p.name = format!("{}.{}", p.name, codec.name());
            }
            plan.push(p);
            of.push(codec);
        }
    }
    (plan, of)
}

/// One [`RenditionOutput`] per planned rendition (`codecs[i]` is rendition i's), each
/// with its share of the encoder threads and the AAC encoder of its bit rate.
fn open_outputs(
    job: &TranscodeJob,
    plan: &[ladder::Planned],
    codecs: &[VideoCodec],
    audio: Option<&AudioPath>,
    clock: FrameClock,
    cfg: &TranscoderSettings,
    ctx: &JobContext,
) -> anyhow::Result<Vec<RenditionOutput>> {
    let mut outputs = Vec::with_capacity(plan.len());
    let threads = encoder_threads(plan, cfg.threads);
    for (i, p) in plan.iter().enumerate() {
        let encoder = audio.map(|a| &a.encoders[a.route[i]]);
        outputs.push(RenditionOutput::open(
            p.clone(),
            codecs[i],
            cfg,
            threads[i],
            clock,
            encoder,
            &job.formats,
            ctx.scratch_dir()?,
        )?);
    }
    Ok(outputs)
}

/// Encoder threads per rendition (x264's threads, x265's pool, SVT-AV1's logical
/// processors): the cores (`threads`, 0 = all of them) shared out by picture size. Each rendition gets its share of 1.5 threads a core (x264's own "auto"
/// for a single encoder), at least one. On 2 cores the 1080p/720p/480p/360p ladder gets
/// 2/1/1/1: the renditions run side by side, so giving each x264 its own full set of
/// frame threads (as "auto" would) only adds threads fighting over the same cores, and
/// measured slower (and more memory) than sharing them out.
pub(crate) fn encoder_threads(plan: &[ladder::Planned], threads: usize) -> Vec<usize> {
    let cores = media::cores(threads);
    let pixels = |p: &ladder::Planned| f64::from(p.width) * f64::from(p.height);
    let total: f64 = plan.iter().map(pixels).sum::<f64>().max(1.0);
    plan.iter()
        .map(|p| ((1.5 * cores as f64 * pixels(p) / total).round() as usize).max(1))
        .collect()
}

/// Where the decoding thread sends what it decodes.
struct Routes {
    /// The renditions scaled from the source itself.
    video: Vec<SyncSender<Msg>>,
    /// Every rendition, in plan order (for audio).
    all: Vec<SyncSender<Msg>>,
}

/// Demuxes and decodes the whole source, handing every frame to the renditions.
fn feed(
    src: &mut Source,
    vdec: &mut VideoDecoder,
    video: &mut VideoPath,
    mut audio: Option<&mut AudioPath>,
    routes: &Routes,
    ctx: &JobContext,
) -> anyhow::Result<()> {
    let mut packet = Packet::empty();
    let route = audio.as_ref().map(|a| a.route.clone()).unwrap_or_default();
    // AAC packets go to the renditions of their bit rate.
    let mut sink = |e: usize, packet: Packet| -> anyhow::Result<()> {
        let packet = Arc::new(packet);
        for (tx, r) in routes.all.iter().zip(&route) {
            if *r == e {
                tx.send(Msg::Audio(Arc::clone(&packet)))
                    .map_err(|_| StoppedEarly)?;
            }
        }
        Ok(())
    };
    video.seek(src)?;
    'pass: loop {
        let mut packets = src.packets();
        loop {
            ctx.check_cancelled()?;
            match packets.read(&mut packet) {
                Ok(true) => {}
                Ok(false) => break 'pass,
                Err(corrupt) => return Err(corrupt.error(Some(video.last_s(vdec.time_base)))),
            }
            if packet.stream() == vdec.stream_index {
                if !video.lands_well(&packet) {
                    break;
                }
                vdec.send(&packet)?;
                video.drain(vdec, &routes.video, ctx)?;
                if video.reseek {
                    break;
                }
                if video.done {
                    break 'pass;
                }
            } else if let Some(a) = audio.as_deref_mut().filter(|a| a.index == packet.stream()) {
                a.send(&packet);
                a.drain(&mut sink)?;
            }
        }
        // The seek landed after the window's start: try again from an earlier keyframe.
        vdec.flush();
        video.seek(src)?;
    }
    if !video.done {
        vdec.send_eof();
        video.drain(vdec, &routes.video, ctx)?;
    }
    video.flush(&routes.video)?;
    if let Some(a) = audio {
        a.finish(&mut sink)?;
    }
    Ok(())
}

/// What sending to a rendition thread that has already failed returns: that thread's own
/// error explains the run, this one only says the sender had to stop ([`first_error`]).
#[derive(Debug, thiserror::Error)]
#[error("a rendition encoder stopped early")]
struct StoppedEarly;

/// Hands `msg` to every rendition thread. A closed channel means that thread failed; the
/// caller stops and the thread's own error is reported.
fn broadcast(senders: &[SyncSender<Msg>], msg: impl Fn() -> Msg) -> anyhow::Result<()> {
    for tx in senders {
        tx.send(msg()).map_err(|_| StoppedEarly)?;
    }
    Ok(())
}

/// One rendition's thread: scale each frame to its size, hand the picture on to the
/// renditions scaled from it (`children`), encode, mux; finish the files when the channel
/// closes (unless the job was aborted).
fn encode_rendition(
    mut out: RenditionOutput,
    rx: Receiver<Msg>,
    children: Vec<SyncSender<Msg>>,
    aborted: &AtomicBool,
) -> anyhow::Result<Finished> {
    let (w, h) = (out.plan.width, out.plan.height);
    let mut scaler: Option<(
        ffmpeg::software::scaling::Context,
        (ffmpeg::format::Pixel, u32, u32),
    )> = None;
    // Scaled pictures, reused once x264 (which copies what it is given) and the children
    // are done with them: a fresh allocation per frame costs page faults on every frame.
    let mut pictures: Vec<Arc<frame::Video>> = Vec::new();
    for msg in rx {
        match msg {
            Msg::Video(frame) => {
                let fits = frame.width() == w
                    && frame.height() == h
                    && frame.format() == ffmpeg::format::Pixel::YUV420P;
                let picture = if fits {
                    frame
                } else {
                    let input = (frame.format(), frame.width(), frame.height());
                    if scaler.as_ref().is_none_or(|(_, i)| *i != input) {
                        let ctx = ffmpeg::software::scaling::Context::get(
                            input.0,
                            input.1,
                            input.2,
                            ffmpeg::format::Pixel::YUV420P,
                            w,
                            h,
                            ffmpeg::software::scaling::Flags::BILINEAR,
                        )
                        .map_err(|e| media::pipeline_error("creating a scaler", e))?;
                        scaler = Some((ctx, input));
                    }
                    let (sws, _) = scaler.as_mut().expect("scaler just made");
                    let free = match pictures.iter().position(|p| Arc::strong_count(p) == 1) {
                        Some(i) => i,
                        None => {
                            pictures.push(Arc::new(frame::Video::new(
                                ffmpeg::format::Pixel::YUV420P,
                                w,
                                h,
                            )));
                            pictures.len() - 1
                        }
                    };
                    let scaled = Arc::get_mut(&mut pictures[free]).expect("held by the pool only");
                    sws.run(&frame, scaled)
                        .map_err(|e| media::pipeline_error("scaling", e))?;
                    scaled.set_pts(frame.pts());
                    Arc::clone(&pictures[free])
                };
                for tx in &children {
                    tx.send(Msg::Video(Arc::clone(&picture)))
                        .map_err(|_| StoppedEarly)?;
                }
                out.encode_video(Some(&picture))?;
            }
            Msg::Audio(packet) => out.write_audio(&packet)?,
        }
    }
    // The children's input ends here, so they finish alongside this one.
    drop(children);
    if aborted.load(Ordering::Relaxed) {
        return Err(Cancelled.into());
    }
    out.finish()
}

/// Decoded video on its way to the renditions.
pub(crate) struct VideoPath {
    offset: i64,
    last_pts: Option<i64>,
    /// One frame in the stream's time base, for frames without a timestamp.
    step: i64,
    frames: u64,
    duration_s: f64,
    /// Turns rotated video upright; `None` for video stored upright.
    upright: Option<FrameGraph>,
    /// For one segment of a segmented transcode: the frames to hand on.
    window: Option<Window>,
    /// The window's end is reached: nothing more to decode.
    done: bool,
    /// The seek landed after the window's start: seek earlier and decode again.
    reseek: bool,
}

/// The frames one segment encodes: those whose timestamps (output timeline, the
/// decoder's time base) lie in `[start, end)`. Frames before `start` are decoded (from
/// the keyframe before it) and dropped, but count for the duplicate rule as in the single
/// pass, so the segment keeps exactly the frames the single pass keeps there.
pub(crate) struct Window {
    start: Option<i64>,
    end: Option<i64>,
    /// Container times (seconds) to seek to, tried in turn while a seek lands after
    /// `start`; the last is the beginning of the source.
    seeks: Vec<f64>,
    tried: usize,
    /// Whether the first video packet of this pass must be checked: after a seek it must
    /// be a keyframe at or before `start`, or frames of the window would be skipped (or
    /// decoded from references the seek skipped).
    check_first: bool,
}

impl Window {
    pub(crate) fn new(start: Option<i64>, end: Option<i64>, seeks: Vec<f64>) -> Self {
        Self {
            start,
            end,
            seeks,
            tried: 0,
            check_first: false,
        }
    }
}

impl VideoPath {
    pub(crate) fn new(
        src: &Source,
        clock: FrameClock,
        upright: Option<FrameGraph>,
        window: Option<Window>,
    ) -> Self {
        let tb = clock.time_base;
        Self {
            offset: timestamp(src.start_s(), tb),
            last_pts: None,
            step: timestamp(1.0 / f64::from(clock.rate).max(1.0), tb).max(1),
            frames: 0,
            duration_s: src.info.duration_s,
            upright,
            window,
            done: false,
            reseek: false,
        }
    }

    /// Before a pass over the source: seeks to the window's next keyframe, if it has one
    /// to try. A first pass without a window (or a window without seeks) reads from the
    /// start.
    fn seek(&mut self, src: &mut Source) -> anyhow::Result<()> {
        let Some(w) = self.window.as_mut() else {
            return Ok(());
        };
        let retry = self.reseek;
        (self.last_pts, self.frames, self.done, self.reseek) = (None, 0, false, false);
        let Some(&at) = w.seeks.get(w.tried) else {
            if retry {
                return Err(permanent(
                    "cannot seek the source to the segment's start: every seek landed after it",
                ));
            }
            return Ok(());
        };
        w.tried += 1;
        if !src.seek(at) {
            if retry {
                return Err(permanent(
                    "the source cannot seek back to the segment's start",
                ));
            }
            // Still at the beginning: nothing was read yet.
            w.check_first = false;
            return Ok(());
        }
        // After seeking to the beginning, there is nothing earlier to try.
        w.check_first = w.tried < w.seeks.len();
        Ok(())
    }

    /// Whether a seek landed where decoding can start: the first video packet after it
    /// is a keyframe at or before the window's start. Sets `reseek` when it is not.
    fn lands_well(&mut self, packet: &Packet) -> bool {
        let Some(w) = self.window.as_mut() else {
            return true;
        };
        if !std::mem::take(&mut w.check_first) {
            return true;
        }
        let offset = self.offset;
        let good = packet.is_key()
            && packet
                .pts()
                .is_some_and(|p| w.start.is_none_or(|s| p - offset <= s));
        self.reseek = !good;
        good
    }

    /// Whether the frame at `pts` is handed on: not a duplicate, inside the window.
    /// Sets `done` when the window's end is reached.
    fn keep(&mut self, pts: i64) -> bool {
        // Encoders and muxers need strictly increasing timestamps; a repeated one is
        // a duplicate frame and is dropped.
        if self.last_pts.is_some_and(|last| pts <= last) {
            return false;
        }
        self.last_pts = Some(pts);
        if let Some(w) = &self.window {
            if w.start.is_some_and(|s| pts < s) {
                return false;
            }
            if w.end.is_some_and(|e| pts >= e) {
                self.done = true;
                return false;
            }
        }
        true
    }

    fn percent(&self, pts: i64, tb: Rational) -> Option<f64> {
        let t = seconds(pts, tb);
        match &self.window {
            None => (self.duration_s > 0.0).then(|| t / self.duration_s * 100.0),
            Some(w) => {
                let start = w.start.map_or(0.0, |s| seconds(s, tb));
                let end = w.end.map_or(self.duration_s, |e| seconds(e, tb));
                (end > start).then(|| (t - start) / (end - start) * 100.0)
            }
        }
    }

    fn drain(
        &mut self,
        dec: &mut VideoDecoder,
        senders: &[SyncSender<Msg>],
        ctx: &JobContext,
    ) -> anyhow::Result<()> {
        loop {
            let mut frame = frame::Video::empty();
            if !dec.receive(&mut frame)? {
                return Ok(());
            }
            let pts = match frame.timestamp() {
                Some(ts) => ts - self.offset,
                None => self.last_pts.map_or(0, |p| p + self.step),
            };
            if !self.keep(pts) {
                if self.done {
                    return Ok(());
                }
                continue;
            }
            self.frames += 1;
            frame.set_pts(Some(pts));
            // Keyframes are placed by the fixed GOP, not copied from the source (x264
            // would obey a source I-frame and break the alignment across renditions).
            frame.set_kind(picture::Type::None);
            if let Some(graph) = self.upright.as_mut() {
                graph.push(&frame)?;
                self.pull(senders)?;
            } else {
                let frame = Arc::new(frame);
                broadcast(senders, || Msg::Video(Arc::clone(&frame)))?;
            }
            if let Some(percent) = self.percent(pts, dec.time_base) {
                ctx.progress(percent);
            }
        }
    }

    /// Upright frames out of the rotation graph.
    fn pull(&mut self, senders: &[SyncSender<Msg>]) -> anyhow::Result<()> {
        let Some(graph) = self.upright.as_mut() else {
            return Ok(());
        };
        loop {
            let mut up = frame::Video::empty();
            if !graph.pull(0, &mut up)? {
                return Ok(());
            }
            up.set_kind(picture::Type::None);
            let up = Arc::new(up);
            broadcast(senders, || Msg::Video(Arc::clone(&up)))?;
        }
    }

    fn flush(&mut self, senders: &[SyncSender<Msg>]) -> anyhow::Result<()> {
        if let Some(graph) = self.upright.as_mut() {
            graph.flush()?;
        }
        self.pull(senders)
    }

    fn last_s(&self, tb: Rational) -> f64 {
        self.last_pts.map_or(0.0, |p| seconds(p + self.offset, tb))
    }
}

/// Decoded audio on its way to the renditions: resampled once, AAC-encoded once per bit
/// rate, each packet handed to the renditions of that bit rate.
pub(crate) struct AudioPath {
    pub index: usize,
    decoder: ffmpeg::decoder::Audio,
    graph: FrameGraph,
    pub encoders: Vec<AudioEncoder>,
    /// Rendition i's encoder is `encoders[route[i]]`.
    pub route: Vec<usize>,
    pub time_base: Rational,
    pub offset: i64,
    /// The CMAF audio rendition (`encoders[.0]`'s packets), when the job asks for CMAF.
    cmaf: Option<(usize, Muxers)>,
}

/// Where the audio path's AAC packets go: `(encoder index, packet)`.
pub(crate) type AudioSink<'a> = dyn FnMut(usize, Packet) -> anyhow::Result<()> + 'a;

impl AudioPath {
    /// The source's audio, decoded and resampled once, with one AAC encoder per distinct
    /// bit rate of `rates` (rendition i's audio bit rate is `rates[i]`).
    pub(crate) fn open(
        src: &Source,
        a: &media::AudioInfo,
        rates: &[u32],
        cfg: &TranscoderSettings,
    ) -> anyhow::Result<Self> {
        let a_tb = src.time_base(a.index)?;
        let dec = src.audio_decoder(a)?;
        let chain = format!(
            "aresample={},aformat=sample_fmts=fltp:channel_layouts=stereo",
            cfg.audio_sample_rate
        );
        let graph = FrameGraph::audio(&dec, a_tb, &[chain], AAC_FRAME_SIZE)?;
        // One AAC encoder per distinct bit rate; `route[i]` is rendition i's.
        let mut encoders: Vec<AudioEncoder> = Vec::new();
        let mut route = Vec::with_capacity(rates.len());
        for &kbps in rates {
            let at = match encoders.iter().position(|e| e.kbps == kbps) {
                Some(at) => at,
                None => {
                    encoders.push(AudioEncoder::open(kbps, cfg.audio_sample_rate)?);
                    encoders.len() - 1
                }
            };
            route.push(at);
        }
        Ok(Self {
            index: a.index,
            decoder: dec,
            graph,
            encoders,
            route,
            time_base: a_tb,
            offset: 0,
            cmaf: None,
        })
    }

    /// Also writes the CMAF audio rendition under `dir`, from the encoder of the highest
    /// bit rate (one audio rendition serves every video rendition).
    pub(crate) fn write_cmaf(
        &mut self,
        cfg: &TranscoderSettings,
        dir: &Path,
    ) -> anyhow::Result<()> {
        let Some((at, best)) = self.encoders.iter().enumerate().max_by_key(|(_, e)| e.kbps) else {
            return Ok(());
        };
        let params = codec::Parameters::from(&best.encoder);
        let muxers = Muxers::open_cmaf_audio(cfg, (&params, best.time_base), dir)?;
        self.cmaf = Some((at, muxers));
        Ok(())
    }

    /// Closes the CMAF audio rendition: its media playlist, if one was written.
    pub(crate) fn finish_cmaf(&mut self) -> anyhow::Result<Option<PathBuf>> {
        match self.cmaf.take() {
            Some((_, muxers)) => Ok(muxers.finish()?.into_iter().next().map(|(_, p)| p)),
            None => Ok(None),
        }
    }

    pub(crate) fn send(&mut self, packet: &Packet) {
        // A damaged audio packet costs a few milliseconds of sound; the video decides
        // whether the source is corrupt.
        let _ = self.decoder.send_packet(packet);
    }

    pub(crate) fn drain(&mut self, sink: &mut AudioSink<'_>) -> anyhow::Result<()> {
        let mut frame = frame::Audio::empty();
        while self.decoder.receive_frame(&mut frame).is_ok() {
            let pts = frame.timestamp().map(|t| t - self.offset);
            frame.set_pts(pts);
            self.graph.push(&frame)?;
            self.pull(sink)?;
        }
        Ok(())
    }

    fn pull(&mut self, sink: &mut AudioSink<'_>) -> anyhow::Result<()> {
        loop {
            let mut out = frame::Audio::empty();
            if !self.graph.pull(0, &mut out)? {
                return Ok(());
            }
            self.encode(Some(&out), sink)?;
        }
    }

    /// Encodes `frame` (or drains, with `None`) with every encoder and hands the packets
    /// to `sink`.
    fn encode(
        &mut self,
        frame: Option<&frame::Audio>,
        sink: &mut AudioSink<'_>,
    ) -> anyhow::Result<()> {
        for (e, encoder) in self.encoders.iter_mut().enumerate() {
            for packet in encoder.encode(frame)? {
                if let Some((_, cmaf)) = self.cmaf.as_mut().filter(|(at, _)| *at == e) {
                    cmaf.write(&packet, true, encoder.time_base)?;
                }
                sink(e, packet)?;
            }
        }
        Ok(())
    }

    pub(crate) fn finish(&mut self, sink: &mut AudioSink<'_>) -> anyhow::Result<()> {
        let _ = self.decoder.send_eof();
        self.drain(sink)?;
        self.graph.flush()?;
        self.pull(sink)?;
        self.encode(None, sink)
    }
}

/// Writes the HLS master playlist (and the CMAF manifests, with the CMAF audio
/// rendition's media playlist `cmaf_audio`) and lists every file for the manifest.
#[allow(clippy::too_many_arguments)]
pub(crate) fn collect_outputs(
    job: &TranscodeJob,
    info: &media::SourceInfo,
    finished: &[Finished],
    cmaf_audio: Option<&Path>,
    dropped: &[String],
    frame_rate: Rational,
    ctx: &JobContext,
    started: Instant,
) -> anyhow::Result<TaskOutput> {
    let info = serde_json::to_value(info).context("describing the source")?;
    collect_outputs_of(
        job,
        info,
        finished,
        cmaf_audio,
        dropped,
        f64::from(frame_rate),
        ctx,
        started,
    )
}

/// [`collect_outputs`] for a source known by its probe's JSON (a stitch reads it from
/// the first segment's manifest); `frame_rate` is the rate the renditions were clocked at.
#[allow(clippy::too_many_arguments)]
pub(crate) fn collect_outputs_of(
    job: &TranscodeJob,
    info: serde_json::Value,
    finished: &[Finished],
    cmaf_audio: Option<&Path>,
    dropped: &[String],
    frame_rate: f64,
    ctx: &JobContext,
    started: Instant,
) -> anyhow::Result<TaskOutput> {
    let mut out = TaskOutput::default();
    let mut variants = Vec::new();
    let mut cmaf_renditions = Vec::new();
    for f in finished {
        for (kind, path) in &f.files {
            match kind {
                OutputFormat::Mp4 => push_mp4(&mut out, f, path)?,
                OutputFormat::Hls => {
                    // MPEG-TS renditions are H.264 at the level asked of x264.
                    let codecs = hls::codecs(f.level, f.has_audio);
                    variants.push(push_hls(&mut out, f, path, &codecs, frame_rate)?);
                }
                OutputFormat::Cmaf => cmaf_renditions.push(cmaf::Rendition {
                    plan: &f.plan,
                    playlist: path,
                }),
            }
        }
    }
    if !cmaf_renditions.is_empty() {
        cmaf::package(
            &mut out,
            ctx.scratch_dir()?,
            &cmaf_renditions,
            cmaf_audio,
            frame_rate,
        )?;
    }
    if !variants.is_empty() {
        let master = ctx.scratch_dir()?.join("hls").join("master.m3u8");
        std::fs::write(&master, hls::master_playlist(&variants)).context("scratch space")?;
        out.push(
            "hls/master.m3u8",
            master,
            json!({"format": "hls-master-playlist", "variants": variants.len()}),
        );
    }
    out.summary = json!({
        "source": info,
        "renditions": finished.iter().map(|f| &f.plan).collect::<Vec<_>>(),
        "dropped_renditions": dropped,
        "formats": job.formats,
        "codecs": job.codecs,
        "elapsed_s": round3(started.elapsed().as_secs_f64()),
    });
    Ok(out)
}

/// Lists a rendition's MP4 file with its facts (its codec strings read from the file).
fn push_mp4(out: &mut TaskOutput, f: &Finished, path: &Path) -> anyhow::Result<()> {
    let size = std::fs::metadata(path).context("scratch space")?.len();
    let codecs =
        crate::fmp4::file_codecs(path).with_context(|| format!("reading {}", path.display()))?;
    out.push(
        format!("{}.mp4", f.plan.name),
        path,
        json!({
            "format": "mp4",
            "rendition": f.plan.name,
            "width": f.plan.width,
            "height": f.plan.height,
            "duration_s": round3(f.duration_s),
            "bitrate_kbps": kbps(size, f.duration_s),
            "video_kbps_cap": f.plan.video_kbps,
            "audio_kbps": f.has_audio.then_some(f.plan.audio_kbps),
            "video_codec": f.codec.name(),
            "audio_codec": f.has_audio.then_some("aac"),
            "codecs": codecs,
        }),
    );
    Ok(())
}

/// Lists a rendition's HLS media playlist and segments with their facts; its entry in
/// the master playlist.
fn push_hls(
    out: &mut TaskOutput,
    f: &Finished,
    path: &Path,
    codecs: &str,
    frame_rate: f64,
) -> anyhow::Result<hls::Variant> {
    let (peak, average, segments) = hls::measure(path).context("scratch space")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    out.push(
        format!("hls/{}/index.m3u8", f.plan.name),
        path,
        json!({
            "format": "hls-media-playlist",
            "rendition": f.plan.name,
            "width": f.plan.width,
            "height": f.plan.height,
            "duration_s": round3(f.duration_s),
            "segments": segments.len(),
            "peak_kbps": peak / 1000,
            "average_kbps": average / 1000,
            "codecs": codecs,
        }),
    );
    for s in &segments {
        out.push(
            format!("hls/{}/{s}", f.plan.name),
            dir.join(s),
            json!({"format": "mpegts", "rendition": f.plan.name}),
        );
    }
    Ok(hls::Variant {
        uri: format!("{}/index.m3u8", f.plan.name),
        bandwidth: peak,
        average_bandwidth: average,
        width: f.plan.width,
        height: f.plan.height,
        frame_rate,
        codecs: codecs.to_owned(),
    })
}

fn kbps(bytes: u64, seconds: f64) -> u64 {
    if seconds > 0.0 {
        (bytes as f64 * 8.0 / seconds / 1000.0).round() as u64
    } else {
        0
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::JobError;

    #[test]
    fn the_failed_rendition_explains_the_run_not_its_senders() {
        let stopped = || Err(anyhow::Error::new(StoppedEarly).context("rendition 1080p"));
        let own = || Err(permanent("x264 refused").context("rendition 720p"));
        let got = first_error(Err(StoppedEarly.into()), vec![stopped(), own()])
            .err()
            .expect("the run failed");
        assert_eq!(
            JobError::classify(got),
            JobError::Permanent("rendition 720p: x264 refused".into())
        );
        let got = first_error(Err(Cancelled.into()), vec![stopped()])
            .err()
            .expect("the run failed");
        assert_eq!(JobError::classify(got), JobError::Cancelled);
        let got = first_error(Ok(()), vec![stopped()])
            .err()
            .expect("the run failed");
        assert_eq!(
            JobError::classify(got),
            JobError::Permanent("rendition 1080p: a rendition encoder stopped early".into())
        );
    }

    #[test]
    fn encoder_threads_follow_picture_size() {
        let (ladder, _) = ladder::plan(&[], 1920, 1080);
        assert_eq!(encoder_threads(&ladder, 2), [2, 1, 1, 1]);
        assert_eq!(encoder_threads(&ladder, 8), [7, 3, 1, 1]);
        // One rendition gets what x264's "auto" would give it.
        assert_eq!(encoder_threads(&ladder[..1], 4), [6]);
    }
}
