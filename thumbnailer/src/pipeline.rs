//! The thumbnail job: passes over the source in time order serve the poster candidates,
//! the thumbnails and the sprite tiles, one decoder per core ("lane") for all of them.
//!
//! Every request becomes a target time; targets are sorted, shared out between the
//! lanes by decoding work ([`balance`]) and visited once, in order, by each lane's
//! [`Grabber`], which seeks or decodes forward as is cheaper. Images are written as soon
//! as they exist (sprite sheets as soon as they are full), so memory holds a few sheets
//! and the poster candidates, whatever the video's length. A keyframes-only sprite takes
//! a second, much cheaper pass that decodes keyframes alone.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use image::RgbImage;
use serde_json::json;
use shared::media::{self, MediaLimits, Reopen, Source, SourceInfo};
use shared::messages::{SpriteSpec, ThumbnailJob};
use shared::outcome::{Cancelled, is_cancelled};
use shared::{JobContext, TaskOutput, permanent};

use crate::grab::Grabber;
use crate::images::{self, Scaler};
use crate::settings::ThumbnailerSettings;
use crate::sprite::{Layout, SheetWriter};

/// What a target time is for.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Purpose {
    Poster(usize),
    Thumb(usize),
    Tile(usize),
}

pub fn thumbnail(
    job: &ThumbnailJob,
    ctx: &JobContext,
    cfg: &ThumbnailerSettings,
    limits: &MediaLimits,
) -> anyhow::Result<TaskOutput> {
    let started = Instant::now();
    let mut src = media::open(&ctx.source_path, limits)?;
    let info = src.info.clone();
    check_request(job, &info, limits)?;
    let ext = job.format.extension();
    let mut out = TaskOutput::default();
    let mut targets = frame_targets(job, cfg, info.duration_s);
    // Keyframe times from the container's index: where seeking lands, for placing sprite
    // tiles and for sharing the decoding fairly between lanes.
    let keyframes = src.keyframes();
    let sprite_dir = ctx.scratch_dir()?.join("sprite");
    let sheets = match &job.sprite {
        Some(spec) => Some(sprite_sheets(
            job,
            spec,
            &info,
            cfg,
            limits,
            &keyframes,
            &sprite_dir,
            &mut targets,
        )?),
        None => None,
    };
    targets.sort_by(|a, b| a.0.total_cmp(&b.0));

    // The (sorted) targets shared out between lanes, one grabber each, in parallel: every
    // grabber decodes only what its own targets need, so the cores share the decoding.
    let lanes = lanes(cfg, targets.len());
    let stretches = balance(&targets, &keyframes, lanes);
    let shared = Shared {
        job,
        info: &info,
        ctx,
        source: src.reopener(),
        sheets: sheets.map(Mutex::new),
        done: AtomicUsize::new(0),
        total: targets.len().max(1),
        failed: AtomicBool::new(false),
        decoder_threads: if lanes > 1 { 1 } else { cfg.threads },
    };
    let results = run_lanes(&stretches, &shared)?;
    let mut candidates = Vec::new();
    let mut thumbs = Vec::new();
    let mut decoded = 0;
    for lane in results {
        candidates.extend(lane.candidates);
        thumbs.extend(lane.thumbs);
        decoded += lane.decoded;
    }
    thumbs.sort_by_key(|t| t.0);
    for (_, name, path, meta) in thumbs {
        out.push(name, path, meta);
    }
    let sheets = shared.sheets.map(|m| m.into_inner().expect("sheet lock"));

    if job.poster {
        push_poster(&mut out, candidates, job, ctx)?;
    }

    if let (Some(sheets), Some(spec)) = (sheets, &job.sprite) {
        push_sprite(&mut out, sheets, spec, &mut src, cfg, ctx, &sprite_dir, ext)?;
    }
    ctx.progress(100.0);
    out.summary = json!({
        "source": info,
        "frames_decoded": decoded,
        "elapsed_s": round3(started.elapsed().as_secs_f64()),
    });
    Ok(out)
}

