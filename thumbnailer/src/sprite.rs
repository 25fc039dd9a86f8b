//! Sprite sheets for hover-scrubbing and the WebVTT track that points into them.
//!
//! Tile `k` shows the video at `k * interval`; tiles fill rows of `columns`, and a sheet
//! holds as many rows as fit under the configured height, so long videos get several
//! sheets instead of one enormous image. The VTT has one cue per tile, contiguous from 0
//! to the video's end, each pointing at `sheet_NNN.<ext>#xywh=x,y,w,h`, the form web
//! players (video.js, JW Player, Plyr, …) read.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use image::RgbImage;
use shared::messages::ImageFormat;

use crate::images;

/// Where every tile goes.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    pub interval_s: f64,
    pub duration_s: f64,
    pub tiles: usize,
    pub columns: usize,
    pub tiles_per_sheet: usize,
    pub tile_w: u32,
    pub tile_h: u32,
}

impl Layout {
    pub fn new(
        duration_s: f64,
        interval_s: f64,
        columns: u32,
        tile_w: u32,
        tile_h: u32,
        max_sheet_height: u32,
    ) -> Self {
        let tiles = ((duration_s / interval_s).ceil() as usize).max(1);
        let rows = (max_sheet_height / tile_h.max(1)).max(1) as usize;
        Self {
            interval_s,
            duration_s,
            tiles,
            columns: columns as usize,
            tiles_per_sheet: rows * columns as usize,
            tile_w,
            tile_h,
        }
    }

    /// Time tile `k` shows.
    pub fn time(&self, k: usize) -> f64 {
        k as f64 * self.interval_s
    }

    /// Sheet number and pixel position of tile `k`.
    pub fn position(&self, k: usize) -> (usize, u32, u32) {
        let sheet = k / self.tiles_per_sheet;
        let i = k % self.tiles_per_sheet;
        let (col, row) = (i % self.columns, i / self.columns);
        (sheet, col as u32 * self.tile_w, row as u32 * self.tile_h)
    }

    pub fn sheets(&self) -> usize {
        self.tiles.div_ceil(self.tiles_per_sheet)
    }

    /// Tiles on sheet `s` (the last one may hold fewer).
    pub fn tiles_in_sheet(&self, s: usize) -> usize {
        (self.tiles - s * self.tiles_per_sheet).min(self.tiles_per_sheet)
    }

    /// Pixel size of sheet `s` (the last one may hold fewer rows).
    pub fn sheet_size(&self, s: usize) -> (u32, u32) {
        let in_sheet = self.tiles_in_sheet(s);
        let cols = in_sheet.min(self.columns) as u32;
        let rows = in_sheet.div_ceil(self.columns) as u32;
        (cols * self.tile_w, rows * self.tile_h)
    }

    /// The WebVTT track; `sheet_name(s)` is the URL of sheet `s` relative to the VTT.
    pub fn vtt(&self, sheet_name: impl Fn(usize) -> String) -> String {
        let mut out = String::from("WEBVTT\n");
        for k in 0..self.tiles {
            let start = self.time(k);
            let end = if k + 1 == self.tiles {
                self.duration_s.max(start + 0.001)
            } else {
                self.time(k + 1)
            };
            let (sheet, x, y) = self.position(k);
            let _ = write!(
                out,
                "\n{} --> {}\n{}#xywh={x},{y},{},{}\n",
                vtt_time(start),
                vtt_time(end),
                sheet_name(sheet),
                self.tile_w,
                self.tile_h
            );
        }
        out
    }
}

/// `HH:MM:SS.mmm`.
pub fn vtt_time(seconds: f64) -> String {
    let ms = (seconds * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

/// Assembles sheets and writes each as soon as its last tile is in. Tiles may arrive out
/// of order (several grabbers work on different stretches of the video), so a few sheets
/// can be open at once; memory holds those, never the whole sprite.
pub struct SheetWriter {
    layout: Layout,
    dir: PathBuf,
    format: ImageFormat,
    quality: u8,
    /// Open sheets: the image and how many tiles it has so far.
    open: std::collections::BTreeMap<usize, (RgbImage, usize)>,
    /// `(sheet number, path, width, height)` of every sheet written.
    pub written: Vec<(usize, PathBuf, u32, u32)>,
}

impl SheetWriter {
    pub fn new(layout: Layout, dir: &Path, format: ImageFormat, quality: u8) -> Self {
        Self {
            layout,
            dir: dir.to_path_buf(),
            format,
            quality,
            open: std::collections::BTreeMap::new(),
            written: Vec::new(),
        }
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn sheet_name(&self, s: usize) -> String {
        format!("sheet_{s:03}.{}", self.format.extension())
    }

    /// Puts tile `k` in place; writes its sheet out once the sheet is complete.
    pub fn place(&mut self, k: usize, tile: &RgbImage) -> anyhow::Result<()> {
        let (sheet, x, y) = self.layout.position(k);
        let layout = &self.layout;
        let (img, placed) = self.open.entry(sheet).or_insert_with(|| {
            let (w, h) = layout.sheet_size(sheet);
            (RgbImage::new(w, h), 0)
        });
        image::imageops::replace(img, tile, i64::from(x), i64::from(y));
        *placed += 1;
        if *placed >= self.layout.tiles_in_sheet(sheet) {
            let (img, _) = self.open.remove(&sheet).expect("sheet just used");
            self.write(sheet, &img)?;
        }
        Ok(())
    }

    /// Writes every sheet still open (only incomplete ones can be).
    pub fn flush(&mut self) -> anyhow::Result<()> {
        for (s, (img, _)) in std::mem::take(&mut self.open) {
            self.write(s, &img)?;
        }
        self.written.sort_by_key(|w| w.0);
        Ok(())
    }

    fn write(&mut self, s: usize, img: &RgbImage) -> anyhow::Result<()> {
        let path = self.dir.join(self.sheet_name(s));
        images::write(img, self.format, self.quality, &path)?;
        self.written.push((s, path, img.width(), img.height()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiles_cover_the_video_and_wrap_into_sheets() {
        // 25 s at 2 s: 13 tiles; 160x90 tiles, 5 columns, 200 px high sheets: 2 rows each.
        let l = Layout::new(25.0, 2.0, 5, 160, 90, 200);
        assert_eq!((l.tiles, l.tiles_per_sheet, l.sheets()), (13, 10, 2));
        assert_eq!(l.position(0), (0, 0, 0));
        assert_eq!(l.position(6), (0, 160, 90));
        assert_eq!(l.position(10), (1, 0, 0));
        assert_eq!(l.sheet_size(0), (800, 180));
        assert_eq!(l.sheet_size(1), (480, 90));
    }

    #[test]
    fn vtt_cues_are_contiguous_and_end_at_the_duration() {
        let l = Layout::new(5.0, 2.0, 10, 160, 90, 4096);
        let vtt = l.vtt(|s| format!("sheet_{s:03}.jpg"));
        assert_eq!(
            vtt,
            "WEBVTT\n\n00:00:00.000 --> 00:00:02.000\nsheet_000.jpg#xywh=0,0,160,90\n\
             \n00:00:02.000 --> 00:00:04.000\nsheet_000.jpg#xywh=160,0,160,90\n\
             \n00:00:04.000 --> 00:00:05.000\nsheet_000.jpg#xywh=320,0,160,90\n"
        );
    }

    #[test]
    fn vtt_time_has_hours() {
        assert_eq!(vtt_time(3723.5), "01:02:03.500");
    }
}
