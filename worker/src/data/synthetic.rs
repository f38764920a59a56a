//! Deterministic face-like images, so training runs and tests need no
//! download.
//!
//! Each face is drawn from `(seed, index)` alone: a background gradient,
//! shoulders, hair, a shaded face oval in one of a range of skin tones,
//! eyes with irises, eyebrows, a nose and a mouth, all with randomised
//! positions, sizes and colours. Shapes have soft edges (coverage falls
//! off over about a pixel), so the images resize like photographs. Faces
//! are drawn at CelebA's 178×218 and can be written to disk in CelebA's
//! layout so tests go through the real JPEG decode path.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::Path;

use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::celeba::{CELEBA_HEIGHT, CELEBA_IMAGES, CELEBA_PARTITION, CELEBA_WIDTH};

type Rgb = [f32; 3];

const SKIN_TONES: [Rgb; 5] = [
    [255.0, 224.0, 196.0],
    [234.0, 192.0, 160.0],
    [198.0, 134.0, 96.0],
    [141.0, 85.0, 54.0],
    [90.0, 56.0, 37.0],
];
const HAIR_COLOURS: [Rgb; 6] = [
    [20.0, 16.0, 14.0],
    [70.0, 45.0, 25.0],
    [120.0, 80.0, 40.0],
    [200.0, 160.0, 90.0],
    [150.0, 60.0, 30.0],
    [170.0, 170.0, 170.0],
];
const IRIS_COLOURS: [Rgb; 4] = [
    [70.0, 40.0, 20.0],
    [40.0, 90.0, 160.0],
    [60.0, 110.0, 60.0],
    [100.0, 90.0, 70.0],
];

/// Face `index` of the set seeded by `seed`, `width`×`height` pixels.
pub fn face(seed: u64, index: u64, width: u32, height: u32) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(index);
    let mut canvas = Canvas::new(width, height);
    Face::draw_random(&mut rng, &mut canvas);
    canvas.into_image()
}

/// Writes `count` faces as `img_align_celeba/000001.jpg…` plus a CelebA
/// `list_eval_partition.txt` (first 80 % train, 10 % val, 10 % test) under `root`.
pub fn write_celeba(root: &Path, count: usize, seed: u64) -> std::io::Result<()> {
    let images = root.join(CELEBA_IMAGES);
    fs::create_dir_all(&images)?;
    (0..count).into_par_iter().try_for_each(|i| {
        let img = face(seed, i as u64, CELEBA_WIDTH, CELEBA_HEIGHT);
        let file = BufWriter::new(fs::File::create(images.join(file_name(i)))?);
        JpegEncoder::new_with_quality(file, 95)
            .encode_image(&img)
            .map_err(std::io::Error::other)
    })?;
    let mut partition = BufWriter::new(fs::File::create(root.join(CELEBA_PARTITION))?);
    for i in 0..count {
        let split = match i * 10 / count.max(1) {
            0..=7 => 0,
            8 => 1,
            _ => 2,
        };
        writeln!(partition, "{} {split}", file_name(i))?;
    }
    partition.flush()
}

fn file_name(index: usize) -> String {
    format!("{:06}.jpg", index + 1)
}

/// A float RGB canvas in "width units": x ∈ [0, 1], y ∈ [0, height/width].
struct Canvas {
    width: u32,
    height: u32,
    pixels: Vec<Rgb>,
}

impl Canvas {
    fn new(width: u32, height: u32) -> Self {
        Self {
            width,
            height,
            pixels: vec![[0.0; 3]; (width * height) as usize],
        }
    }

    fn fill_rows(&mut self, colour: impl Fn(f32) -> Rgb) {
        let w = self.width as usize;
        for (y, row) in self.pixels.chunks_mut(w).enumerate() {
            let c = colour(y as f32 / self.height as f32);
            row.fill(c);
        }
    }

