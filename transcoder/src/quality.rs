//! Picture quality of an encoded frame against its reference, on the luma plane: SSIM
//! the way FFmpeg's `ssim` filter (and x264's `--ssim`) computes it, and PSNR. The fitted
//! ladder's probe ([`crate::probe`]) measures with these in-process, so its numbers are
//! comparable with `ffmpeg -lavfi ssim` on the outputs.

/// One luma plane: `width`x`height` bytes, rows `stride` bytes apart.
#[derive(Debug, Clone, Copy)]
pub struct Plane<'a> {
    pub data: &'a [u8],
    pub stride: usize,
    pub width: usize,
    pub height: usize,
}

impl Plane<'_> {
    fn row(&self, y: usize) -> &[u8] {
        &self.data[y * self.stride..y * self.stride + self.width]
    }
}

/// Sums over one 4x4 block of both planes: Σa, Σb, Σa²+Σb², Σab.
#[derive(Debug, Clone, Copy, Default)]
struct Sums([u64; 4]);

/// SSIM of `b` against `a` (same size): the mean over 8x8 windows every 4 pixels, each
/// window's statistics from four 4x4 blocks (FFmpeg's `ssim` filter's method and
/// constants). 1.0 for identical planes; planes under 8x8 count as identical.
pub fn ssim(a: Plane<'_>, b: Plane<'_>) -> f64 {
    assert_eq!(
        (a.width, a.height),
        (b.width, b.height),
        "planes differ in size"
    );
    let (bw, bh) = (a.width / 4, a.height / 4);
    if bw < 2 || bh < 2 {
        return 1.0;
    }
    let mut blocks = vec![Sums::default(); bw * bh];
    for by in 0..bh {
        for y in by * 4..by * 4 + 4 {
            let (ra, rb) = (a.row(y), b.row(y));
            for (bx, block) in blocks[by * bw..(by + 1) * bw].iter_mut().enumerate() {
                for x in bx * 4..bx * 4 + 4 {
                    let (p, q) = (u64::from(ra[x]), u64::from(rb[x]));
                    block.0[0] += p;
                    block.0[1] += q;
                    block.0[2] += p * p + q * q;
                    block.0[3] += p * q;
                }
            }
        }
    }
    let mut total = 0.0;
    for by in 0..bh - 1 {
        for bx in 0..bw - 1 {
            let mut s = [0u64; 4];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let block = &blocks[(by + dy) * bw + bx + dx];
                for (acc, v) in s.iter_mut().zip(block.0) {
                    *acc += v;
                }
            }
            total += window_ssim(s);
        }
    }
    total / ((bw - 1) * (bh - 1)) as f64
}

/// One 8x8 window's SSIM from its sums (FFmpeg's `ssim_end1`, 8-bit constants).
fn window_ssim([s1, s2, ss, s12]: [u64; 4]) -> f64 {
    const C1: f64 = 0.01 * 0.01 * 255.0 * 255.0 * 64.0;
    const C2: f64 = 0.03 * 0.03 * 255.0 * 255.0 * 64.0 * 63.0;
    let (s1, s2, ss, s12) = (s1 as f64, s2 as f64, ss as f64, s12 as f64);
    let vars = ss * 64.0 - s1 * s1 - s2 * s2;
    let covar = s12 * 64.0 - s1 * s2;
    (2.0 * s1 * s2 + C1) * (2.0 * covar + C2) / ((s1 * s1 + s2 * s2 + C1) * (vars + C2))
}

/// PSNR of `b` against `a` in dB (8-bit), capped at 100 for identical planes.
pub fn psnr(a: Plane<'_>, b: Plane<'_>) -> f64 {
    assert_eq!(
        (a.width, a.height),
        (b.width, b.height),
        "planes differ in size"
    );
    let mut sse = 0u64;
    for y in 0..a.height {
        for (p, q) in a.row(y).iter().zip(b.row(y)) {
            let d = i64::from(*p) - i64::from(*q);
            sse += (d * d) as u64;
        }
    }
    let mse = sse as f64 / (a.width * a.height).max(1) as f64;
    if mse == 0.0 {
        100.0
    } else {
        (10.0 * (255.0 * 255.0 / mse).log10()).min(100.0)
    }
}

/// SSIM on a log scale, `-10 log10(1 - ssim)` (capped at 100 dB): equal steps are equal
/// perceived steps far better than raw SSIM, whose good values crowd just under 1.
pub fn ssim_db(ssim: f64) -> f64 {
    let loss = (1.0 - ssim).max(1e-10);
    (-10.0 * loss.log10()).min(100.0)
}

/// The inverse of [`ssim_db`].
pub fn ssim_of_db(db: f64) -> f64 {
    1.0 - 10f64.powf(-db / 10.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(data: &[u8], w: usize, h: usize) -> Plane<'_> {
        Plane {
            data,
            stride: w,
            width: w,
            height: h,
        }
    }

    /// A deterministic textured picture (so SSIM has structure to compare).
    fn texture(w: usize, h: usize) -> Vec<u8> {
        (0..w * h)
            .map(|i| ((i % w) * 7 + (i / w) * 13 + (i * 31) % 17) as u8)
            .collect()
    }

    #[test]
    fn identical_planes_are_perfect() {
        let a = texture(64, 48);
        assert!((ssim(plane(&a, 64, 48), plane(&a, 64, 48)) - 1.0).abs() < 1e-12);
        assert_eq!(psnr(plane(&a, 64, 48), plane(&a, 64, 48)), 100.0);
    }

    #[test]
    fn more_distortion_scores_lower() {
        let a = texture(64, 48);
        let noisy = |amount: i32| -> Vec<u8> {
            a.iter()
                .enumerate()
                .map(|(i, &p)| {
                    let n = ((i * 2_654_435_761) % 1000) as i32 * amount / 1000 - amount / 2;
                    (i32::from(p) + n).clamp(0, 255) as u8
                })
                .collect()
        };
        let (little, lots) = (noisy(8), noisy(80));
        let s = |b: &[u8]| ssim(plane(&a, 64, 48), plane(b, 64, 48));
        let p = |b: &[u8]| psnr(plane(&a, 64, 48), plane(b, 64, 48));
        assert!(
            s(&little) > s(&lots) && s(&lots) > 0.0,
            "{} {}",
            s(&little),
            s(&lots)
        );
        assert!(p(&little) > p(&lots) + 10.0, "{} {}", p(&little), p(&lots));
    }

    #[test]
    fn strides_wider_than_the_picture_are_respected() {
        let a = texture(32, 16);
        let mut padded = vec![255u8; 40 * 16];
        for y in 0..16 {
            padded[y * 40..y * 40 + 32].copy_from_slice(&a[y * 32..y * 32 + 32]);
        }
        let wide = Plane {
            data: &padded,
            stride: 40,
            width: 32,
            height: 16,
        };
        assert!((ssim(plane(&a, 32, 16), wide) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ssim_db_round_trips() {
        assert!((ssim_db(0.99) - 20.0).abs() < 1e-9);
        assert!((ssim_of_db(ssim_db(0.987)) - 0.987).abs() < 1e-12);
    }
}