/// Refuses a job this video cannot serve: a timestamp past its end, a thumbnail over the
/// picture limits.
fn check_request(
    job: &ThumbnailJob,
    info: &SourceInfo,
    limits: &MediaLimits,
) -> anyhow::Result<()> {
    let duration = info.duration_s;
    if duration > 0.0
        && let Some(t) = job.timestamps.iter().find(|t| **t > duration)
    {
        return Err(permanent(format!(
            "thumbnail timestamp {t} s is past the end of the {duration:.2} s video"
        )));
    }
    let (thumb_w, thumb_h) = images::scaled_size(&info.video, job.width);
    limits.check_picture(
        &format!("a {}-wide thumbnail of this video", job.width),
        thumb_w,
        thumb_h,
    )
}

/// The poster candidates' and the thumbnails' target times (sprite tiles come later).
fn frame_targets(
    job: &ThumbnailJob,
    cfg: &ThumbnailerSettings,
    duration: f64,
) -> Vec<(f64, Purpose)> {
    let mut targets = Vec::new();
    if job.poster {
        targets.extend(
            poster_times(duration, cfg.poster_candidates)
                .into_iter()
                .enumerate()
                .map(|(i, t)| (t, Purpose::Poster(i))),
        );
    }
    targets.extend(
        thumb_times(job, duration)
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, Purpose::Thumb(i))),
    );
    targets
}

/// Chooses the poster among the candidates, writes it and lists it in `out`.
fn push_poster(
    out: &mut TaskOutput,
    candidates: Vec<(usize, f64, RgbImage)>,
    job: &ThumbnailJob,
    ctx: &JobContext,
) -> anyhow::Result<()> {
    let ext = job.format.extension();
    let (time, img) = choose_poster(candidates).ok_or_else(no_frames)?;
    let name = format!("poster.{ext}");
    let path = ctx.scratch_dir()?.join(&name);
    images::write(&img, job.format, job.quality, &path)?;
    out.push(
        name,
        path,
        json!({"kind": "poster", "time_s": round3(time), "width": img.width(),
               "height": img.height(), "format": ext}),
    );
    Ok(())
}

/// The sprite's sheet writer for `spec`, with a tile target for each tile a normal pass
/// serves added to `targets` (a keyframes-only sprite takes its own pass instead).
#[allow(clippy::too_many_arguments)]
fn sprite_sheets(
    job: &ThumbnailJob,
    spec: &SpriteSpec,
    info: &SourceInfo,
    cfg: &ThumbnailerSettings,
    limits: &MediaLimits,
    keyframes: &[f64],
    sprite_dir: &Path,
    targets: &mut Vec<(f64, Purpose)>,
) -> anyhow::Result<SheetWriter> {
    let duration = info.duration_s;
    let (tile_w, tile_h) = images::scaled_size(&info.video, spec.width);
    let sheet_height = sheet_height(spec.columns, tile_w, tile_h, cfg, limits)?;
    let layout = Layout::new(
        if duration > 0.0 {
            duration
        } else {
            spec.interval_s
        },
        spec.interval_s,
        spec.columns,
        tile_w,
        tile_h,
        sheet_height,
    );
    std::fs::create_dir_all(sprite_dir).context("scratch space")?;
    if !spec.keyframes_only {
        targets.extend((0..layout.tiles).map(|k| {
            let t = tile_time(keyframes, layout.time(k), spec.interval_s);
            (t, Purpose::Tile(k))
        }));
    }
    Ok(SheetWriter::new(
        layout,
        sprite_dir,
        job.format,
        job.quality,
    ))
}

