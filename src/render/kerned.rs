//! PNG text set by its advance widths and kerning. plotters' bitmap text
//! (0.3.7, `ab_glyph` feature) places each glyph's outline at the whole-pixel
//! pen position without its left side bearing, so letters crowd or drift
//! apart ("promp t length"). This backend wraps the bitmap backend and
//! draws text itself: each glyph positioned at the sub-pixel pen position
//! (advance widths plus kerning from the embedded DejaVu font) with its
//! bearing, then rasterised with coverage. Everything else is forwarded.

use ab_glyph::{point, Font, FontRef, PxScale, ScaleFont};
use plotters::backend::{BitMapBackend, DrawingBackend};
use plotters_backend::text_anchor::{HPos, VPos};
use plotters_backend::{
    BackendColor, BackendCoord, BackendStyle, BackendTextStyle, DrawingErrorKind, FontStyle,
};
use std::sync::OnceLock;

/// The bitmap backend with text set properly.
pub struct Kerned<'a>(pub BitMapBackend<'a>);

type Error = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

fn font(style: FontStyle) -> &'static FontRef<'static> {
    static REGULAR: OnceLock<FontRef<'static>> = OnceLock::new();
    static BOLD: OnceLock<FontRef<'static>> = OnceLock::new();
    let (cell, bytes) = match style {
        FontStyle::Bold => (&BOLD, dejavu::sans::bold()),
        _ => (&REGULAR, dejavu::sans::regular()),
    };
    cell.get_or_init(|| FontRef::try_from_slice(bytes).expect("the embedded DejaVu font parses"))
}

/// Each glyph's left edge (pixels from the text's start, before bearing):
/// advance widths plus kerning, unrounded.
pub fn pen_positions(text: &str, size: f32, style: FontStyle) -> Vec<f32> {
    let f = font(style).as_scaled(PxScale::from(size));
    let mut x = 0f32;
    let mut prev = None;
    text.chars()
        .map(|c| {
            let id = f.glyph_id(c);
            if let Some(p) = prev {
                x += f.kern(p, id);
            }
            prev = Some(id);
            let at = x;
            x += f.h_advance(id);
            at
        })
        .collect()
}

