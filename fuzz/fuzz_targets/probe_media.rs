//! The probe/decode path on mutated media: bytes → a file → `media::open` (the container
//! allow-list of `media::admit`, probe + limits) → `VideoDecoder` (limits on every frame)
//! → up to 50 video packets decoded.
//!
//! Every failure must come back as an `Err` (a permanent job error): a panic, an abort, a
//! sanitizer report or a timeout (`-timeout=N`) is a finding. One extra invariant from the
//! decoder wrapper: once `receive` has reported "needs more input", the next `send` must
//! not be refused with EAGAIN (the wrapper turns that into an "internal error").
//!
//! The file has no extension, like the workers' scratch `source` file, so FFmpeg picks the
//! demuxer from the content alone.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ffmpeg_next as ffmpeg;
use libfuzzer_sys::fuzz_target;
use shared::media::{self, MediaLimits, VideoDecoder};

/// Video packets decoded per input at most.
const MAX_VIDEO_PACKETS: usize = 50;
/// Packets read at most (any stream), so a file of endless audio packets stays cheap.
const MAX_PACKETS: usize = 500;
/// Frames drained after one packet at most (a safety net against a decoder that never
/// says "need more input").
const MAX_DRAIN: usize = 64;

/// One scratch file path per fuzzing process, written anew for every input.
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        media::init();
        std::env::temp_dir().join(format!("vidpipe-fuzz-probe-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("write the scratch file");

    let opened = media::open(path, &MediaLimits::default());
    // FFmpeg holds the file open by now; unlinking keeps /tmp clean when the process ends.
    let _ = std::fs::remove_file(path);
    let Ok(mut source) = opened else {
        return;
    };
    // Everything `open` accepted is used by the workers: touch the description too.
    let _ = format!("{:?}", source.info);
    let Ok(mut decoder) = source.decoder(1) else {
        return;
    };

    let mut frame = ffmpeg::frame::Video::empty();
    let mut video_packets = 0;
    let mut drained = true;
    for _ in 0..MAX_PACKETS {
        if video_packets >= MAX_VIDEO_PACKETS {
            break;
        }
        let mut packet = ffmpeg::Packet::empty();
        // Damaged packets are skipped within the workers' read-error budget.
        match source.packets().read(&mut packet) {
            Ok(true) => {}
            Ok(false) | Err(_) => break,
        }
        if packet.stream() != decoder.stream_index {
            continue;
        }
        video_packets += 1;
        if let Err(e) = decoder.send(&packet) {
            assert!(
                !(drained && e.to_string().starts_with("internal error")),
                "decoder refused a packet after being drained: {e}"
            );
        }
        drained = drain(&mut decoder, &mut frame);
    }
    decoder.send_eof();
    drain(&mut decoder, &mut frame);
});

/// Receives frames until the decoder wants more input; `true` if it said so.
fn drain(decoder: &mut VideoDecoder, frame: &mut ffmpeg::frame::Video) -> bool {
    for _ in 0..MAX_DRAIN {
        match decoder.receive(frame) {
            Ok(true) => {
                let _ = decoder.frame_seconds(frame);
            }
            Ok(false) => return true,
            // Corrupt data: the decoder may still have good frames after it.
            Err(_) => {}
        }
    }
    false
}