/// Runs one thread per stretch of targets; what every lane produced, or the error that
/// explains the failure.
fn run_lanes(stretches: &[Vec<(f64, Purpose)>], shared: &Shared<'_>) -> anyhow::Result<Vec<Lane>> {
    let results: Vec<anyhow::Result<Lane>> = std::thread::scope(|scope| {
        let handles: Vec<_> = stretches
            .iter()
            .map(|chunk| {
                scope.spawn(move || {
                    let r = grab_lane(chunk, shared);
                    if r.is_err() {
                        shared.failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(permanent("a frame grabber panicked")))
            })
            .collect()
    });
    // The first real error explains the others (which only stopped because of it).
    let mut lanes = Vec::with_capacity(results.len());
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(lane) => lanes.push(lane),
            Err(e) => errors.push(e),
        }
    }
    errors.sort_by_key(is_cancelled);
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(lanes),
    }
}

/// Finishes the sprite (its keyframes-only pass first, when asked for) and lists its
/// sheets and WebVTT track in `out`.
#[allow(clippy::too_many_arguments)]
fn push_sprite(
    out: &mut TaskOutput,
    mut sheets: SheetWriter,
    spec: &SpriteSpec,
    src: &mut Source,
    cfg: &ThumbnailerSettings,
    ctx: &JobContext,
    sprite_dir: &Path,
    ext: &str,
) -> anyhow::Result<()> {
    if spec.keyframes_only {
        keyframe_tiles(src, cfg, &mut sheets, spec.width, ctx)?;
    }
    sheets.flush()?;
    let layout = sheets.layout().clone();
    for (s, path, w, h) in &sheets.written {
        out.push(
            format!("sprite/{}", sheets.sheet_name(*s)),
            path,
            json!({"kind": "sprite", "sheet": s, "width": w, "height": h, "format": ext,
                   "tile_width": layout.tile_w, "tile_height": layout.tile_h,
                   "columns": layout.columns, "interval_s": layout.interval_s}),
        );
    }
    let vtt_path = sprite_dir.join("sprite.vtt");
    std::fs::write(&vtt_path, layout.vtt(|s| sheets.sheet_name(s))).context("scratch space")?;
    out.push(
        "sprite/sprite.vtt",
        vtt_path,
        json!({"kind": "vtt", "cues": layout.tiles, "sheets": layout.sheets()}),
    );
    Ok(())
}

/// The tallest sheet to lay tiles out in: the configured height, lowered so a whole
/// sheet stays within the pictures the limits allow (its memory is held while it fills).
/// A job whose tiles cannot fit even one row is refused.
fn sheet_height(
    columns: u32,
    tile_w: u32,
    tile_h: u32,
    cfg: &ThumbnailerSettings,
    limits: &MediaLimits,
) -> anyhow::Result<u32> {
    limits.check_picture(
        &format!("a {tile_w}-wide sprite tile of this video"),
        tile_w,
        tile_h,
    )?;
    let row_pixels = i64::from(columns) * i64::from(tile_w) * i64::from(tile_h.max(1));
    let rows_in_limit = limits.max_pixels() / row_pixels.max(1);
    if rows_in_limit < 1 {
        return Err(permanent(format!(
            "one row of {columns} sprite tiles of {tile_w}x{tile_h} is over the {}x{} picture \
             limit; ask for fewer columns or narrower tiles",
            limits.max_width, limits.max_height
        )));
    }
    let rows = (cfg.max_sheet_height / tile_h.max(1)).max(1);
    Ok(rows.min(rows_in_limit.min(i64::from(u32::MAX)) as u32) * tile_h)
}

/// Keyframes-only sprite: each tile is the last keyframe at or before its time.
fn keyframe_tiles(
    src: &mut Source,
    cfg: &ThumbnailerSettings,
    sheets: &mut SheetWriter,
    width: u32,
    ctx: &JobContext,
) -> anyhow::Result<()> {
    let video = src.info.video.clone();
    let mut grabber = Grabber::new(src, cfg.threads, true)?;
    let mut scaler = Scaler::new(grabber.decoder(), grabber.time_base(), &video, width)?;
    let layout = sheets.layout().clone();
    let cancelled = || ctx.check_cancelled();
    for k in 0..layout.tiles {
        let frame = grabber
            .frame_at(layout.time(k), &cancelled)?
            .ok_or_else(no_frames)?
            .clone();
        sheets.place(k, &scaler.rgb(frame)?)?;
    }
    Ok(())
}

