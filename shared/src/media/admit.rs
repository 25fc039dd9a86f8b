//! The one way a source is opened: as one of the containers a video platform takes,
//! decided from its own bytes before FFmpeg reads anything else, and never as something
//! that opens other files.
//!
//! FFmpeg picks a demuxer by content, and some demuxers (`hls`, `dash`, `concat`,
//! `image2`, …) open the files and URLs the source names. On an upload service that is a
//! file-disclosure hole: a "video" that is an HLS playlist listing
//! `../<another job>/source.mp4` turns another customer's upload into this job's
//! outputs. So, in this order:
//!
//! 1. text that lists other files (playlists, manifests, concat lists) is refused with a
//!    reason from [`crate::sniff`], before FFmpeg sees a byte;
//! 2. FFmpeg's own prober names the container from the file's first bytes (up to 1 MiB,
//!    as FFmpeg itself would, but with no file name, so the extension cannot sway it);
//! 3. a container outside [`ACCEPTED`] is refused with its name;
//! 4. the file is opened with exactly that demuxer forced, `format_whitelist` set to it,
//!    `protocol_whitelist=file`, and an `io_open` callback that refuses every open but the
//!    source's own: no demuxer can reach another file, whatever it tries.
//!
//! The FFI calls of this crate live here, each with what it relies on (but the read of
//! the keyframe index, in [`super::keyframes`]): the restricted open, the decoder's pixel
//! cap, and the read of a stream's codec parameters ([`codec_params`]).
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io::Read;
use std::os::raw::{c_char, c_int};
use std::path::Path;
use std::ptr;

use anyhow::Context as _;
use ffmpeg::format::context::Input;
use ffmpeg::sys as ff;
use ffmpeg_next as ffmpeg;

use super::init;
use crate::outcome::{PermanentExt as _, permanent};

/// Demuxers (FFmpeg's names) a source may be opened with, and what a person calls them.
/// None of these opens another file with FFmpeg's defaults; `enable_drefs` (MP4 data
/// references to other files) is also forced off below.
pub const ACCEPTED: &[(&str, &str)] = &[
    ("mov,mp4,m4a,3gp,3g2,mj2", "MP4/MOV"),
    ("matroska,webm", "Matroska/WebM"),
    ("mpegts", "MPEG-TS"),
    ("mpeg", "MPEG-PS"),
    ("avi", "AVI"),
    ("flv", "FLV"),
    ("h264", "raw H.264"),
    ("hevc", "raw H.265"),
];

