//! Loss curves as a PNG, drawn with plotters into memory.
//!
//! The font is compiled in (DejaVu Sans Mono, see `assets/DejaVu-LICENSE`)
//! so a static binary draws labelled axes on a machine without fontconfig.

use std::io::Cursor;
use std::sync::Once;

use image::{ImageFormat, RgbImage};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

use crate::train::output::LossRow;

const WIDTH: u32 = 800;
const HEIGHT: u32 = 480;
/// Width of the legend column right of the chart: beside the curves, it
/// can never hide them.
const LEGEND: u32 = 90;
const FONT: &str = "sans-serif";
static FONT_BYTES: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");

/// A plot that could not be drawn or encoded.
#[derive(Debug, thiserror::Error)]
#[error("drawing the loss curves: {0}")]
pub struct PlotError(String);

/// D and G loss against step as PNG bytes.
pub fn loss_png(rows: &[LossRow]) -> Result<Vec<u8>, PlotError> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // Fails only for a malformed font, which include_bytes! rules out.
        let _ = register_font(FONT, FontStyle::Normal, FONT_BYTES);
    });
    let fail = |e: &dyn std::fmt::Display| PlotError(e.to_string());
    let mut pixels = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (WIDTH, HEIGHT)).into_drawing_area();
        let (plot, legend) = root.split_horizontally(WIDTH - LEGEND);
        let finite = |v: f32| v.is_finite().then_some(v);
        let losses = rows
            .iter()
            .flat_map(|r| [finite(r.d_loss), finite(r.g_loss)]);
        let top = losses.flatten().fold(1.0f32, f32::max) * 1.05;
        let last = rows.last().map_or(1, |r| r.step + 1).max(1);
        let mut chart = ChartBuilder::on(&plot)
            .caption("DCGAN losses", (FONT, 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(48)
            .build_cartesian_2d(0u64..last, 0f32..top)
            .map_err(|e| fail(&e))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style((FONT, 13))
            .draw()
            .map_err(|e| fail(&e))?;
        for (row, (label, color, value)) in [
            (
                "D loss",
                RED,
                (|r: &LossRow| r.d_loss) as fn(&LossRow) -> f32,
            ),
            ("G loss", BLUE, |r: &LossRow| r.g_loss),
        ]
        .into_iter()
        .enumerate()
        {
            let points = rows
                .iter()
                .filter_map(|r| finite(value(r)).map(|v| (r.step, v)));
            chart
                .draw_series(LineSeries::new(points, color))
                .map_err(|e| fail(&e))?;
            let y = 60 + 24 * row as i32;
            legend
                .draw(&PathElement::new([(4, y), (22, y)], color.stroke_width(2)))
                .map_err(|e| fail(&e))?;
            legend
                .draw(&Text::new(label, (28, y - 7), (FONT, 13)))
                .map_err(|e| fail(&e))?;
        }
        root.present().map_err(|e| fail(&e))?;
    }
    let image = RgbImage::from_raw(WIDTH, HEIGHT, pixels).expect("buffer sized for the image");
    let mut png = Cursor::new(Vec::new());
    image
        .write_to(&mut png, ImageFormat::Png)
        .map_err(|e| fail(&e))?;
    Ok(png.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_a_png_of_both_curves() {
        let rows: Vec<LossRow> = (0..50)
            .map(|step| LossRow {
                step,
                epoch: 0,
                d_loss: 1.4 - step as f32 * 0.01,
                g_loss: 0.7 + step as f32 * 0.02,
                d_real: 0.5,
                d_fake: 0.5,
                images_per_s: 1.0,
            })
            .collect();
        let png = loss_png(&rows).unwrap();
        let image = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), (WIDTH, HEIGHT));
        let has = |rgb: [u8; 3], columns: std::ops::Range<u32>| {
            image
                .enumerate_pixels()
                .any(|(x, _, p)| columns.contains(&x) && p.0 == rgb)
        };
        let (chart, legend) = (0..WIDTH - LEGEND, WIDTH - LEGEND..WIDTH);
        assert!(
            has([255, 0, 0], chart.clone()) && has([0, 0, 255], chart),
            "both curves are drawn"
        );
        assert!(
            has([255, 0, 0], legend.clone()) && has([0, 0, 255], legend),
            "the legend is drawn beside the chart, where it covers no curve"
        );
    }
}