/// What every lane shares.
struct Shared<'a> {
    job: &'a ThumbnailJob,
    info: &'a SourceInfo,
    ctx: &'a JobContext,
    /// Opens each lane's own input on the source, sharing its keyframe index.
    source: Reopen,
    sheets: Option<Mutex<SheetWriter>>,
    done: AtomicUsize,
    total: usize,
    /// Set by a lane that failed, so the others stop early.
    failed: AtomicBool,
    decoder_threads: usize,
}

/// What one lane produced besides the files it wrote.
struct Lane {
    candidates: Vec<(usize, f64, RgbImage)>,
    /// `(index, name, path, manifest facts)` of each thumbnail written.
    thumbs: Vec<(usize, String, std::path::PathBuf, serde_json::Value)>,
    decoded: u64,
}

/// Lanes for `targets` requests: one per core (at most 4), one when there are few.
fn lanes(cfg: &ThumbnailerSettings, targets: usize) -> usize {
    media::cores(cfg.threads)
        .clamp(1, 4)
        .min(targets / 2)
        .max(1)
}

/// Shares the sorted targets out between `lanes` lanes of about equal decoding work; each
/// lane's targets stay in time order.
///
/// With a keyframe index, targets after the same keyframe form a segment: one seek, then
/// decoding forward, costing the video from the keyframe to the segment's last target.
/// Segments are dealt out a window at a time (a few per lane): biggest first to the least
/// loaded lane, then moves and swaps between the most and the least loaded lane while
/// that lowers the most. Whole segments can't always be split evenly by cutting the
/// targets into stretches (three segments of one size over two lanes), but they can be by
/// choosing which lane gets which. Windows keep the lanes moving through the video
/// together, so sprite sheets still fill in order and memory stays bounded. Without an
/// index, contiguous stretches instead.
fn balance(
    targets: &[(f64, Purpose)],
    keyframes: &[f64],
    lanes: usize,
) -> Vec<Vec<(f64, Purpose)>> {
    let costs = target_costs(targets, keyframes);
    let stretches = contiguous(targets, &costs, lanes);
    if keyframes.is_empty() || lanes < 2 {
        return stretches;
    }
    let segments = keyframe_segments(targets, &costs, keyframes);
    let mut load = vec![0.0; lanes];
    let mut owner = vec![0; segments.len()];
    for window in (0..segments.len()).collect::<Vec<_>>().chunks(4 * lanes) {
        deal(window, &segments, &mut owner, &mut load);
    }
    let mut out = vec![Vec::new(); lanes];
    for (s, (first, end, _)) in segments.iter().enumerate() {
        out[owner[s]].extend_from_slice(&targets[*first..*end]);
    }
    out.retain(|lane| !lane.is_empty());
    // Stretches may cut a segment in two (both lanes then decode its start), which can
    // beat whole segments when they are few and alike: take whichever plan's busiest lane
    // has less to decode.
    let busiest = |plan: &[Vec<(f64, Purpose)>]| {
        plan.iter()
            .map(|lane| lane_cost(lane, keyframes))
            .fold(0.0, f64::max)
    };
    if busiest(&stretches) <= busiest(&out) {
        stretches
    } else {
        out
    }
}

/// A segment: the (first, end) indices of the targets after one keyframe, and the cost of
/// decoding to its last target.
type Segment = (usize, usize, f64);

/// The targets grouped by the keyframe before them. A segment's first target is the first
/// after its keyframe, so the targets' costs add up to the segment's.
fn keyframe_segments(targets: &[(f64, Purpose)], costs: &[f64], keyframes: &[f64]) -> Vec<Segment> {
    let keyframe_before = |t: f64| media::keyframe_before(keyframes, t).unwrap_or(0.0);
    let mut segments: Vec<Segment> = Vec::new();
    for (i, ((t, _), cost)) in targets.iter().zip(costs).enumerate() {
        match segments.last_mut() {
            Some(seg) if keyframe_before(targets[seg.0].0) == keyframe_before(*t) => {
                seg.1 = i + 1;
                seg.2 += cost;
            }
            _ => segments.push((i, i + 1, *cost)),
        }
    }
    segments
}

