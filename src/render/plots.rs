//! Plots with plotters, PNG and SVG, using the embedded DejaVu Sans font (no
//! system font libraries). Line plots by length bin with CI bands, and a
//! budget × bin heat map of the paired delta.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::sync::OnceLock;

const FONT: &str = "sans-serif";
pub const SIZE: (u32, u32) = (1200, 640);
const PANELS_PER_ROW: usize = 4;

/// A figure's pixel size: line plots grow a row of panels at a time.
fn size_of(fig: &Figure) -> (u32, u32) {
    match fig {
        Figure::Lines(p) => {
            let rows = p.panels.len().div_ceil(PANELS_PER_ROW).max(1) as u32;
            (SIZE.0, SIZE.1 + (rows - 1) * 520)
        }
        Figure::Heat(h) => (SIZE.0, SIZE.1.max(140 + 46 * h.row_labels.len() as u32)),
    }
}

/// Registers the embedded font once per process.
pub fn init_fonts() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded DejaVu font could not be loaded"))
    }
}

/// The colour index of the full cache's reference line: near-black, apart
/// from every budget's colour.
pub const REFERENCE_COLOR: usize = usize::MAX;

/// Distinct, colour-blind-friendly colours (Okabe–Ito), then a fallback palette.
pub fn color(i: usize) -> RGBColor {
    if i == REFERENCE_COLOR {
        return RGBColor(0, 0, 0);
    }
    const C: [RGBColor; 11] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(120, 120, 120),
        RGBColor(40, 40, 40),
        RGBColor(140, 80, 20),
        RGBColor(110, 60, 160),
        RGBColor(120, 120, 0),
    ];
    if i < C.len() {
        C[i]
    } else {
        let c = Palette99::pick(i).to_rgba();
        RGBColor(c.0, c.1, c.2)
    }
}

#[derive(Debug)]
pub struct Point {
    pub y: Option<f64>,
    pub band: Option<(f64, f64)>,
    /// Drawn with a red ring: the bin fails.
    pub flagged: bool,
}

#[derive(Debug)]
pub struct Series {
    pub name: String,
    /// Index into the colour list: the same budget has the same colour in
    /// every panel and every experiment.
    pub color: usize,
    /// Marker shape (0 circle, 1 triangle, 2 square, 3 diamond, …), so series
    /// that coincide stay apart even where their colours are hidden.
    pub marker: usize,
    pub points: Vec<Point>,
}

/// One panel (one KV policy) of a line plot.
#[derive(Debug)]
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

#[derive(Debug)]
pub struct LinePlot {
    pub title: String,
    pub y_label: String,
    /// The x axis's caption (None: prompt length bins).
    pub x_label: Option<String>,
    pub x_labels: Vec<String>,
    pub y_range: (f64, f64),
    pub panels: Vec<Panel>,
}

#[derive(Debug)]
pub struct HeatMap {
    pub title: String,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    /// `cells[row][col]`; `None` is drawn grey.
    pub cells: Vec<Vec<Option<f64>>>,
    /// Cells whose CI excludes zero (marked with `*`).
    pub excludes_zero: Vec<Vec<bool>>,
    /// Values map onto red (−limit) … white (0) … blue (+limit).
    pub limit: f64,
}

type Chart2d<'a, DB> = ChartContext<
    'a,
    DB,
    Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
>;