    /// Blends an axis-aligned ellipse; `shade(dx, dy)` ∈ [−1, 1]² may tint it.
    fn ellipse(&mut self, e: Ellipse, colour: Rgb, alpha: f32, shade: impl Fn(f32, f32) -> f32) {
        let scale = self.width as f32;
        let x0 = ((e.cx - e.rx) * scale).floor().max(0.0) as u32;
        let x1 = (((e.cx + e.rx) * scale).ceil() as u32).min(self.width);
        let y0 = ((e.cy - e.ry) * scale).floor().max(0.0) as u32;
        let y1 = (((e.cy + e.ry) * scale).ceil() as u32).min(self.height);
        let edge = 1.0 / (e.rx.min(e.ry) * scale); // one pixel, in normalised radius
        for py in y0..y1 {
            for px in x0..x1 {
                let dx = ((px as f32 + 0.5) / scale - e.cx) / e.rx;
                let dy = ((py as f32 + 0.5) / scale - e.cy) / e.ry;
                if e.lower_half_only && dy < 0.0 {
                    continue;
                }
                let d = (dx * dx + dy * dy).sqrt();
                let coverage = ((1.0 - d) / edge).clamp(0.0, 1.0) * alpha;
                if coverage > 0.0 {
                    let tint = shade(dx, dy);
                    let p = &mut self.pixels[(py * self.width + px) as usize];
                    for c in 0..3 {
                        p[c] += (colour[c] * tint - p[c]) * coverage;
                    }
                }
            }
        }
    }

    fn into_image(self) -> RgbImage {
        let mut img = RgbImage::new(self.width, self.height);
        for (dst, src) in img.pixels_mut().zip(&self.pixels) {
            *dst = image::Rgb(src.map(|v| v.round().clamp(0.0, 255.0) as u8));
        }
        img
    }
}

#[derive(Clone, Copy)]
struct Ellipse {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    lower_half_only: bool,
}

fn ellipse(cx: f32, cy: f32, rx: f32, ry: f32) -> Ellipse {
    Ellipse {
        cx,
        cy,
        rx,
        ry,
        lower_half_only: false,
    }
}

const FLAT: fn(f32, f32) -> f32 = |_, _| 1.0;

/// The random choices behind one face.
struct Face {
    cx: f32,
    cy: f32,
    rx: f32,
    ry: f32,
    skin: Rgb,
    hair: Rgb,
    light: f32,
}

impl Face {
    fn draw_random(rng: &mut ChaCha8Rng, canvas: &mut Canvas) {
        let aspect = canvas.height as f32 / canvas.width as f32;
        let face = Face {
            cx: 0.5 + rng.random_range(-0.04..0.04),
            cy: aspect * 0.55 + rng.random_range(-0.03..0.03),
            rx: rng.random_range(0.22..0.29),
            ry: rng.random_range(0.30..0.37),
            skin: lerp_palette(&SKIN_TONES, rng.random()),
            hair: HAIR_COLOURS[rng.random_range(0..HAIR_COLOURS.len())],
            light: rng.random_range(-0.3..0.3),
        };
        face.background(rng, canvas, aspect);
        face.hair_and_head(rng, canvas);
        face.eyes(rng, canvas);
        face.nose_and_mouth(rng, canvas);
    }

    fn background(&self, rng: &mut ChaCha8Rng, canvas: &mut Canvas, aspect: f32) {
        let top: Rgb = std::array::from_fn(|_| rng.random_range(30.0..230.0));
        let bottom: Rgb = std::array::from_fn(|_| rng.random_range(30.0..230.0));
        canvas.fill_rows(|t| std::array::from_fn(|c| top[c] + (bottom[c] - top[c]) * t));
        let shirt: Rgb = std::array::from_fn(|_| rng.random_range(20.0..240.0));
        canvas.ellipse(ellipse(self.cx, aspect + 0.05, 0.55, 0.3), shirt, 1.0, FLAT);
        let neck = scale(self.skin, 0.85);
        canvas.ellipse(
            ellipse(
                self.cx,
                self.cy + self.ry * 0.9,
                self.rx * 0.55,
                self.ry * 0.5,
            ),
            neck,
            1.0,
            FLAT,
        );
    }

    fn hair_and_head(&self, rng: &mut ChaCha8Rng, canvas: &mut Canvas) {
        let volume = rng.random_range(1.1..1.4);
        let back = ellipse(
            self.cx,
            self.cy - self.ry * 0.15,
            self.rx * volume,
            self.ry * rng.random_range(1.05..1.25),
        );
        canvas.ellipse(back, self.hair, 1.0, FLAT);
        let light = self.light;
        canvas.ellipse(
            ellipse(self.cx, self.cy, self.rx, self.ry),
            self.skin,
            1.0,
            move |dx, dy| 1.0 + light * dx - 0.12 * dy * dy,
        );
        // A fringe: the top of the head covered down to a random depth.
        let depth = rng.random_range(0.25..0.7);
        let fringe = ellipse(
            self.cx,
            self.cy - self.ry * (1.0 + depth) + self.ry * 0.45,
            self.rx * 1.05,
            self.ry * 0.6,
        );
        canvas.ellipse(fringe, self.hair, 1.0, FLAT);
    }