/// Deals one window of segments out to the lanes ([`balance`]): biggest first to the
/// least loaded lane, then the best move or swap between the most and least loaded lanes
/// while that lowers the most.
fn deal(window: &[usize], segments: &[Segment], owner: &mut [usize], load: &mut [f64]) {
    let argmin = |load: &[f64]| (0..load.len()).min_by(|a, b| load[*a].total_cmp(&load[*b]));
    let argmax = |load: &[f64]| (0..load.len()).max_by(|a, b| load[*a].total_cmp(&load[*b]));
    let mut order = window.to_vec();
    order.sort_by(|a, b| segments[*b].2.total_cmp(&segments[*a].2));
    for s in order {
        let l = argmin(load).expect("lanes > 0");
        owner[s] = l;
        load[l] += segments[s].2;
    }
    // Even out: the best move or swap between the most and least loaded lanes.
    for _ in 0..4 * window.len() {
        let (hi, lo) = (argmax(load).expect("lanes"), argmin(load).expect("lanes"));
        let cost = |s: &usize| segments[*s].2;
        let mut best: Option<(f64, usize, Option<usize>)> = None;
        for &a in window.iter().filter(|s| owner[**s] == hi) {
            let mut consider = |delta: f64, b: Option<usize>| {
                let worst = (load[hi] - delta).max(load[lo] + delta);
                if worst < load[hi] - 1e-9 && best.is_none_or(|(w, ..)| worst < w) {
                    best = Some((worst, a, b));
                }
            };
            consider(cost(&a), None);
            for &b in window.iter().filter(|s| owner[**s] == lo) {
                consider(cost(&a) - cost(&b), Some(b));
            }
        }
        let Some((_, a, b)) = best else { break };
        owner[a] = lo;
        load[hi] -= cost(&a);
        load[lo] += cost(&a);
        if let Some(b) = b {
            owner[b] = hi;
            load[lo] -= cost(&b);
            load[hi] += cost(&b);
        }
    }
}

/// Decoding work of each of the sorted `targets` for one decoder visiting them in order,
/// in seconds of video: from the later of the previous target and the target's keyframe
/// (the whole gap when the keyframes are unknown), plus a little for the target itself.
fn target_costs(targets: &[(f64, Purpose)], keyframes: &[f64]) -> Vec<f64> {
    let mut previous = 0.0;
    targets
        .iter()
        .map(|(t, _)| {
            let cost = (t - media::keyframe_before(keyframes, *t)
                .unwrap_or(0.0)
                .max(previous))
            .max(0.0)
                + 0.05;
            previous = *t;
            cost
        })
        .collect()
}

/// Seconds of video one lane decodes for its (sorted) targets.
fn lane_cost(lane: &[(f64, Purpose)], keyframes: &[f64]) -> f64 {
    target_costs(lane, keyframes).iter().sum()
}

/// Cuts the sorted targets into `lanes` contiguous stretches of about equal decoding
/// work (`costs`, from [`target_costs`]).
fn contiguous(targets: &[(f64, Purpose)], costs: &[f64], lanes: usize) -> Vec<Vec<(f64, Purpose)>> {
    let total: f64 = costs.iter().sum();
    let mut stretches = Vec::with_capacity(lanes);
    let (mut start, mut acc) = (0, 0.0);
    for (i, c) in costs.iter().enumerate() {
        acc += c;
        let cut = total * (stretches.len() + 1) as f64 / lanes as f64;
        if acc >= cut && stretches.len() + 1 < lanes && i + 1 < targets.len() {
            stretches.push(targets[start..=i].to_vec());
            start = i + 1;
        }
    }
    stretches.push(targets[start..].to_vec());
    stretches.retain(|s| !s.is_empty());
    stretches
}

