//! HLS bookkeeping FFmpeg's muxer does not do for us: the master playlist naming every
//! variant with its bandwidth, resolution and codecs, and the H.264 level that goes into
//! the `CODECS` attribute.

use std::fmt::Write as _;
use std::path::Path;

/// One variant stream of the master playlist.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Media playlist URI relative to the master, e.g. `720p/index.m3u8`.
    pub uri: String,
    /// Peak segment bit rate, bits/s.
    pub bandwidth: u64,
    /// Average bit rate over the whole stream, bits/s.
    pub average_bandwidth: u64,
    pub width: u32,
    pub height: u32,
    pub frame_rate: f64,
    /// RFC 6381 codecs, e.g. `avc1.64001f,mp4a.40.2`.
    pub codecs: String,
}

/// An audio rendition group of the master playlist (one rendition, the default; stereo,
/// as the pipeline always resamples to).
#[derive(Debug, Clone)]
pub struct AudioGroup {
    /// The `GROUP-ID` every variant names in `AUDIO`.
    pub id: String,
    /// Its media playlist, relative to the master.
    pub uri: String,
}

/// The master playlist text (MPEG-TS variants with their own audio: version 3).
pub fn master_playlist(variants: &[Variant]) -> String {
    master_playlist_with(3, None, variants)
}

/// The master playlist text at protocol `version`, with the variants' audio as a
/// separate rendition `audio` when given.
pub fn master_playlist_with(
    version: u32,
    audio: Option<&AudioGroup>,
    variants: &[Variant],
) -> String {
    let mut out = format!("#EXTM3U\n#EXT-X-VERSION:{version}\n#EXT-X-INDEPENDENT-SEGMENTS\n");
    if let Some(a) = audio {
        let _ = writeln!(
            out,
            "#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"{id}\",NAME=\"{id}\",DEFAULT=YES,AUTOSELECT=YES,CHANNELS=\"2\",URI=\"{}\"",
            a.uri,
            id = a.id
        );
    }
    for v in variants {
        let _ = write!(
            out,
            "#EXT-X-STREAM-INF:BANDWIDTH={},AVERAGE-BANDWIDTH={},RESOLUTION={}x{},CODECS=\"{}\"",
            v.bandwidth.max(1),
            v.average_bandwidth.max(1),
            v.width,
            v.height,
            v.codecs
        );
        if v.frame_rate > 0.0 {
            let _ = write!(out, ",FRAME-RATE={:.3}", v.frame_rate);
        }
        if let Some(a) = audio {
            let _ = write!(out, ",AUDIO=\"{}\"", a.id);
        }
        let _ = writeln!(out, "\n{}", v.uri);
    }
    out
}

/// Peak and average bit rate (bits/s) of a media playlist's segments, from their
/// `#EXTINF` durations and their sizes on disk.
pub fn measure(playlist: &Path) -> std::io::Result<(u64, u64, Vec<String>)> {
    let text = std::fs::read_to_string(playlist)?;
    let dir = playlist.parent().unwrap_or(Path::new("."));
    let (mut peak, mut total_bits, mut total_s) = (0f64, 0f64, 0f64);
    let mut pending: Option<f64> = None;
    let mut segments = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("#EXTINF:") {
            pending = rest.split(',').next().and_then(|d| d.trim().parse().ok());
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let bits = std::fs::metadata(dir.join(line.trim()))?.len() as f64 * 8.0;
            let secs = pending.take().unwrap_or(0.0);
            if secs > 0.0 {
                peak = peak.max(bits / secs);
            }
            total_bits += bits;
            total_s += secs;
            segments.push(line.trim().to_owned());
        }
    }
    let average = if total_s > 0.0 {
        total_bits / total_s
    } else {
        0.0
    };
    Ok((peak.ceil() as u64, average.ceil() as u64, segments))
}

/// The lowest H.264 level (times ten, e.g. 31 for 3.1) whose frame-size and
/// macroblock-rate limits fit `width`x`height` at `fps`.
pub fn h264_level(width: u32, height: u32, fps: f64) -> u32 {
    // (level, max macroblocks per frame, max macroblocks per second), from the H.264 spec.
    const LEVELS: [(u32, u64, u64); 11] = [
        (21, 792, 19_800),
        (22, 1_620, 20_250),
        (30, 1_620, 40_500),
        (31, 3_600, 108_000),
        (32, 5_120, 216_000),
        (40, 8_192, 245_760),
        (42, 8_704, 522_240),
        (50, 22_080, 589_824),
        (51, 36_864, 983_040),
        (52, 36_864, 2_073_600),
        (60, 139_264, 4_177_920),
    ];
    let mbs = u64::from(width.div_ceil(16)) * u64::from(height.div_ceil(16));
    let per_s = (mbs as f64 * fps.max(1.0)).ceil() as u64;
    LEVELS
        .iter()
        .find(|(_, frame, rate)| mbs <= *frame && per_s <= *rate)
        .map_or(62, |(level, _, _)| *level)
}

/// `avc1.64xxxx` for High profile at `level`, plus AAC-LC when there is audio.
pub fn codecs(level: u32, audio: bool) -> String {
    let video = format!("avc1.6400{level:02x}");
    if audio {
        format!("{video},mp4a.40.2")
    } else {
        video
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_match_common_sizes() {
        assert_eq!(h264_level(1920, 1080, 30.0), 40);
        assert_eq!(h264_level(1280, 720, 30.0), 31);
        assert_eq!(h264_level(640, 360, 30.0), 30);
        assert_eq!(h264_level(1920, 1080, 60.0), 42);
    }

    #[test]
    fn codecs_string_is_rfc6381() {
        assert_eq!(codecs(31, true), "avc1.64001f,mp4a.40.2");
        assert_eq!(codecs(40, false), "avc1.640028");
    }

    #[test]
    fn master_lists_each_variant_with_its_attributes() {
        let text = master_playlist(&[Variant {
            uri: "360p/index.m3u8".into(),
            bandwidth: 900_000,
            average_bandwidth: 700_000,
            width: 640,
            height: 360,
            frame_rate: 30.0,
            codecs: codecs(30, true),
        }]);
        assert!(text.starts_with("#EXTM3U\n"));
        assert!(text.contains(
            "#EXT-X-STREAM-INF:BANDWIDTH=900000,AVERAGE-BANDWIDTH=700000,RESOLUTION=640x360,CODECS=\"avc1.64001e,mp4a.40.2\",FRAME-RATE=30.000\n360p/index.m3u8\n"
        ));
    }
}
