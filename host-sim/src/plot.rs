//! PNG plot of test accuracy against depth, drawn with `plotters` into a bitmap.

use std::path::Path;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::data::input_error;

/// Places where Debian, Fedora and Arch install DejaVu Sans.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Font family name the plot registers its font under.
const FONT: &str = "sans-serif";

/// One run's point on the plot.
pub struct Point {
    /// Legend entry of the line the point belongs to.
    pub series: String,
    /// Index of the parameterisation, which picks the colour.
    pub family: usize,
    /// Fixed-point runs are drawn dashed.
    pub fixed_point: bool,
    /// Number of weight layers.
    pub depth: usize,
    /// Test accuracy; `None` for a run that diverged or failed, drawn at 0.
    pub accuracy: Option<f64>,
    /// Whether the run saturated, collapsed, diverged or failed; drawn with a cross.
    pub failed: bool,
}

/// Reads the font for the plot's text and registers it with plotters.
///
/// Returns `None`, after a warning, when no `path` is given and no system font is found.
///
/// # Errors
///
/// When `path` cannot be read or is not a TrueType or OpenType font.
pub fn load_font(path: Option<&Path>) -> Result<Option<&'static [u8]>> {
    let bytes = match path {
        Some(path) => std::fs::read(path).map_err(|error| {
            input_error(format!("cannot read --font {}: {error}", path.display()))
        })?,
        None => match FONT_PATHS.iter().find_map(|path| std::fs::read(path).ok()) {
            Some(bytes) => bytes,
            None => {
                eprintln!(
                    "warning: no DejaVu Sans font in {}; the plot will have no text. Pass a \
                     TrueType font with --font or install fonts-dejavu-core",
                    FONT_PATHS.join(", ")
                );
                return Ok(None);
            }
        },
    };
    // plotters keeps registered fonts for the life of the program.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font(FONT, FontStyle::Normal, bytes)
        .map_err(|_| input_error("the plot font is not a valid TrueType or OpenType font"))?;
    Ok(Some(bytes))
}

const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(127, 127, 127),
];

/// Draws test accuracy against depth (log 2 axis), one line per series, into a PNG file.
pub fn accuracy_against_depth(
    path: &Path,
    points: &[Point],
    font: Option<&'static [u8]>,
) -> Result<()> {
    draw(path, points, font.is_some())
        .map_err(|error| anyhow!("{error}"))
        .with_context(|| format!("cannot draw the plot {}", path.display()))
}

fn draw(path: &Path, points: &[Point], with_text: bool) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_depth = points
        .iter()
        .map(|point| point.depth)
        .max()
        .unwrap_or(2)
        .max(2);
    let min_depth = points
        .iter()
        .map(|point| point.depth)
        .min()
        .unwrap_or(1)
        .min(max_depth);
    let x_range = (min_depth as f64).log2() - 0.2..(max_depth as f64).log2() + 0.2;

    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption("Test accuracy against depth", (FONT, 24))
            .x_label_area_size(45)
            .y_label_area_size(60);
    }
    let mut chart = builder.build_cartesian_2d(x_range, 0.0..1.0)?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        // Many candidate positions, of which only whole powers of two get a label.
        mesh.x_desc("weight layers (log scale)")
            .y_desc("test accuracy")
            .x_labels(60)
            .x_label_formatter(&|x| {
                if (x - x.round()).abs() < 1e-9 {
                    format!("{:.0}", x.round().exp2())
                } else {
                    String::new()
                }
            })
            .label_style((FONT, 15));
    } else {
        mesh.x_labels(0).y_labels(0);
    }
    mesh.draw()?;

    let mut series: Vec<&str> = Vec::new();
    for point in points {
        if !series.contains(&point.series.as_str()) {
            series.push(&point.series);
        }
    }
    for name in series {
        let mut line: Vec<&Point> = points.iter().filter(|p| p.series == name).collect();
        line.sort_by_key(|point| point.depth);
        let first = line[0];
        let colour = COLOURS[first.family % COLOURS.len()];
        let coordinates: Vec<(f64, f64)> = line
            .iter()
            .map(|point| ((point.depth as f64).log2(), point.accuracy.unwrap_or(0.0)))
            .collect();
        let style = colour.stroke_width(2);
        let drawn = if first.fixed_point {
            chart.draw_series(DashedLineSeries::new(coordinates.clone(), 8, 5, style))?
        } else {
            chart.draw_series(LineSeries::new(coordinates.clone(), style))?
        };
        if with_text {
            drawn.label(name).legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        }
        chart.draw_series(line.iter().zip(&coordinates).map(|(point, &xy)| {
            if point.failed {
                Cross::new(xy, 6, colour.stroke_width(2)).into_dyn()
            } else {
                Circle::new(xy, 4, colour.filled()).into_dyn()
            }
        }))?;
    }
    if with_text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()?;
    }
    root.present()?;
    Ok(())
}