/// One lane: its own input and decoder, visiting its targets in time order.
fn grab_lane(targets: &[(f64, Purpose)], s: &Shared<'_>) -> anyhow::Result<Lane> {
    let (job, ctx) = (s.job, s.ctx);
    let ext = job.format.extension();
    // Every lane opens the source the one admitted way, like the probe did.
    let mut src = s.source.open()?;
    let mut grabber = Grabber::new(&mut src, s.decoder_threads, false)?;
    let tb = grabber.time_base();
    let mut thumb_scaler = Scaler::new(grabber.decoder(), tb, &s.info.video, job.width)?;
    let mut tile_scaler = match &job.sprite {
        Some(spec) => Some(Scaler::new(
            grabber.decoder(),
            tb,
            &s.info.video,
            spec.width,
        )?),
        None => None,
    };
    let cancelled = || {
        if s.failed.load(Ordering::Relaxed) {
            Err(Cancelled.into())
        } else {
            ctx.check_cancelled()
        }
    };
    let mut lane = Lane {
        candidates: Vec::new(),
        thumbs: Vec::new(),
        decoded: 0,
    };
    // A tile's keyframe time may be off by a rounding error; half a frame of slack still
    // finds that keyframe and no earlier frame.
    let half_frame = 0.5 / s.info.video.frame_rate.max(1.0);
    for (t, purpose) in targets {
        let frame = match purpose {
            Purpose::Tile(_) => grabber.frame_from(*t, half_frame, &cancelled)?,
            _ => grabber.frame_at(*t, &cancelled)?,
        };
        let frame = frame.ok_or_else(no_frames)?;
        let frame = frame.clone();
        let shown = grabber.held_seconds().unwrap_or(*t);
        match purpose {
            Purpose::Poster(i) => lane.candidates.push((*i, shown, thumb_scaler.rgb(frame)?)),
            Purpose::Thumb(i) => {
                let img = thumb_scaler.rgb(frame)?;
                let name = format!("thumb_{:03}.{ext}", i + 1);
                let path = ctx.scratch_dir()?.join(&name);
                images::write(&img, job.format, job.quality, &path)?;
                let meta = json!({"kind": "thumbnail", "index": i + 1, "time_s": round3(shown),
                    "requested_s": round3(*t), "width": img.width(),
                    "height": img.height(), "format": ext});
                lane.thumbs.push((*i, name, path, meta));
            }
            Purpose::Tile(k) => {
                let tile = tile_scaler.as_mut().expect("sprite scaler").rgb(frame)?;
                let sheets = s.sheets.as_ref().expect("sprite sheets");
                sheets.lock().expect("sheet lock").place(*k, &tile)?;
            }
        }
        let done = s.done.fetch_add(1, Ordering::Relaxed) + 1;
        ctx.progress(done as f64 / s.total as f64 * 100.0);
    }
    lane.decoded = grabber.decoded;
    Ok(lane)
}

fn no_frames() -> anyhow::Error {
    permanent("source video has no decodable frames")
}

/// Where a sprite tile's frame is taken from. A tile stands for its cue's range
/// `[start, start + interval)`, so any frame of that range is a true preview of it: the
/// range's first keyframe when it has one (it decodes on its own, so the stretch of video
/// before it need not be decoded at all), else the first frame from `start` on.
fn tile_time(keyframes: &[f64], start: f64, interval: f64) -> f64 {
    let i = keyframes.partition_point(|k| *k < start - 1e-6);
    match keyframes.get(i) {
        Some(k) if *k < start + interval => *k,
        _ => start,
    }
}

/// Poster candidates spread over the first half of the video (skipping the very start,
/// where intros and fades live).
fn poster_times(duration: f64, n: u32) -> Vec<f64> {
    let span = if duration > 0.0 { duration * 0.5 } else { 10.0 };
    (1..=n)
        .map(|i| span * f64::from(i) / f64::from(n))
        .collect()
}

