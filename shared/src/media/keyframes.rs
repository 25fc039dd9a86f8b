//! The container's keyframe index (MP4, Matroska/WebM, … have one; MPEG-TS has none):
//! where a seek lands, read once per source ([`super::Source::keyframes`]).
//!
//! The safe ffmpeg-next API does not expose the index, so this module makes the one FFI
//! read of it, with what that relies on.
#![allow(unsafe_code)]

use ffmpeg::format::context::Input;
use ffmpeg_next as ffmpeg;

use super::seconds;
use super::source::stream_start_s;

/// Keyframe times of stream `index` (seconds from the start of the video, sorted) from
/// the container's index; empty when the container has none.
pub fn indexed(input: &Input, index: usize) -> Vec<f64> {
    let Some(stream) = input.stream(index) else {
        return Vec::new();
    };
    let tb = stream.time_base();
    let offset_s = stream_start_s(&stream).unwrap_or(0.0);
    // SAFETY: the pointer is the live AVStream of `input`, borrowed for this call. Each
    // entry is copied out before any other FFmpeg call touches the stream, which is how
    // long FFmpeg guarantees an entry pointer stays valid.
    let mut raw: Vec<i64> = unsafe {
        let st = stream.as_ptr() as *mut ffmpeg::ffi::AVStream;
        let n = ffmpeg::ffi::avformat_index_get_entries_count(st);
        (0..n)
            .filter_map(|i| {
                let e = ffmpeg::ffi::avformat_index_get_entry(st, i);
                (!e.is_null() && (*e).flags() & ffmpeg::ffi::AVINDEX_KEYFRAME != 0)
                    .then(|| (*e).timestamp)
            })
            .collect()
    };
    raw.sort_unstable();
    // Some containers index decoding times (MP4: a keyframe's DTS is its PTS minus the
    // B-frame reorder delay), others presentation times (Matroska). The first keyframe is
    // shown at the stream's start, so the gap between the two is that delay: without
    // this, a target just before a keyframe looks as if it came after it, and the grabber
    // seeks back to decode a stretch it already decoded.
    let delay = raw
        .first()
        .map_or(0.0, |first| offset_s - seconds(*first, tb))
        .clamp(0.0, 1.0);
    raw.into_iter()
        .map(|ts| seconds(ts, tb) - offset_s + delay)
        .collect()
}