fn draw_marker<DB: DrawingBackend>(
    chart: &mut Chart2d<'_, DB>,
    at: (f64, f64),
    marker: usize,
    c: RGBColor,
) -> Result<()> {
    let style = c.filled();
    let shape: DynElement<DB, (f64, f64)> = match marker % 4 {
        0 => Circle::new(at, 6, style).into_dyn(),
        1 => TriangleMarker::new(at, 8, style).into_dyn(),
        2 => (EmptyElement::at(at) + Rectangle::new([(-5, -5), (5, 5)], style)).into_dyn(),
        _ => (EmptyElement::at(at) + Polygon::new(vec![(0, -7), (7, 0), (0, 7), (-7, 0)], style))
            .into_dyn(),
    };
    chart.plotting_area().draw(&shape).map_err(err)?;
    Ok(())
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &LinePlot) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&p.title, (FONT, 26)).map_err(err)?;
    // The legend sits in its own strip under the panels, never over the data.
    let (_, h) = root.dim_in_pixel();
    let (plots, legend) = root.split_vertically(h.saturating_sub(46));
    // At most four panels a row, so eight policies stay readable.
    let cols = p.panels.len().clamp(1, PANELS_PER_ROW);
    let rows = p.panels.len().div_ceil(PANELS_PER_ROW).max(1);
    let panels = plots.split_evenly((rows, cols));
    let n = p.x_labels.len().max(1);
    let (y0, y1) = p.y_range;
    for (area, panel) in panels.iter().zip(&p.panels) {
        let labels = p.x_labels.clone();
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, (FONT, 20))
            .margin(14)
            .x_label_area_size(56)
            .y_label_area_size(64)
            // A little headroom so points at the top stay clear of the caption;
            // no tick is drawn above the range's top.
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), y0..(y1 + (y1 - y0) * 0.03))
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    labels.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|y| {
                let v = if y.abs() < 1e-9 { 0.0 } else { *y };
                if v > y1 + 1e-9 {
                    String::new()
                } else if y1 - y0 > 20.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .x_desc(p.x_label.as_deref().unwrap_or("prompt length bin (tokens)"))
            .y_desc(&p.y_label)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(err)?;
        let m = panel.series.len().max(1) as f64;
        for (k, s) in panel.series.iter().enumerate() {
            let c = color(s.color);
            // A small sideways offset per series keeps coinciding lines apart.
            let dx = (k as f64 - (m - 1.0) / 2.0) * (0.25 / m).min(0.06);
            let band: Vec<(f64, (f64, f64))> = s
                .points
                .iter()
                .enumerate()
                .filter_map(|(x, pt)| pt.band.map(|b| (x as f64 + dx, b)))
                .collect();
            if band.len() >= 2 {
                let mut poly: Vec<(f64, f64)> = band.iter().map(|(x, (lo, _))| (*x, *lo)).collect();
                poly.extend(band.iter().rev().map(|(x, (_, hi))| (*x, *hi)));
                chart
                    .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.10).filled())))
                    .map_err(err)?;
            }
            let pts: Vec<(f64, f64, bool)> = s
                .points
                .iter()
                .enumerate()
                .filter_map(|(x, pt)| pt.y.map(|y| (x as f64 + dx, y, pt.flagged)))
                .collect();
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p.0, p.1)),
                    c.stroke_width(3),
                ))
                .map_err(err)?;
            for &(x, y, flagged) in &pts {
                draw_marker(&mut chart, (x, y), s.marker, c)?;
                if flagged {
                    chart
                        .plotting_area()
                        .draw(&Circle::new(
                            (x, y),
                            11,
                            RGBColor(200, 0, 0).stroke_width(2),
                        ))
                        .map_err(err)?;
                }
            }
        }
    }
    // One legend for the figure: every series name once, with its colour and marker.
    let mut seen: Vec<(&str, usize, usize)> = Vec::new();
    for s in p.panels.iter().flat_map(|p| &p.series) {
        if !seen.iter().any(|e| e.0 == s.name) {
            seen.push((&s.name, s.color, s.marker));
        }
    }
    let any_flag = p
        .panels
        .iter()
        .flat_map(|p| &p.series)
        .any(|s| s.points.iter().any(|pt| pt.flagged));
    let mut x = 20i32;
    let y = 22i32;
    let font = TextStyle::from((FONT, 15).into_font());
    for (name, ci, marker) in seen {
        let c = color(ci);
        legend
            .draw(&PathElement::new(
                vec![(x, y), (x + 28, y)],
                c.stroke_width(3),
            ))
            .map_err(err)?;
        let shape: DynElement<DB, (i32, i32)> = match marker % 4 {
            0 => Circle::new((x + 14, y), 6, c.filled()).into_dyn(),
            1 => TriangleMarker::new((x + 14, y), 8, c.filled()).into_dyn(),
            2 => Rectangle::new([(x + 9, y - 5), (x + 19, y + 5)], c.filled()).into_dyn(),
            _ => Polygon::new(
                vec![(x + 14, y - 7), (x + 21, y), (x + 14, y + 7), (x + 7, y)],
                c.filled(),
            )
            .into_dyn(),
        };
        legend.draw(&shape).map_err(err)?;
        legend
            .draw(&Text::new(name.to_string(), (x + 34, y - 8), font.clone()))
            .map_err(err)?;
        x += 44 + 9 * name.chars().count() as i32;
    }
    if any_flag {
        legend
            .draw(&Circle::new(
                (x + 14, y),
                10,
                RGBColor(200, 0, 0).stroke_width(2),
            ))
            .map_err(err)?;
        legend
            .draw(&Text::new(
                "fails in this bin".to_string(),
                (x + 32, y - 8),
                font,
            ))
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn diverging(v: f64, limit: f64) -> RGBColor {
    let t = (v / limit).clamp(-1.0, 1.0);
    let mix = |a: u8, b: u8, f: f64| (a as f64 + (b as f64 - a as f64) * f).round() as u8;
    if t < 0.0 {
        let f = -t;
        RGBColor(mix(255, 202, f), mix(255, 0, f), mix(255, 32, f))
    } else {
        RGBColor(mix(255, 5, t), mix(255, 113, t), mix(255, 176, t))
    }
}

fn draw_heat<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, h: &HeatMap) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let (rows, cols) = (h.row_labels.len().max(1), h.col_labels.len().max(1));
    let rl = h.row_labels.clone();
    let cl = h.col_labels.clone();
    // A colour scale on the right.
    let (w, _) = root.dim_in_pixel();
    let (main, scale) = root.split_horizontally(w.saturating_sub(110));
    let longest = h
        .row_labels
        .iter()
        .map(|l| l.chars().count())
        .max()
        .unwrap_or(4) as u32;
    let mut chart = ChartBuilder::on(&main)
        .caption(&h.title, (FONT, 26))
        .margin(16)
        .x_label_area_size(64)
        .y_label_area_size((longest * 9 + 24).max(120))
        .build_cartesian_2d(0f64..cols as f64, 0f64..rows as f64)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(cols * 2 + 1)
        .y_labels(rows * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x - 0.5;
            if (i - i.round()).abs() < 1e-6 && i >= 0.0 {
                cl.get(i.round() as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|y| {
            let i = y - 0.5;
            if (i - i.round()).abs() < 1e-6 && i >= 0.0 {
                // Row 0 at the top.
                let r = rl.len().saturating_sub(1 + i.round() as usize);
                rl.get(r).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .x_desc("prompt length bin (tokens)")
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()
        .map_err(err)?;
    for (r, row) in h.cells.iter().enumerate() {
        let y = (rows - 1 - r) as f64;
        for (c, v) in row.iter().enumerate() {
            let x = c as f64;
            let fill = match v {
                Some(v) => diverging(*v, h.limit),
                None => RGBColor(210, 210, 210),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    fill.filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x, y), (x + 1.0, y + 1.0)],
                    WHITE.stroke_width(2),
                )))
                .map_err(err)?;
            let star = h
                .excludes_zero
                .get(r)
                .and_then(|row| row.get(c))
                .copied()
                .unwrap_or(false);
            let text = match v {
                Some(v) => format!("{v:+.2}{}", if star { "*" } else { "" }),
                None => "n/a".into(),
            };
            let dark = v.is_some_and(|v| (v / h.limit).abs() > 0.6);
            let style = TextStyle::from((FONT, 17).into_font())
                .color(if dark { &WHITE } else { &BLACK })
                .pos(plotters::style::text_anchor::Pos::new(
                    plotters::style::text_anchor::HPos::Center,
                    plotters::style::text_anchor::VPos::Center,
                ));
            chart
                .draw_series(std::iter::once(Text::new(text, (x + 0.5, y + 0.5), style)))
                .map_err(err)?;
        }
    }
    let (_, sh) = scale.dim_in_pixel();
    let (top, bottom) = (70i32, sh as i32 - 90);
    let steps = 40;
    for i in 0..steps {
        let v = h.limit - 2.0 * h.limit * i as f64 / (steps - 1) as f64;
        let y0 = top + (bottom - top) * i / steps;
        let y1 = top + (bottom - top) * (i + 1) / steps;
        scale
            .draw(&Rectangle::new(
                [(20, y0), (50, y1)],
                diverging(v, h.limit).filled(),
            ))
            .map_err(err)?;
    }
    scale
        .draw(&Rectangle::new(
            [(20, top), (50, bottom)],
            BLACK.stroke_width(1),
        ))
        .map_err(err)?;
    let font = TextStyle::from((FONT, 14).into_font());
    for (v, y) in [
        (h.limit, top),
        (0.0, (top + bottom) / 2),
        (-h.limit, bottom),
    ] {
        scale
            .draw(&Text::new(format!("{v:+.1}"), (56, y - 7), font.clone()))
            .map_err(err)?;
    }
    scale
        .draw(&Text::new(
            "* CI excludes 0".to_string(),
            (4, bottom + 20),
            font,
        ))
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

#[derive(Debug)]
pub enum Figure {
    Lines(LinePlot),
    Heat(HeatMap),
}

/// Renders a figure as (PNG bytes, SVG text).
pub fn render(fig: &Figure) -> Result<(Vec<u8>, String)> {
    init_fonts()?;
    // Drawn into memory and encoded here: fast deflate and one filter for
    // every row (the adaptive default spent more time choosing filters than
    // drawing), no scratch file.
    let (w, h) = size_of(fig);
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root =
            super::kerned::Kerned(BitMapBackend::with_buffer(&mut rgb, (w, h))).into_drawing_area();
        match fig {
            Figure::Lines(p) => draw_lines(&root, p)?,
            Figure::Heat(h) => draw_heat(&root, h)?,
        }
        root.present()?;
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.set_filter(png::FilterType::Sub);
        enc.set_adaptive_filter(png::AdaptiveFilterType::NonAdaptive);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&rgb)?;
    }
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, size_of(fig)).into_drawing_area();
        match fig {
            Figure::Lines(p) => draw_lines(&root, p)?,
            Figure::Heat(h) => draw_heat(&root, h)?,
        }
    }
    Ok((png, svg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_png_and_svg_deterministically() {
        let fig = Figure::Lines(LinePlot {
            title: "t".into(),
            y_label: "y".into(),
            x_label: None,
            x_labels: vec!["a".into(), "b".into()],
            y_range: (0.0, 1.0),
            panels: vec![Panel {
                title: "p".into(),
                series: vec![Series {
                    name: "s".into(),
                    color: 0,
                    marker: 1,
                    points: vec![
                        Point {
                            y: Some(0.2),
                            band: Some((0.1, 0.3)),
                            flagged: false,
                        },
                        Point {
                            y: Some(0.8),
                            band: Some((0.7, 0.9)),
                            flagged: true,
                        },
                    ],
                }],
            }],
        });
        let (png, svg) = render(&fig).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        // A whole image of the figure's size that is not blank.
        let mut reader = png::Decoder::new(png.as_slice()).read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), size_of(&fig));
        assert!(pixels.iter().any(|&p| p != pixels[0]));
        assert!(svg.contains("<svg"), "{}", &svg[..svg.len().min(2000)]);
        assert!(
            svg.contains(">t<") || svg.contains(">\nt\n<"),
            "{}",
            &svg[..svg.len().min(3000)]
        );
        assert_eq!(render(&fig).unwrap().0, png);
        let heat = Figure::Heat(HeatMap {
            title: "h".into(),
            row_labels: vec!["r".into()],
            col_labels: vec!["c1".into(), "c2".into()],
            cells: vec![vec![Some(-0.5), None]],
            excludes_zero: vec![vec![true, false]],
            limit: 1.0,
        });
        let (png, svg) = render(&heat).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(svg.contains("n/a") && svg.contains("-0.50*"));
        assert_eq!(diverging(0.0, 1.0), RGBColor(255, 255, 255));
    }
}
