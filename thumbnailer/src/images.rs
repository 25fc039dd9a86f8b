//! From a decoded frame to an image file: scaling (upright, display aspect, RGB) through
//! an FFmpeg filter graph, blank-frame detection for the poster, and encoding with the
//! `image` crate.

use std::io::BufWriter;
use std::path::Path;

use anyhow::Context as _;
use ffmpeg::{Rational, decoder, frame};
use ffmpeg_next as ffmpeg;
use image::{ImageEncoder, RgbImage};
use shared::media::{FrameGraph, VideoInfo};
use shared::messages::ImageFormat;
use shared::permanent;

/// Scales decoded frames to one output width.
pub struct Scaler {
    graph: FrameGraph,
    pub width: u32,
    pub height: u32,
}

impl Scaler {
    /// `width` wide, height from the display aspect ratio (rotation and pixel aspect
    /// applied), even.
    pub fn new(
        decoder: &decoder::Video,
        time_base: Rational,
        video: &VideoInfo,
        width: u32,
    ) -> anyhow::Result<Self> {
        let (width, height) = scaled_size(video, width);
        let chain = format!("scale={width}:{height}:flags=bicubic,setsar=1,format=rgb24");
        let graph = FrameGraph::video(decoder, time_base, video.rotation, &[chain])?;
        Ok(Self {
            graph,
            width,
            height,
        })
    }

    /// The frame as an upright RGB image of this scaler's size. The filter graph takes
    /// the frame's data, hence by value.
    pub fn rgb(&mut self, frame: frame::Video) -> anyhow::Result<RgbImage> {
        self.graph.push(&frame)?;
        let mut out = frame::Video::empty();
        if !self.graph.pull(0, &mut out)? {
            return Err(permanent(
                "the scaler produced no picture for a decoded frame",
            ));
        }
        Ok(to_rgb_image(&out))
    }
}

/// Output size for `width`: even, height from the display aspect ratio.
pub fn scaled_size(video: &VideoInfo, width: u32) -> (u32, u32) {
    let width = width.max(2) & !1;
    let height = ((f64::from(width) * f64::from(video.display_height)
        / f64::from(video.display_width.max(1))
        / 2.0)
        .round() as u32
        * 2)
    .max(2);
    (width, height)
}

/// Copies an `rgb24` frame (rows padded to its stride) into a tight image.
fn to_rgb_image(frame: &frame::Video) -> RgbImage {
    let (w, h) = (frame.width() as usize, frame.height() as usize);
    let stride = frame.stride(0);
    let data = frame.data(0);
    let mut pixels = Vec::with_capacity(w * h * 3);
    for row in 0..h {
        pixels.extend_from_slice(&data[row * stride..row * stride + w * 3]);
    }
    RgbImage::from_raw(w as u32, h as u32, pixels).expect("buffer sized for the image")
}

/// Mean and standard deviation of the image's luma, 0-255.
pub fn luma_stats(img: &RgbImage) -> (f64, f64) {
    let n = f64::from(img.width() * img.height()).max(1.0);
    let (mut sum, mut sum_sq) = (0.0, 0.0);
    for p in img.pixels() {
        let y = 0.299 * f64::from(p[0]) + 0.587 * f64::from(p[1]) + 0.114 * f64::from(p[2]);
        sum += y;
        sum_sq += y * y;
    }
    let mean = sum / n;
    (mean, (sum_sq / n - mean * mean).max(0.0).sqrt())
}

/// A frame a viewer would call empty: black (or nearly, as in a fade) or one flat colour.
pub fn is_blank(img: &RgbImage) -> bool {
    let (mean, stddev) = luma_stats(img);
    mean < 24.0 || stddev < 8.0
}

/// Writes `img` to `path`; returns its size in bytes. WebP is written lossless (the
/// `image` crate has no lossy WebP encoder), so `quality` applies to JPEG only.
pub fn write(img: &RgbImage, format: ImageFormat, quality: u8, path: &Path) -> anyhow::Result<u64> {
    let writing = || format!("writing {}", path.display());
    let file = std::fs::File::create(path).with_context(writing)?;
    let mut out = BufWriter::new(file);
    let (w, h) = img.dimensions();
    let result =
        match format {
            ImageFormat::Jpeg => image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut out, quality,
            )
            .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8),
            ImageFormat::Png => image::codecs::png::PngEncoder::new(&mut out).write_image(
                img.as_raw(),
                w,
                h,
                image::ExtendedColorType::Rgb8,
            ),
            ImageFormat::Webp => image::codecs::webp::WebPEncoder::new_lossless(&mut out)
                .write_image(img.as_raw(), w, h, image::ExtendedColorType::Rgb8),
        };
    result.map_err(|e| permanent(format!("encoding {}: {e}", path.display())))?;
    let file = out
        .into_inner()
        .map_err(std::io::IntoInnerError::into_error)
        .with_context(writing)?;
    Ok(file.metadata().with_context(writing)?.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn black_and_flat_frames_are_blank_and_a_pattern_is_not() {
        let black = RgbImage::from_pixel(8, 8, image::Rgb([3, 3, 3]));
        let grey = RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]));
        let pattern = RgbImage::from_fn(8, 8, |x, _| {
            if x % 2 == 0 {
                image::Rgb([250, 250, 250])
            } else {
                image::Rgb([20, 20, 20])
            }
        });
        assert!(is_blank(&black));
        assert!(is_blank(&grey));
        assert!(!is_blank(&pattern));
    }
}