    fn eyes(&self, rng: &mut ChaCha8Rng, canvas: &mut Canvas) {
        let y = self.cy - self.ry * rng.random_range(0.05..0.2);
        let spread = self.rx * rng.random_range(0.36..0.46);
        let (w, h) = (
            rng.random_range(0.045..0.065),
            rng.random_range(0.02..0.032),
        );
        let iris = IRIS_COLOURS[rng.random_range(0..IRIS_COLOURS.len())];
        let brow = scale(self.hair, 0.8);
        let brow_lift = rng.random_range(0.045..0.07);
        for side in [-1.0, 1.0] {
            let x = self.cx + side * spread;
            canvas.ellipse(ellipse(x, y, w, h), [240.0, 240.0, 235.0], 1.0, FLAT);
            canvas.ellipse(ellipse(x, y, h * 0.85, h * 0.85), iris, 1.0, FLAT);
            canvas.ellipse(
                ellipse(x, y, h * 0.4, h * 0.4),
                [10.0, 10.0, 10.0],
                1.0,
                FLAT,
            );
            canvas.ellipse(ellipse(x, y - brow_lift, w * 1.2, 0.012), brow, 0.9, FLAT);
        }
    }

    fn nose_and_mouth(&self, rng: &mut ChaCha8Rng, canvas: &mut Canvas) {
        let nose = ellipse(self.cx, self.cy + self.ry * 0.2, 0.03, 0.055);
        canvas.ellipse(nose, scale(self.skin, 0.8), 0.45, FLAT);
        let lips = [
            rng.random_range(150.0..210.0),
            rng.random_range(50.0..100.0),
            rng.random_range(60.0..100.0),
        ];
        let mouth = Ellipse {
            lower_half_only: rng.random_bool(0.5),
            ..ellipse(
                self.cx,
                self.cy + self.ry * 0.52,
                rng.random_range(0.06..0.11),
                rng.random_range(0.015..0.035),
            )
        };
        canvas.ellipse(mouth, lips, 1.0, FLAT);
    }
}

fn lerp_palette(palette: &[Rgb], t: f32) -> Rgb {
    let pos = t * (palette.len() - 1) as f32;
    let i = (pos.floor() as usize).min(palette.len() - 2);
    let f = pos - i as f32;
    std::array::from_fn(|c| palette[i][c] + (palette[i + 1][c] - palette[i][c]) * f)
}

fn scale(colour: Rgb, factor: f32) -> Rgb {
    colour.map(|v| v * factor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faces_are_deterministic_and_differ_by_index() {
        let a = face(3, 17, CELEBA_WIDTH, CELEBA_HEIGHT);
        assert_eq!(a, face(3, 17, CELEBA_WIDTH, CELEBA_HEIGHT));
        assert_ne!(a, face(3, 18, CELEBA_WIDTH, CELEBA_HEIGHT));
        assert_ne!(a, face(4, 17, CELEBA_WIDTH, CELEBA_HEIGHT));
    }

    #[test]
    fn written_set_has_celeba_layout_and_decodes() {
        let root = tempfile::tempdir().unwrap();
        write_celeba(root.path(), 20, 9).unwrap();
        let partition = fs::read_to_string(root.path().join(CELEBA_PARTITION)).unwrap();
        let splits: Vec<&str> = partition
            .lines()
            .map(|l| l.split(' ').nth(1).unwrap())
            .collect();
        assert_eq!(splits.iter().filter(|s| **s == "0").count(), 16);
        assert_eq!(splits.iter().filter(|s| **s == "1").count(), 2);
        let first = image::open(root.path().join(CELEBA_IMAGES).join("000001.jpg")).unwrap();
        assert_eq!(
            (first.width(), first.height()),
            (CELEBA_WIDTH, CELEBA_HEIGHT)
        );
    }
}