impl DrawingBackend for Kerned<'_> {
    type ErrorType = Error;
    fn get_size(&self) -> (u32, u32) {
        self.0.get_size()
    }
    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Error>> {
        self.0.ensure_prepared()
    }
    fn present(&mut self) -> Result<(), DrawingErrorKind<Error>> {
        self.0.present()
    }
    fn draw_pixel(
        &mut self,
        p: BackendCoord,
        c: BackendColor,
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.draw_pixel(p, c)
    }
    fn draw_line<S: BackendStyle>(
        &mut self,
        from: BackendCoord,
        to: BackendCoord,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.draw_line(from, to, style)
    }
    fn draw_rect<S: BackendStyle>(
        &mut self,
        a: BackendCoord,
        b: BackendCoord,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.draw_rect(a, b, style, fill)
    }
    fn draw_path<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        path: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.draw_path(path, style)
    }
    fn draw_circle<S: BackendStyle>(
        &mut self,
        center: BackendCoord,
        radius: u32,
        style: &S,
        fill: bool,
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.draw_circle(center, radius, style, fill)
    }
    fn fill_polygon<S: BackendStyle, I: IntoIterator<Item = BackendCoord>>(
        &mut self,
        vert: I,
        style: &S,
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.fill_polygon(vert, style)
    }
    fn blit_bitmap(
        &mut self,
        pos: BackendCoord,
        size: (u32, u32),
        src: &[u8],
    ) -> Result<(), DrawingErrorKind<Error>> {
        self.0.blit_bitmap(pos, size, src)
    }
    fn draw_text<T: BackendTextStyle>(
        &mut self,
        text: &str,
        style: &T,
        pos: BackendCoord,
    ) -> Result<(), DrawingErrorKind<Error>> {
        let color = style.color();
        if color.alpha == 0.0 {
            return Ok(());
        }
        // The anchor from the same layout box plotters uses to place labels.
        let ((min_x, min_y), (max_x, max_y)) = style
            .layout_box(text)
            .map_err(|e| DrawingErrorKind::FontError(Box::new(e)))?;
        let (width, height) = (max_x - min_x, max_y - min_y);
        let dx = match style.anchor().h_pos {
            HPos::Left => 0,
            HPos::Right => -width,
            HPos::Center => -width / 2,
        };
        let dy = match style.anchor().v_pos {
            VPos::Top => 0,
            VPos::Center => -height / 2,
            VPos::Bottom => -height,
        };
        let size = style.size() as f32;
        let face = font(style.style());
        let scale = PxScale::from(size);
        let trans = style.transform();
        let (w, h) = self.get_size();
        for (c, x) in text.chars().zip(pen_positions(text, size, style.style())) {
            let glyph = face
                .glyph_id(c)
                .with_scale_and_position(scale, point(x, 0.0));
            let Some(outline) = face.outline_glyph(glyph) else {
                continue;
            };
            let b = outline.px_bounds();
            // Vertically as plotters sets it: the baseline half a size down.
            let (gx, gy) = (b.min.x as i32, (size / 2.0 + b.min.y) as i32);
            let mut pixels = Vec::new();
            outline.draw(|px, py, cov| pixels.push((px as i32 + gx, py as i32 + gy, cov)));
            for (px, py, cov) in pixels {
                if cov <= 0.0 {
                    continue;
                }
                let (x, y) = trans.transform(px + dx - min_x, py + dy - min_y);
                let (x, y) = (pos.0 + x, pos.1 + y);
                if x >= 0 && x < w as i32 && y >= 0 && y < h as i32 {
                    self.0.draw_pixel(
                        (x, y),
                        BackendColor {
                            alpha: color.alpha * f64::from(cov.min(1.0)),
                            rgb: color.rgb,
                        },
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use plotters::prelude::*;

    /// Ink columns of a white RGB image: runs of columns holding a dark pixel.
    fn ink_runs(rgb: &[u8], w: usize) -> Vec<(usize, usize)> {
        let h = rgb.len() / 3 / w;
        let inked: Vec<bool> = (0..w)
            .map(|x| (0..h).any(|y| rgb[(y * w + x) * 3] < 128))
            .collect();
        let mut runs = Vec::new();
        let mut start = None;
        for (x, &on) in inked.iter().chain([&false]).enumerate() {
            match (on, start) {
                (true, None) => start = Some(x),
                (false, Some(s)) => {
                    runs.push((s, x - 1));
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }

    /// Where the font says each glyph's ink lies, from the text's origin.
    fn expected(text: &str, size: f32) -> Vec<(f32, f32)> {
        let face = font(FontStyle::Normal);
        text.chars()
            .zip(pen_positions(text, size, FontStyle::Normal))
            .filter_map(|(c, x)| {
                let g = face
                    .glyph_id(c)
                    .with_scale_and_position(PxScale::from(size), point(x, 0.0));
                face.outline_glyph(g)
                    .map(|o| (o.px_bounds().min.x, o.px_bounds().max.x))
            })
            .collect()
    }

    fn render(text: &str, size: f64, kerned: bool) -> Vec<(usize, usize)> {
        crate::render::plots::init_fonts().unwrap();
        let (w, h) = (400u32, 80u32);
        let mut rgb = vec![255u8; (w * h * 3) as usize];
        {
            let style = ("sans-serif", size).into_font().color(&BLACK);
            let mut b = BitMapBackend::with_buffer(&mut rgb, (w, h));
            if kerned {
                Kerned(b).draw_text(text, &style, (20, 10)).unwrap();
            } else {
                b.draw_text(text, &style, (20, 10)).unwrap();
            }
        }
        ink_runs(&rgb, w as usize)
    }

    #[test]
    fn glyphs_sit_where_the_fonts_advances_and_bearings_put_them() {
        // "p t" in "prompt": separate glyphs, so each is one run of ink.
        for text in ["pt", "prompt"] {
            let want = expected(text, 40.0);
            let got = render(text, 40.0, true);
            let (p, t) = (want[want.len() - 2], want[want.len() - 1]);
            let (gp, gt) = (got[got.len() - 2], got[got.len() - 1]);
            // The blank gap between p and t is the font's, within a pixel.
            let want_gap = t.0 - p.1;
            let got_gap = gt.0 as f32 - gp.1 as f32 - 1.0;
            assert!(
                (got_gap - want_gap).abs() <= 1.0,
                "{text}: gap {got_gap} vs {want_gap}"
            );
            // And the first ink is the first glyph's bearing from the origin.
            assert!(
                (got[0].0 as f32 - 20.0 - want[0].0).abs() <= 1.0,
                "{text}: {got:?} vs {want:?}"
            );
        }
        // plotters' own bitmap text (without bearings) is off by pixels here:
        // this is the test that would fail without the wrapper.
        let want = expected("pt", 40.0);
        let old = render("pt", 40.0, false);
        let old_gap = old[1].0 as f32 - old[0].1 as f32 - 1.0;
        assert!(
            (old_gap - (want[1].0 - want[0].1)).abs() > 1.5,
            "{old:?} vs {want:?}"
        );
    }
}
