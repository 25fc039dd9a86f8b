//! Planning a segmented transcode: where a long source is cut into ranges that different
//! workers encode, and how many frames each range must come out with.
//!
//! Ranges are frame-exact, not keyframe cuts: a segment's worker seeks to the source
//! keyframe before its range, decodes from there and keeps exactly the frames whose
//! timestamps fall in the range ([`crate::segment_encode`]). Boundaries sit on whole
//! multiples of the HLS segment length, so the stitched HLS cuts fall where the single
//! pass cuts them.
//!
//! The frame count of each range is what the stitch later holds every segment to, so it
//! is counted here the way the decoding path keeps frames, from the demuxed video
//! packets alone (no decoding): frames come out in presentation order, and a frame whose
//! timestamp does not move past the last one kept is a duplicate and dropped
//! (`pipeline::VideoPath`). When that count cannot be trusted (packets without
//! timestamps, no keyframe index to seek with, a stream that does not start on a
//! keyframe, too short to split), the plan is `None` and the caller does a single pass.

use std::path::Path;

use ffmpeg::Packet;
use ffmpeg_next as ffmpeg;
use serde::{Deserialize, Serialize};
use shared::media::{self, MediaLimits, seconds, timestamp};

use crate::parts::discarded;

/// One segment of a segmented transcode: the frames whose timestamps, on the output
/// timeline (source time minus `Source::start_s()`, as the single pass shifts them),
/// fall in `[start_s, end_s)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentRange {
    /// 0-based, in timeline order.
    pub index: u32,
    /// Seconds on the output timeline; the first segment's is 0 and takes every frame
    /// before its end.
    pub start_s: f64,
    /// `None` for the last segment (to the end of the source).
    pub end_s: Option<f64>,
    /// Video frames the decoding path outputs in the range.
    pub frames: u64,
}

impl SegmentRange {
    /// The range's bounds as timestamps in `time_base`: frames with `start <= pts < end`
    /// belong to it (`None`: unbounded). Planning and encoding both use this one rule.
    pub fn bounds(&self, time_base: ffmpeg::Rational) -> (Option<i64>, Option<i64>) {
        let start = (self.index > 0).then(|| timestamp(self.start_s, time_base));
        (start, self.end_s.map(|e| timestamp(e, time_base)))
    }
}

/// Cuts `source` into ranges of about `segment_s` (rounded to a whole multiple of
/// `hls_segment_s`, at least one) and counts each range's frames. `None` when the source
/// cannot be split safely (see the module docs): the caller does a single pass.
pub fn plan_ranges(
    source: &Path,
    limits: &MediaLimits,
    segment_s: f64,
    hls_segment_s: f64,
) -> anyhow::Result<Option<Vec<SegmentRange>>> {
    anyhow::ensure!(
        segment_s > 0.0 && hls_segment_s > 0.0,
        "segment lengths must be positive (segment_s {segment_s}, hls_segment_s {hls_segment_s})"
    );
    let mut src = media::open(source, limits)?;
    let index = src.info.video.index;
    let tb = src.time_base(index)?;
    let offset = timestamp(src.start_s(), tb);
    let Some((pts, keyframes)) = frame_times(&mut src, index, offset)? else {
        return Ok(None);
    };
    // One keyframe: every segment would decode the whole source before its range.
    if keyframes < 2 {
        return Ok(None);
    }
    let step = (segment_s / hls_segment_s).round().max(1.0) * hls_segment_s;
    Ok(split(&pts, tb, step))
}