/// The names of [`ACCEPTED`] as a person reads them.
pub fn accepted_names() -> String {
    ACCEPTED
        .iter()
        .map(|(_, human)| *human)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The most FFmpeg's prober reads to name a container (its own `probesize` cap).
const PROBE_MAX: usize = 1 << 20;
/// FFmpeg's own first probe size; it doubles up to [`PROBE_MAX`].
const PROBE_MIN: usize = 2048;

/// Opens `path` as an accepted container, with stream information read.
pub fn open_input(path: &Path) -> anyhow::Result<Input> {
    init();
    let head = read_head(path)?;
    if let Some(reason) = crate::sniff::refusal(&head) {
        return Err(permanent(reason));
    }
    let format = probe(&head).ok_or_else(|| {
        permanent(format!(
            "source is not a video file FFmpeg can read (no known container in its first \
             bytes); accepted: {}",
            accepted_names()
        ))
    })?;
    // SAFETY: `probe` returns one of FFmpeg's static demuxer descriptions, valid for the
    // life of the process; `name` and `long_name` are static C strings.
    let (name, long_name) = unsafe {
        (
            CStr::from_ptr((*format).name)
                .to_string_lossy()
                .into_owned(),
            c_str_or_empty((*format).long_name),
        )
    };
    if !ACCEPTED.iter().any(|(n, _)| *n == name) {
        return Err(permanent(refusal_for(&name, &long_name)));
    }
    open_restricted(path, format, &name).map_err(|e| {
        permanent(format!(
            "source is not a video file FFmpeg can read (as {name}: {e})"
        ))
    })
}

/// Why a container outside the allow-list is refused, in words a person can act on.
fn refusal_for(name: &str, long_name: &str) -> String {
    let what = match name {
        "hls" => "an HLS playlist (.m3u8)".to_owned(),
        "dash" => "a DASH manifest (.mpd)".to_owned(),
        "concat" => "an FFmpeg concat list".to_owned(),
        n if n.starts_with("image2") || n.ends_with("_pipe") => {
            format!("a still image ({long_name})")
        }
        n if ["mp3", "wav", "flac", "ogg", "aac", "ac3", "w64", "aiff"].contains(&n) => {
            format!("an audio file ({long_name})")
        }
        n if ["srt", "ass", "webvtt", "subviewer", "microdvd", "tty"].contains(&n) => {
            format!("a text or subtitle file ({long_name})")
        }
        n => format!("in the `{n}` format ({long_name})"),
    };
    format!(
        "source is {what}, which vidpipe does not take as a video; upload the video file \
         itself, in one of: {}",
        accepted_names()
    )
}

/// The file's first [`PROBE_MAX`] bytes.
fn read_head(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut head = Vec::with_capacity(64 * 1024);
    std::fs::File::open(path)
        .and_then(|f| f.take(PROBE_MAX as u64).read_to_end(&mut head))
        .context("cannot read the source")
        .permanent()?;
    Ok(head)
}

/// FFmpeg's prober over `head`, the way `av_probe_input_buffer2` runs it (growing
/// windows until a confident answer), but with no file name and no I/O of its own.
fn probe(head: &[u8]) -> Option<*const ff::AVInputFormat> {
    let mut size = PROBE_MIN.min(head.len());
    loop {
        let last = size >= head.len();
        // The prober may read up to AVPROBE_PADDING_SIZE bytes past the end: zeros.
        let mut buf = Vec::with_capacity(size + ff::AVPROBE_PADDING_SIZE as usize);
        buf.extend_from_slice(&head[..size]);
        buf.resize(size + ff::AVPROBE_PADDING_SIZE as usize, 0);
        let empty = c"";
        let data = ff::AVProbeData {
            filename: empty.as_ptr(),
            buf: buf.as_mut_ptr(),
            buf_size: size as c_int,
            mime_type: ptr::null(),
        };
        let mut score: c_int = 0;
        // SAFETY: `data` points at `size` readable bytes plus the zeroed padding FFmpeg
        // requires, and outlives the call; the result is a static demuxer or null.
        let format = unsafe { ff::av_probe_input_format3(&data, 1, &mut score) };
        let confident = score > ff::AVPROBE_SCORE_MAX as c_int / 4;
        if !format.is_null() && (confident || last) {
            return Some(format);
        }
        if last {
            return None;
        }
        size = (size * 2).min(head.len());
    }
}

/// `avformat_open_input` + `avformat_find_stream_info` with `format` forced, only the
/// demuxers in `whitelist` (the forced one, in production) and every other file out of
/// reach.
fn open_restricted(
    path: &Path,
    format: *const ff::AVInputFormat,
    whitelist: &str,
) -> Result<Input, ffmpeg::Error> {
    let url =
        CString::new(format!("file:{}", path.display())).map_err(|_| ffmpeg::Error::InvalidData)?;
    let mut options = Dictionary::default();
    options.set("format_whitelist", whitelist);
    options.set("protocol_whitelist", "file");
    options.set("enable_drefs", "0");
    // SAFETY: `ctx` is freshly allocated and owned here until it is either handed to
    // `Input` (which closes it on drop) or closed on failure; `avformat_open_input` frees
    // it itself when it fails. `format` is a static demuxer. `io_open` is replaced before
    // any I/O; FFmpeg's default `io_close2` (avio_close) matches the AVIOContext our
    // callback opens with `avio_open2`.
    unsafe {
        let mut ctx = ff::avformat_alloc_context();
        if ctx.is_null() {
            return Err(ffmpeg::Error::Other { errno: 12 });
        }
        (*ctx).io_open = Some(source_only);
        let ret = ff::avformat_open_input(&mut ctx, url.as_ptr(), format, options.as_mut_ptr());
        if ret < 0 {
            return Err(ffmpeg::Error::from(ret));
        }
        let ret = ff::avformat_find_stream_info(ctx, ptr::null_mut());
        if ret < 0 {
            ff::avformat_close_input(&mut ctx);
            return Err(ffmpeg::Error::from(ret));
        }
        Ok(Input::wrap(ctx))
    }
}

/// FFmpeg's `io_open`: opens the source itself (the first open, while the context has no
/// I/O yet) through the `file` protocol only; refuses anything else a demuxer asks for.
unsafe extern "C" fn source_only(
    s: *mut ff::AVFormatContext,
    pb: *mut *mut ff::AVIOContext,
    url: *const c_char,
    flags: c_int,
    _options: *mut *mut ff::AVDictionary,
) -> c_int {
    const EPERM: c_int = 1;
    // SAFETY: FFmpeg calls this with its own live context and a valid C string.
    unsafe {
        let first = (*s).pb.is_null();
        let own_url = !(*s).url.is_null() && CStr::from_ptr(url) == CStr::from_ptr((*s).url);
        if !first || !own_url || flags & ff::AVIO_FLAG_WRITE as c_int != 0 {
            return -EPERM;
        }
        let mut options = Dictionary::default();
        options.set("protocol_whitelist", "file");
        ff::avio_open2(
            pb,
            url,
            flags,
            &(*s).interrupt_callback,
            options.as_mut_ptr(),
        )
    }
}

/// An owned `AVDictionary` of options, freed on drop.
struct Dictionary(*mut ff::AVDictionary);

impl Default for Dictionary {
    fn default() -> Self {
        Self(ptr::null_mut())
    }
}

impl Dictionary {
    fn set(&mut self, key: &str, value: &str) {
        let (k, v) = (
            CString::new(key).expect("option name"),
            CString::new(value).expect("option value"),
        );
        // SAFETY: av_dict_set copies both strings (flags 0) and manages the allocation.
        unsafe {
            ff::av_dict_set(&mut self.0, k.as_ptr(), v.as_ptr(), 0);
        }
    }

    fn as_mut_ptr(&mut self) -> *mut *mut ff::AVDictionary {
        &mut self.0
    }
}

impl Drop for Dictionary {
    fn drop(&mut self) {
        // SAFETY: the dictionary was made by av_dict_set (or is null, which is allowed).
        unsafe { ff::av_dict_free(&mut self.0) }
    }
}

/// A C string that may be null, as Rust text.
///
/// # Safety
/// `s` is null or a valid NUL-terminated string.
unsafe fn c_str_or_empty(s: *const c_char) -> String {
    if s.is_null() {
        String::new()
    } else {
        // SAFETY: the caller promises a valid C string.
        unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
    }
}

/// What a stream's codec parameters say, as the demuxer and FFmpeg's stream-info pass
/// left them: read straight from them, so describing a stream opens no decoder (the one
/// decoder context of a source is the worker's [`super::VideoDecoder`]).
#[derive(Debug, Clone, Copy)]
pub struct CodecParams {
    pub width: u32,
    pub height: u32,
    /// Pixel aspect ratio; 0 in either part: unset (square).
    pub sample_aspect_ratio: ffmpeg::Rational,
    /// `None` (FFmpeg's `AV_PIX_FMT_NONE`) when unknown or not a video stream.
    pub pixel_format: ffmpeg::format::Pixel,
    pub sample_rate: u32,
    pub channels: u16,
}

/// [`CodecParams`] of `stream`.
pub fn codec_params(stream: &ffmpeg::format::stream::Stream) -> CodecParams {
    let parameters = stream.parameters();
    // SAFETY: `parameters` wraps the live AVCodecParameters of `stream`, whose input is
    // borrowed for this call; plain fields are copied out and nothing is kept. `format`
    // is turned into the pixel-format enum only for video and only within the enum's
    // range (FFmpeg's AVPixelFormat numbers its members without gaps, from
    // AV_PIX_FMT_NONE to AV_PIX_FMT_NB), so the transmute always yields a member.
    unsafe {
        let p = &*parameters.as_ptr();
        let video = p.codec_type == ff::AVMediaType::AVMEDIA_TYPE_VIDEO;
        let known = (ff::AVPixelFormat::AV_PIX_FMT_NONE as c_int
            ..ff::AVPixelFormat::AV_PIX_FMT_NB as c_int)
            .contains(&p.format);
        let pixel_format = if video && known {
            std::mem::transmute::<c_int, ff::AVPixelFormat>(p.format).into()
        } else {
            ffmpeg::format::Pixel::None
        };
        CodecParams {
            width: u32::try_from(p.width).unwrap_or(0),
            height: u32::try_from(p.height).unwrap_or(0),
            sample_aspect_ratio: p.sample_aspect_ratio.into(),
            pixel_format,
            sample_rate: u32::try_from(p.sample_rate).unwrap_or(0),
            channels: u16::try_from(p.ch_layout.nb_channels).unwrap_or(0),
        }
    }
}

/// Caps the picture size `decoder` will allocate: frames over `max_pixels` fail to decode
/// instead of being allocated (a stream that jumps to 8K mid-way costs no 8K buffers).
pub fn set_max_pixels(decoder: &mut ffmpeg::codec::context::Context, max_pixels: i64) {
    // SAFETY: `max_pixels` is a plain field of the live codec context, read by FFmpeg
    // when it sizes pictures; setting it before the decoder opens is documented use.
    unsafe {
        (*decoder.as_mut_ptr()).max_pixels = max_pixels;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `io_open` guard on its own, with FFmpeg's HLS demuxer forced past the
    /// allow-list: the playlist's segment is never opened. As a control, FFmpeg's plain open
    /// of the same playlist does read the segment's video.
    #[test]
    fn a_forced_playlist_demuxer_still_cannot_open_the_files_it_names() {
        init();
        let dir = tempfile::tempdir().unwrap();
        let segment = dir.path().join("segment.ts");
        let made = std::process::Command::new("ffmpeg")
            .args(["-y", "-loglevel", "error", "-f", "lavfi", "-i"])
            .arg("testsrc2=size=64x48:rate=10:duration=1")
            .args(["-c:v", "mpeg2video"])
            .arg(&segment)
            .status()
            .expect("this test needs the ffmpeg CLI (apt-get install ffmpeg)");
        assert!(made.success());
        let playlist = dir.path().join("list.m3u8");
        std::fs::write(
            &playlist,
            "#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\nsegment.ts\n#EXT-X-ENDLIST\n",
        )
        .unwrap();

        let control = ffmpeg::format::input(&playlist).expect("FFmpeg reads the playlist");
        assert!(
            control.streams().best(ffmpeg::media::Type::Video).is_some(),
            "control: FFmpeg's own open reaches the segment's video"
        );

        // SAFETY: a static demuxer description, or null.
        let hls = unsafe { ff::av_find_input_format(c"hls".as_ptr()) };
        assert!(!hls.is_null(), "this FFmpeg has the hls demuxer");
        // The segment's demuxer whitelisted too: only the guard stands in the way.
        match open_restricted(&playlist, hls, "hls,mpegts") {
            Err(_) => {}
            Ok(input) => assert!(
                input.streams().best(ffmpeg::media::Type::Video).is_none(),
                "the segment was opened through the guard"
            ),
        }
    }

    #[test]
    fn playlists_are_refused_by_name_before_ffmpeg_opens_them() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("clip.mp4");
        std::fs::write(&fake, "#EXTM3U\n#EXTINF:1,\n../other/source.mp4\n").unwrap();
        let err = open_input(&fake).err().expect("refused");
        assert!(err.to_string().contains("HLS playlist"), "{err}");
    }
}
