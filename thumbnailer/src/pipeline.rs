//! The thumbnail job: one pass over the source in time order serves the poster
//! candidates, the thumbnails and the sprite tiles, with one decoder for all of them.
//!
//! Every request becomes a target time; targets are sorted and visited once by the
//! [`Grabber`], which seeks or decodes forward as is cheaper. Images are written as soon
//! as they exist (sprite sheets as soon as they are full), so memory holds at most one
//! sheet and the poster candidates, whatever the video's length. A keyframes-only sprite
//! takes a second, much cheaper pass that decodes keyframes alone.

use std::time::Instant;

use image::RgbImage;
use serde_json::json;
use shared::media::{self, MediaLimits, SourceInfo};
use shared::messages::ThumbnailJob;
use shared::{JobContext, JobError, TaskOutput};

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
) -> Result<TaskOutput, JobError> {
    let started = Instant::now();
    let mut src = media::open(&ctx.source_path, limits)?;
    let info = src.info.clone();
    let duration = info.duration_s;
    if duration > 0.0
        && let Some(t) = job.timestamps.iter().find(|t| **t > duration)
    {
        return Err(JobError::Permanent(format!(
            "thumbnail timestamp {t} s is past the end of the {duration:.2} s video"
        )));
    }
    let ext = job.format.extension();
    let mut out = TaskOutput::default();

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
    let sprite_dir = ctx.scratch_dir.join("sprite");
    let mut sheets = None;
    let mut tile_scaler = None;
    let mut grabber = Grabber::new(&mut src.input, &info, cfg.threads, false)?;
    let v_tb = grabber_time_base(&grabber);
    let mut thumb_scaler = Scaler::new(grabber.decoder(), v_tb, &info.video, job.width)?;
    if let Some(spec) = &job.sprite {
        let scaler = Scaler::new(grabber.decoder(), v_tb, &info.video, spec.width)?;
        let layout = Layout::new(
            if duration > 0.0 {
                duration
            } else {
                spec.interval_s
            },
            spec.interval_s,
            spec.columns,
            scaler.width,
            scaler.height,
            cfg.max_sheet_height,
        );
        std::fs::create_dir_all(&sprite_dir)
            .map_err(|e| JobError::transient(format!("scratch space: {e}")))?;
        if !spec.keyframes_only {
            targets.extend((0..layout.tiles).map(|k| (layout.time(k), Purpose::Tile(k))));
        }
        sheets = Some(SheetWriter::new(
            layout,
            &sprite_dir,
            job.format,
            job.quality,
        ));
        tile_scaler = Some(scaler);
    }
    targets.sort_by(|a, b| a.0.total_cmp(&b.0));

    let mut candidates: Vec<(usize, f64, RgbImage)> = Vec::new();
    let total = targets.len().max(1) as f64;
    let cancelled = || ctx.check_cancelled();
    for (n, (t, purpose)) in targets.iter().enumerate() {
        ctx.progress(n as f64 / total * 100.0);
        let frame = grabber.frame_at(*t, &cancelled)?.ok_or_else(no_frames)?;
        let frame = frame.clone();
        let shown = grabber.held_seconds().unwrap_or(*t);
        match purpose {
            Purpose::Poster(i) => candidates.push((*i, shown, thumb_scaler.rgb(frame)?)),
            Purpose::Thumb(i) => {
                let img = thumb_scaler.rgb(frame)?;
                let name = format!("thumb_{:03}.{ext}", i + 1);
                let path = ctx.scratch_dir.join(&name);
                images::write(&img, job.format, job.quality, &path)?;
                out.push(
                    name,
                    path,
                    json!({"kind": "thumbnail", "index": i + 1, "time_s": round3(shown),
                           "requested_s": round3(*t), "width": img.width(),
                           "height": img.height(), "format": ext}),
                );
            }
            Purpose::Tile(k) => {
                let tile = tile_scaler.as_mut().expect("sprite scaler").rgb(frame)?;
                sheets.as_mut().expect("sprite sheets").place(*k, &tile)?;
            }
        }
    }
    let decoded = grabber.decoded;
    drop(grabber);

    if job.poster {
        let (time, img) = choose_poster(candidates).ok_or_else(no_frames)?;
        let name = format!("poster.{ext}");
        let path = ctx.scratch_dir.join(&name);
        images::write(&img, job.format, job.quality, &path)?;
        out.push(
            name,
            path,
            json!({"kind": "poster", "time_s": round3(time), "width": img.width(),
                   "height": img.height(), "format": ext}),
        );
    }

    if let (Some(mut sheets), Some(mut scaler), Some(spec)) = (sheets, tile_scaler, &job.sprite) {
        if spec.keyframes_only {
            keyframe_tiles(&mut src.input, &info, cfg, &mut sheets, &mut scaler, ctx)?;
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
        std::fs::write(&vtt_path, layout.vtt(|s| sheets.sheet_name(s)))
            .map_err(|e| JobError::transient(format!("scratch space: {e}")))?;
        out.push(
            "sprite/sprite.vtt",
            vtt_path,
            json!({"kind": "vtt", "cues": layout.tiles, "sheets": layout.sheets()}),
        );
    }
    ctx.progress(100.0);
    out.summary = json!({
        "source": info,
        "frames_decoded": decoded,
        "elapsed_s": round3(started.elapsed().as_secs_f64()),
    });
    Ok(out)
}

/// Keyframes-only sprite: each tile is the last keyframe at or before its time.
fn keyframe_tiles(
    input: &mut ffmpeg_next::format::context::Input,
    info: &SourceInfo,
    cfg: &ThumbnailerSettings,
    sheets: &mut SheetWriter,
    scaler: &mut Scaler,
    ctx: &JobContext,
) -> Result<(), JobError> {
    let mut grabber = Grabber::new(input, info, cfg.threads, true)?;
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

fn grabber_time_base(g: &Grabber<'_>) -> ffmpeg_next::Rational {
    g.time_base()
}

fn no_frames() -> JobError {
    JobError::Permanent("source video has no decodable frames".into())
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

    #[test]
    fn poster_candidates_avoid_the_first_frame() {
        let t = poster_times(12.0, 3);
        assert_eq!(t, [2.0, 4.0, 6.0]);
    }
}