/// The video's frame timestamps on the output timeline, sorted, duplicates dropped: the
/// frames the decoding path keeps; and how many keyframes there are. `None` when a packet
/// has no timestamp or the stream does not start on a keyframe.
fn frame_times(
    src: &mut media::Source,
    index: usize,
    offset: i64,
) -> anyhow::Result<Option<(Vec<i64>, usize)>> {
    let mut pts = Vec::new();
    let mut keyframes = 0;
    let mut packet = Packet::empty();
    let mut packets = src.packets();
    loop {
        match packets.read(&mut packet) {
            Ok(true) => {}
            Ok(false) => break,
            Err(corrupt) => return Err(corrupt.error(None)),
        }
        // Packets the decoder drops (edit lists) or that carry no picture give no frame.
        if packet.stream() != index || discarded(&packet) || packet.size() == 0 {
            continue;
        }
        if pts.is_empty() && !packet.is_key() {
            return Ok(None);
        }
        keyframes += usize::from(packet.is_key());
        match packet.pts() {
            Some(p) => pts.push(p - offset),
            None => return Ok(None),
        }
    }
    pts.sort_unstable();
    pts.dedup();
    Ok(Some((pts, keyframes)))
}

/// Ranges of `step` seconds over the sorted, distinct frame times `pts` (in `tb`); a
/// boundary with no frame before the next one is skipped. `None` for fewer than two.
fn split(pts: &[i64], tb: ffmpeg::Rational, step: f64) -> Option<Vec<SegmentRange>> {
    let last = *pts.last()?;
    let mut bounds = Vec::new();
    let mut k = 1u32;
    while f64::from(k) * step < seconds(last, tb) {
        bounds.push(f64::from(k) * step);
        k += 1;
    }
    let mut ranges: Vec<SegmentRange> = Vec::new();
    let mut start_s = 0.0;
    let mut taken = 0usize;
    for end_s in bounds.into_iter().map(Some).chain([None]) {
        let range = SegmentRange {
            index: ranges.len() as u32,
            start_s,
            end_s,
            frames: 0,
        };
        let (_, end) = range.bounds(tb);
        let upto = end.map_or(pts.len(), |e| pts.partition_point(|p| *p < e));
        if upto > taken {
            ranges.push(SegmentRange {
                frames: (upto - taken) as u64,
                ..range
            });
            taken = upto;
            start_s = end_s.unwrap_or(start_s);
        } else if let Some(prev) = ranges.last_mut() {
            // Nothing in this range (a gap in variable-rate video): the previous one
            // runs on to its end.
            prev.end_s = end_s;
            start_s = end_s.unwrap_or(start_s);
        }
    }
    (ranges.len() >= 2).then_some(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ffmpeg::Rational;

    #[test]
    fn ranges_fall_on_multiples_of_the_step_and_count_every_frame() {
        // 25 fps for 7 s in 1/12800.
        let tb = Rational::new(1, 12800);
        let pts: Vec<i64> = (0..175).map(|i| i * 512).collect();
        let r = split(&pts, tb, 2.0).expect("splits");
        let got: Vec<_> = r.iter().map(|r| (r.start_s, r.end_s, r.frames)).collect();
        assert_eq!(
            got,
            [
                (0.0, Some(2.0), 50),
                (2.0, Some(4.0), 50),
                (4.0, Some(6.0), 50),
                (6.0, None, 25)
            ]
        );
    }

    #[test]
    fn a_range_without_frames_joins_the_one_before() {
        let tb = Rational::new(1, 1000);
        // Frames up to 1.9 s, then none until 4.5 s.
        let pts: Vec<i64> = (0..20).map(|i| i * 100).chain([4500, 4600]).collect();
        let r = split(&pts, tb, 1.0).expect("splits");
        let got: Vec<_> = r.iter().map(|r| (r.start_s, r.end_s, r.frames)).collect();
        assert_eq!(
            got,
            [(0.0, Some(1.0), 10), (1.0, Some(4.0), 10), (4.0, None, 2)]
        );
        assert_eq!(r.iter().map(|r| r.frames).sum::<u64>(), pts.len() as u64);
    }

    #[test]
    fn a_source_shorter_than_two_ranges_is_not_split() {
        let tb = Rational::new(1, 1000);
        assert_eq!(split(&[0, 500, 1000], tb, 2.0), None);
        assert_eq!(split(&[], tb, 2.0), None);
    }
}
