//! Plots with plotters, PNG and SVG, using the embedded DejaVu Sans font (no
//! system font libraries). Line plots by length bin with CI bands, and a
//! budget × bin heat map of the paired delta.

use anyhow::{anyhow, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::sync::OnceLock;

const FONT: &str = "sans-serif";
pub const SIZE: (u32, u32) = (1200, 640);

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

/// Distinct, colour-blind-friendly colours (Okabe–Ito), then a fallback palette.
pub fn color(i: usize) -> RGBColor {
    const C: [RGBColor; 7] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(120, 120, 120),
    ];
    if i < C.len() {
        C[i]
    } else {
        let c = Palette99::pick(i).to_rgba();
        RGBColor(c.0, c.1, c.2)
    }
}

pub struct Point {
    pub y: Option<f64>,
    pub band: Option<(f64, f64)>,
}

pub struct Series {
    pub name: String,
    /// Index into the colour list: the same budget has the same colour in every panel.
    pub color: usize,
    pub points: Vec<Point>,
}

/// One panel (one KV policy) of a line plot.
pub struct Panel {
    pub title: String,
    pub series: Vec<Series>,
}

pub struct LinePlot {
    pub title: String,
    pub y_label: String,
    pub x_labels: Vec<String>,
    pub y_range: (f64, f64),
    pub panels: Vec<Panel>,
}

pub struct HeatMap {
    pub title: String,
    pub row_labels: Vec<String>,
    pub col_labels: Vec<String>,
    /// `cells[row][col]`; `None` is drawn grey.
    pub cells: Vec<Vec<Option<f64>>>,
    /// Values map onto red (−limit) … white (0) … blue (+limit).
    pub limit: f64,
}

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e:?}")
}

fn draw_lines<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, p: &LinePlot) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let root = root.titled(&p.title, (FONT, 26)).map_err(err)?;
    let panels = root.split_evenly((1, p.panels.len().max(1)));
    let n = p.x_labels.len().max(1);
    let (y0, y1) = p.y_range;
    // Room below the data for the legend, so it never hides a line or a band.
    let legend_room = (y1 - y0) * 0.42;
    for (area, panel) in panels.iter().zip(&p.panels) {
        let labels = p.x_labels.clone();
        let mut chart = ChartBuilder::on(area)
            .caption(&panel.title, (FONT, 20))
            .margin(14)
            .x_label_area_size(56)
            .y_label_area_size(64)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (y0 - legend_room)..y1)
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
                if v < y0 - 1e-9 {
                    String::new()
                } else if y1 - y0 > 20.0 {
                    format!("{v:.0}")
                } else {
                    format!("{v:.1}")
                }
            })
            .x_desc("prompt length bin (tokens)")
            .y_desc(&p.y_label)
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(err)?;
        for s in &panel.series {
            let c = color(s.color);
            // CI band: a translucent polygon from the lower edge out and the upper edge back.
            let band: Vec<(f64, (f64, f64))> = s
                .points
                .iter()
                .enumerate()
                .filter_map(|(x, pt)| pt.band.map(|b| (x as f64, b)))
                .collect();
            if band.len() >= 2 {
                let mut poly: Vec<(f64, f64)> = band.iter().map(|(x, (lo, _))| (*x, *lo)).collect();
                poly.extend(band.iter().rev().map(|(x, (_, hi))| (*x, *hi)));
                chart
                    .draw_series(std::iter::once(Polygon::new(poly, c.mix(0.13).filled())))
                    .map_err(err)?;
            }
            let pts: Vec<(f64, f64)> = s
                .points
                .iter()
                .enumerate()
                .filter_map(|(x, pt)| pt.y.map(|y| (x as f64, y)))
                .collect();
            chart
                .draw_series(LineSeries::new(pts.clone(), c.stroke_width(3)))
                .map_err(err)?
                .label(&s.name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, c.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font((FONT, 14))
            .background_style(WHITE.mix(0.9))
            .border_style(RGBColor(190, 190, 190))
            .draw()
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
    let mut chart = ChartBuilder::on(root)
        .caption(&h.title, (FONT, 26))
        .margin(16)
        .x_label_area_size(64)
        .y_label_area_size(150)
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
            let text = match v {
                Some(v) => format!("{v:+.2}"),
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
    root.present().map_err(err)?;
    Ok(())
}

pub enum Figure {
    Lines(LinePlot),
    Heat(HeatMap),
}

/// Renders a figure as (PNG bytes, SVG text). `scratch` holds the PNG file
/// while the encoder writes it.
pub fn render(fig: &Figure, scratch: &std::path::Path) -> Result<(Vec<u8>, String)> {
    init_fonts()?;
    let png_path = scratch.join(format!(
        "plot-{}.png",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    {
        let root = BitMapBackend::new(&png_path, SIZE).into_drawing_area();
        match fig {
            Figure::Lines(p) => draw_lines(&root, p)?,
            Figure::Heat(h) => draw_heat(&root, h)?,
        }
    }
    let png = std::fs::read(&png_path)?;
    let _ = std::fs::remove_file(&png_path);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
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
        let dir = tempfile::tempdir().unwrap();
        let fig = Figure::Lines(LinePlot {
            title: "t".into(),
            y_label: "y".into(),
            x_labels: vec!["a".into(), "b".into()],
            y_range: (0.0, 1.0),
            panels: vec![Panel {
                title: "p".into(),
                series: vec![Series {
                    name: "s".into(),
                    color: 0,
                    points: vec![
                        Point {
                            y: Some(0.2),
                            band: Some((0.1, 0.3)),
                        },
                        Point {
                            y: Some(0.8),
                            band: Some((0.7, 0.9)),
                        },
                    ],
                }],
            }],
        });
        let (png, svg) = render(&fig, dir.path()).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(svg.contains("<svg"), "{}", &svg[..svg.len().min(2000)]);
        assert!(
            svg.contains(">t<") || svg.contains(">\nt\n<"),
            "{}",
            &svg[..svg.len().min(3000)]
        );
        assert_eq!(render(&fig, dir.path()).unwrap().0, png);
        let heat = Figure::Heat(HeatMap {
            title: "h".into(),
            row_labels: vec!["r".into()],
            col_labels: vec!["c1".into(), "c2".into()],
            cells: vec![vec![Some(-0.5), None]],
            limit: 1.0,
        });
        let (png, svg) = render(&heat, dir.path()).unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert!(svg.contains("n/a") && svg.contains("-0.50"));
        assert_eq!(diverging(0.0, 1.0), RGBColor(255, 255, 255));
    }
}
