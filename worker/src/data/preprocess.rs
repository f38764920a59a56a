//! The reference CelebA preprocessing: resize the shorter side to the
//! target size, center-crop a square, scale to [−1, 1], channels first.

use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

/// Resizes so the shorter side is `size`, center-crops `size`×`size`, and
/// appends the pixels to `out` as CHW floats in [−1, 1].
pub fn append_chw(image: &DynamicImage, size: u32, out: &mut Vec<f32>) {
    // `resize_to_fill` scales to cover the box and crops the excess evenly
    // from both sides: exactly "shorter side to size, then center crop".
    // Triangle is the bilinear filter torchvision's Resize uses.
    let square = image
        .resize_to_fill(size, size, FilterType::Triangle)
        .to_rgb8();
    append_rgb(&square, out);
}

/// Appends an already square RGB image as CHW floats in [−1, 1].
pub fn append_rgb(image: &RgbImage, out: &mut Vec<f32>) {
    for channel in 0..3 {
        out.extend(image.pixels().map(|p| f32::from(p[channel]) / 127.5 - 1.0));
    }
}

/// The inverse of [`append_rgb`] for one image: CHW floats in [−1, 1] to RGB.
pub fn to_rgb(chw: &[f32], size: u32) -> RgbImage {
    let plane = (size * size) as usize;
    RgbImage::from_fn(size, size, |x, y| {
        let at = (y * size + x) as usize;
        let px = |c: usize| {
            ((chw[c * plane + at] + 1.0) * 127.5)
                .round()
                .clamp(0.0, 255.0) as u8
        };
        image::Rgb([px(0), px(1), px(2)])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn celeba_crop_keeps_the_center_and_maps_to_unit_range() {
        // 178×218 like CelebA: thin black bands at the top and bottom, which
        // a center crop removes and a squash would blend into the edge rows.
        let img = RgbImage::from_fn(178, 218, |_, y| {
            if (5..213).contains(&y) {
                image::Rgb([255, 255, 255])
            } else {
                image::Rgb([0, 0, 0])
            }
        });
        let mut out = Vec::new();
        append_chw(&DynamicImage::ImageRgb8(img), 16, &mut out);
        assert_eq!(out.len(), 3 * 16 * 16);
        assert!(
            out.iter().all(|&v| v > 0.99),
            "crop should hold only the white centre"
        );
    }

    #[test]
    fn rgb_round_trip_is_exact() {
        let img = RgbImage::from_fn(8, 8, |x, y| {
            image::Rgb([(x * 30) as u8, (y * 30) as u8, 77])
        });
        let mut chw = Vec::new();
        append_rgb(&img, &mut chw);
        assert_eq!(to_rgb(&chw, 8), img);
    }
}