/// `count` thumbnails centred in equal slices of the video, or the job's timestamps.
fn thumb_times(job: &ThumbnailJob, duration: f64) -> Vec<f64> {
    if !job.timestamps.is_empty() {
        return job.timestamps.clone();
    }
    let n = job.count;
    if duration <= 0.0 {
        return (0..n).map(f64::from).collect();
    }
    (0..n)
        .map(|i| duration * (f64::from(i) + 0.5) / f64::from(n))
        .collect()
}

/// The earliest candidate that is not blank; if all are, the busiest one.
fn choose_poster(mut candidates: Vec<(usize, f64, RgbImage)>) -> Option<(f64, RgbImage)> {
    candidates.sort_by_key(|c| c.0);
    if let Some(i) = candidates.iter().position(|c| !images::is_blank(&c.2)) {
        let (_, t, img) = candidates.swap_remove(i);
        return Some((t, img));
    }
    candidates
        .into_iter()
        .max_by(|a, b| {
            images::luma_stats(&a.2)
                .1
                .total_cmp(&images::luma_stats(&b.2).1)
        })
        .map(|(_, t, img)| (t, img))
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evenly_spaced_thumbnails_are_centred_in_their_slices() {
        let job: ThumbnailJob = serde_json::from_value(json!({
            "job_id": uuid::Uuid::nil(), "source": "a/b.mp4", "output_prefix": "o/",
            "count": 4
        }))
        .unwrap();
        assert_eq!(thumb_times(&job, 8.0), [1.0, 3.0, 5.0, 7.0]);
    }

    fn thumbs(times: &[f64]) -> Vec<(f64, Purpose)> {
        times
            .iter()
            .enumerate()
            .map(|(i, t)| (*t, Purpose::Thumb(i)))
            .collect()
    }

    #[test]
    fn without_an_index_lanes_are_contiguous_stretches_of_equal_work() {
        let targets = thumbs(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let lanes = balance(&targets, &[], 2);
        assert_eq!(lanes.len(), 2);
        assert_eq!(lanes.concat(), targets, "every target once, in order");
        assert_eq!(lanes[0].len(), 3);
    }

    #[test]
    fn lanes_get_whole_keyframe_segments_of_equal_work() {
        // Keyframes every 8 s; segments (cost = keyframe to last target): [1, 5] 5 s,
        // [10, 13] 5 s, [17, 23] 7 s, [28, 31] 7 s. Cutting into two stretches gives 10
        // and 14 s (or 17 and 7); choosing segments gives 12 and 12.
        let targets = thumbs(&[1.0, 5.0, 10.0, 13.0, 17.0, 23.0, 28.0, 31.0]);
        let lanes = balance(&targets, &[0.0, 8.0, 16.0, 24.0], 2);
        assert_eq!(lanes.len(), 2);
        let mut all = lanes.concat();
        all.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert_eq!(all, targets, "every target once");
        for lane in &lanes {
            assert!(lane.windows(2).all(|w| w[0].0 < w[1].0), "in time order");
            assert_eq!(lane.len(), 4, "{lanes:?}");
        }
    }

    #[test]
    fn a_tile_shows_the_keyframe_of_its_range_when_there_is_one() {
        let keyframes = [0.0, 8.3, 16.7];
        // The range [8, 10) holds the keyframe at 8.3; [10, 12) holds none.
        assert_eq!(tile_time(&keyframes, 8.0, 2.0), 8.3);
        assert_eq!(tile_time(&keyframes, 10.0, 2.0), 10.0);
        // A keyframe exactly at the range's start is that range's.
        assert_eq!(tile_time(&keyframes, 0.0, 2.0), 0.0);
        // No index: the first frame from the range's start on.
        assert_eq!(tile_time(&[], 4.0, 2.0), 4.0);
    }

    #[test]
    fn poster_candidates_avoid_the_first_frame() {
        let t = poster_times(12.0, 3);
        assert_eq!(t, [2.0, 4.0, 6.0]);
    }
}
