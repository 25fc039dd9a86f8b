//! The rendition ladder: the default one ([`DEFAULT_LADDER`], shared with the producer's
//! presets) cut to the source, and the output size of each rendition.
//!
//! A rung's `height` is the *short side* of the picture: 720p is 1280x720 for landscape
//! and 720x1280 for portrait video. The ladder never upscales: rungs larger than the
//! source are dropped, and a source smaller than every rung gets one rendition at its own
//! size. Sizes are even (4:2:0 chroma needs it) and keep the display aspect ratio.

use shared::messages::{DEFAULT_LADDER, Rendition, Rung};

/// One rendition with its final picture size: the type a split transcode's parts carry
/// in their messages, so the planner's ladder is what every part encodes, unconverted.
pub use shared::messages::PlannedRendition as Planned;

/// What to encode for a source shown at `display_w`x`display_h`. `requested` empty means
/// the default ladder. Returns the plan and the names of requested renditions that were
/// dropped because they would upscale. Default rungs above the source are left out
/// without being named: nobody asked for them, so reporting them as "dropped" would
/// only alarm the reader.
pub fn plan(
    requested: &[Rendition],
    display_w: u32,
    display_h: u32,
) -> (Vec<Planned>, Vec<String>) {
    let short = display_w.min(display_h).max(2);
    let rungs: Vec<Rendition> = if requested.is_empty() {
        DEFAULT_LADDER.iter().map(Rung::rendition).collect()
    } else {
        requested.to_vec()
    };
    let (fit, too_big): (Vec<_>, Vec<_>) = rungs.into_iter().partition(|r| r.height <= short);
    let mut dropped: Vec<String> = if requested.is_empty() {
        Vec::new()
    } else {
        too_big.iter().map(|r| r.name.clone()).collect()
    };
    let chosen = if fit.is_empty() {
        // Nothing fits: one rendition at the source's own size, with the smallest rung's
        // bitrates (requested or default).
        let smallest = too_big
            .iter()
            .min_by_key(|r| r.height)
            .cloned()
            .expect("a ladder has at least one rung");
        let even = short & !1;
        let name = if requested.is_empty() {
            format!("{even}p")
        } else {
            dropped.retain(|n| n != &smallest.name);
            smallest.name.clone()
        };
        vec![Rendition {
            name,
            height: even,
            ..smallest
        }]
    } else {
        fit
    };
    let planned = chosen
        .into_iter()
        .map(|r| {
            let (width, height) = size_for(r.height, display_w, display_h);
            Planned {
                name: r.name,
                width,
                height,
                video_kbps: r.video_kbps,
                audio_kbps: r.audio_kbps,
                crf: None,
            }
        })
        .collect();
    (planned, dropped)
}

/// Output size whose short side is `short` (rounded down to even) with the source's
/// display aspect ratio (long side rounded to even).
pub fn size_for(short: u32, display_w: u32, display_h: u32) -> (u32, u32) {
    let short = (short & !1).max(2);
    let (src_short, src_long) = (display_w.min(display_h).max(1), display_w.max(display_h));
    let long =
        (f64::from(short) * f64::from(src_long) / f64::from(src_short) / 2.0).round() as u32 * 2;
    let long = long.max(2);
    if display_w >= display_h {
        (long, short)
    } else {
        (short, long)
    }
}

/// Where each rendition's picture is scaled from: `Some(j)` for rendition `j`'s picture
/// (the smallest one at least as large in both directions), `None` for the source.
/// Scaling 480p from 720p instead of from 1080p reads less than half the pixels; one
/// bilinear step from a picture 1.5x as large keeps the detail that matters at 480p.
pub fn scale_sources(plan: &[Planned]) -> Vec<Option<usize>> {
    let area = |p: &Planned| u64::from(p.width) * u64::from(p.height);
    plan.iter()
        .enumerate()
        .map(|(i, r)| {
            plan.iter()
                .enumerate()
                .filter(|(j, c)| {
                    c.width >= r.width
                        && c.height >= r.height
                        && (area(c) > area(r) || (area(c) == area(r) && *j < i))
                })
                .min_by_key(|(j, c)| (area(c), *j))
                .map(|(j, _)| j)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(p: &[Planned]) -> Vec<&str> {
        p.iter().map(|r| r.name.as_str()).collect()
    }

    #[test]
    fn default_ladder_for_1080p_has_every_rung() {
        let (p, dropped) = plan(&[], 1920, 1080);
        assert_eq!(names(&p), ["1080p", "720p", "480p", "360p"]);
        assert_eq!((p[1].width, p[1].height), (1280, 720));
        assert!(dropped.is_empty());
    }

    #[test]
    fn default_ladder_never_upscales() {
        let (p, dropped) = plan(&[], 854, 480);
        assert_eq!(names(&p), ["480p", "360p"]);
        assert!(dropped.is_empty(), "unrequested rungs named: {dropped:?}");
    }

    #[test]
    fn tiny_source_gets_one_rendition_at_its_own_size() {
        let (p, _) = plan(&[], 321, 241);
        assert_eq!(names(&p), ["240p"]);
        assert_eq!((p[0].width, p[0].height), (320, 240));
    }

    #[test]
    fn portrait_video_uses_the_short_side() {
        let (p, _) = plan(&[], 1080, 1920);
        assert_eq!((p[1].width, p[1].height), (720, 1280));
    }

    #[test]
    fn sizes_are_even_and_keep_the_aspect() {
        assert_eq!(size_for(360, 1998, 1080), (666, 360));
        assert_eq!(size_for(241, 640, 480), (320, 240));
    }

    #[test]
    fn requested_renditions_above_the_source_are_dropped_and_named() {
        let req = vec![
            Rendition {
                name: "hd".into(),
                height: 720,
                video_kbps: 2800,
                audio_kbps: 128,
            },
            Rendition {
                name: "sd".into(),
                height: 180,
                video_kbps: 300,
                audio_kbps: 64,
            },
        ];
        let (p, dropped) = plan(&req, 320, 240);
        assert_eq!(names(&p), ["sd"]);
        assert_eq!(dropped, ["hd"]);
    }

    #[test]
    fn each_rendition_scales_from_the_next_larger_picture() {
        let (ladder, _) = plan(&[], 1920, 1080);
        // 1080p from the source, 720p from 1080p, 480p from 720p, 360p from 480p.
        assert_eq!(scale_sources(&ladder), [None, Some(0), Some(1), Some(2)]);
        // Two renditions of one size (different bit rates): the second reuses the first.
        let same: Vec<Rendition> = [("a", 360, 800), ("b", 360, 500)]
            .iter()
            .map(|&(name, height, video_kbps)| Rendition {
                name: name.into(),
                height,
                video_kbps,
                audio_kbps: 96,
            })
            .collect();
        let (same, _) = plan(&same, 1280, 720);
        assert_eq!(scale_sources(&same), [None, Some(0)]);
    }
}
