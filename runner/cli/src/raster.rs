//! A plot scene rasterized to PNG without a graphics library or system fonts: lines with a square
//! pen, polygons filled by scanline with alpha, and text in a built-in 5×7 pixel font, all drawn
//! at twice the scene's size.

use crate::plot::{Anchor, Scene, Shape};

/// The 5×7 glyphs of ASCII 32..=126, one byte per column, bit 0 the top row.
#[rustfmt::skip]
const FONT: [[u8; 5]; 95] = [
    [0x00,0x00,0x00,0x00,0x00],[0x00,0x00,0x5F,0x00,0x00],[0x00,0x07,0x00,0x07,0x00],[0x14,0x7F,0x14,0x7F,0x14],
    [0x24,0x2A,0x7F,0x2A,0x12],[0x23,0x13,0x08,0x64,0x62],[0x36,0x49,0x55,0x22,0x50],[0x00,0x05,0x03,0x00,0x00],
    [0x00,0x1C,0x22,0x41,0x00],[0x00,0x41,0x22,0x1C,0x00],[0x08,0x2A,0x1C,0x2A,0x08],[0x08,0x08,0x3E,0x08,0x08],
    [0x00,0x50,0x30,0x00,0x00],[0x08,0x08,0x08,0x08,0x08],[0x00,0x60,0x60,0x00,0x00],[0x20,0x10,0x08,0x04,0x02],
    [0x3E,0x51,0x49,0x45,0x3E],[0x00,0x42,0x7F,0x40,0x00],[0x42,0x61,0x51,0x49,0x46],[0x21,0x41,0x45,0x4B,0x31],
    [0x18,0x14,0x12,0x7F,0x10],[0x27,0x45,0x45,0x45,0x39],[0x3C,0x4A,0x49,0x49,0x30],[0x01,0x71,0x09,0x05,0x03],
    [0x36,0x49,0x49,0x49,0x36],[0x06,0x49,0x49,0x29,0x1E],[0x00,0x36,0x36,0x00,0x00],[0x00,0x56,0x36,0x00,0x00],
    [0x08,0x14,0x22,0x41,0x00],[0x14,0x14,0x14,0x14,0x14],[0x00,0x41,0x22,0x14,0x08],[0x02,0x01,0x51,0x09,0x06],
    [0x32,0x49,0x79,0x41,0x3E],[0x7E,0x11,0x11,0x11,0x7E],[0x7F,0x49,0x49,0x49,0x36],[0x3E,0x41,0x41,0x41,0x22],
    [0x7F,0x41,0x41,0x22,0x1C],[0x7F,0x49,0x49,0x49,0x41],[0x7F,0x09,0x09,0x01,0x01],[0x3E,0x41,0x41,0x51,0x32],
    [0x7F,0x08,0x08,0x08,0x7F],[0x00,0x41,0x7F,0x41,0x00],[0x20,0x40,0x41,0x3F,0x01],[0x7F,0x08,0x14,0x22,0x41],
    [0x7F,0x40,0x40,0x40,0x40],[0x7F,0x02,0x04,0x02,0x7F],[0x7F,0x04,0x08,0x10,0x7F],[0x3E,0x41,0x41,0x41,0x3E],
    [0x7F,0x09,0x09,0x09,0x06],[0x3E,0x41,0x51,0x21,0x5E],[0x7F,0x09,0x19,0x29,0x46],[0x46,0x49,0x49,0x49,0x31],
    [0x01,0x01,0x7F,0x01,0x01],[0x3F,0x40,0x40,0x40,0x3F],[0x1F,0x20,0x40,0x20,0x1F],[0x7F,0x20,0x18,0x20,0x7F],
    [0x63,0x14,0x08,0x14,0x63],[0x03,0x04,0x78,0x04,0x03],[0x61,0x51,0x49,0x45,0x43],[0x00,0x7F,0x41,0x41,0x00],
    [0x02,0x04,0x08,0x10,0x20],[0x00,0x41,0x41,0x7F,0x00],[0x04,0x02,0x01,0x02,0x04],[0x40,0x40,0x40,0x40,0x40],
    [0x00,0x01,0x02,0x04,0x00],[0x20,0x54,0x54,0x54,0x78],[0x7F,0x48,0x44,0x44,0x38],[0x38,0x44,0x44,0x44,0x20],
    [0x38,0x44,0x44,0x48,0x7F],[0x38,0x54,0x54,0x54,0x18],[0x08,0x7E,0x09,0x01,0x02],[0x08,0x14,0x54,0x54,0x3C],
    [0x7F,0x08,0x04,0x04,0x78],[0x00,0x44,0x7D,0x40,0x00],[0x20,0x40,0x44,0x3D,0x00],[0x00,0x7F,0x10,0x28,0x44],
    [0x00,0x41,0x7F,0x40,0x00],[0x7C,0x04,0x18,0x04,0x78],[0x7C,0x08,0x04,0x04,0x78],[0x38,0x44,0x44,0x44,0x38],
    [0x7C,0x14,0x14,0x14,0x08],[0x08,0x14,0x14,0x18,0x7C],[0x7C,0x08,0x04,0x04,0x08],[0x48,0x54,0x54,0x54,0x20],
    [0x04,0x3F,0x44,0x40,0x20],[0x3C,0x40,0x40,0x20,0x7C],[0x1C,0x20,0x40,0x20,0x1C],[0x3C,0x40,0x30,0x40,0x3C],
    [0x44,0x28,0x10,0x28,0x44],[0x0C,0x50,0x50,0x50,0x3C],[0x44,0x64,0x54,0x4C,0x44],[0x00,0x08,0x36,0x41,0x00],
    [0x00,0x00,0x7F,0x00,0x00],[0x00,0x41,0x36,0x08,0x00],[0x10,0x08,0x08,0x10,0x08],
];

/// Output pixels per scene unit.
const SCALE: f64 = 2.0;

fn glyph(c: char) -> &'static [u8; 5] {
    let i = (c as u32).wrapping_sub(32) as usize;
    FONT.get(i).unwrap_or(&FONT[('?' as usize) - 32])
}

fn rgb(color: &str) -> [u8; 3] {
    let v = u32::from_str_radix(color.trim_start_matches('#'), 16).unwrap_or(0);
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn blend(&mut self, x: i64, y: i64, c: [u8; 3], alpha: f64) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        for (p, new) in self.px[i..i + 3].iter_mut().zip(c) {
            let old = f64::from(*p);
            *p = (old + (f64::from(new) - old) * alpha).round() as u8;
        }
    }

    /// A segment drawn with a square pen `width` pixels wide.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), c: [u8; 3], width: f64) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as i64;
        let r = (width / 2.0).max(0.5);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            for yy in (y - r).round() as i64..(y + r).round() as i64 {
                for xx in (x - r).round() as i64..(x + r).round() as i64 {
                    self.blend(xx, yy, c, 1.0);
                }
            }
        }
    }

    /// Fills a polygon (even-odd rule) at pixel centres.
    fn polygon(&mut self, pts: &[(f64, f64)], c: [u8; 3], alpha: f64) {
        if pts.len() < 3 {
            return;
        }
        let (lo, hi) = pts.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
        for y in lo.floor().max(0.0) as i64..=hi.ceil().min(self.h as f64) as i64 {
            let yc = y as f64 + 0.5;
            let mut xs: Vec<f64> = Vec::new();
            for (i, a) in pts.iter().enumerate() {
                let b = pts[(i + 1) % pts.len()];
                if (a.1 <= yc) != (b.1 <= yc) {
                    xs.push(a.0 + (yc - a.1) / (b.1 - a.1) * (b.0 - a.0));
                }
            }
            xs.sort_by(f64::total_cmp);
            for pair in xs.chunks(2) {
                if let [a, b] = pair {
                    for x in (a - 0.5).ceil() as i64..=(b - 0.5).floor() as i64 {
                        self.blend(x, y, c, alpha);
                    }
                }
            }
        }
    }

    /// Text in the 5×7 font, `dot` output pixels per font pixel, baseline at `y`.
    fn text(&mut self, (x, y): (f64, f64), text: &str, dot: i64, anchor: Anchor, vertical: bool) {
        let advance = 6 * dot;
        let len = text.chars().count() as i64 * advance - dot;
        let shift = match anchor {
            Anchor::Start => 0,
            Anchor::Middle => len / 2,
            Anchor::End => len,
        };
        let (x, y) = (x.round() as i64, y.round() as i64);
        for (k, ch) in text.chars().enumerate() {
            for (col, bits) in glyph(ch).iter().enumerate() {
                for row in 0..7 {
                    if bits >> row & 1 == 0 {
                        continue;
                    }
                    // Along the text and down from its top (7 font pixels above the baseline).
                    let (along, down) = (k as i64 * advance + col as i64 * dot - shift, (row - 7) * dot);
                    for dy in 0..dot {
                        for dx in 0..dot {
                            let (px, py) = if vertical {
                                (x + down + dy, y - along - dx)
                            } else {
                                (x + along + dx, y + down + dy)
                            };
                            self.blend(px, py, [0, 0, 0], 1.0);
                        }
                    }
                }
            }
        }
    }
}

/// The scene as PNG bytes, at twice its size.
pub fn png(scene: &Scene) -> Vec<u8> {
    let (w, h) = ((scene.width * SCALE) as usize, (scene.height * SCALE) as usize);
    let mut c = Canvas { w, h, px: vec![255; w * h * 3] };
    let at = |p: (f64, f64)| (p.0 * SCALE, p.1 * SCALE);
    for shape in &scene.shapes {
        match shape {
            Shape::Line { from, to, color, width } => c.line(at(*from), at(*to), rgb(color), width * SCALE),
            Shape::Polyline { points, color, width, dash } => {
                let pieces = match dash {
                    Some(d) => crate::plot::dashed(points, *d),
                    None => vec![points.clone()],
                };
                for piece in pieces {
                    for seg in piece.windows(2) {
                        c.line(at(seg[0]), at(seg[1]), rgb(color), width * SCALE);
                    }
                }
            }
            Shape::Polygon { points, color, opacity } => {
                c.polygon(&points.iter().map(|p| at(*p)).collect::<Vec<_>>(), rgb(color), *opacity)
            }
            Shape::Text { at: p, text, size, anchor, vertical } => {
                // 12-unit text is 7 font pixels of 2 output pixels; larger text scales up.
                let dot = ((size * SCALE / 12.0).round() as i64).max(1);
                c.text(at(*p), text, dot, *anchor, *vertical);
            }
        }
    }
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w as u32, h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().expect("writing to memory");
        writer.write_image_data(&c.px).expect("writing to memory");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
        let mut r = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        (info.width as usize, info.height as usize, buf)
    }

    #[test]
    fn shapes_land_where_the_scene_puts_them() {
        let scene = Scene {
            width: 40.0,
            height: 20.0,
            shapes: vec![
                Shape::Line { from: (2.0, 10.0), to: (18.0, 10.0), color: "#ff0000", width: 1.0 },
                Shape::Polygon {
                    points: vec![(22.0, 2.0), (38.0, 2.0), (38.0, 18.0), (22.0, 18.0)],
                    color: "#0000ff",
                    opacity: 0.5,
                },
            ],
        };
        let (w, h, px) = decode(&png(&scene));
        assert_eq!((w, h), (80, 40));
        let at = |x: usize, y: usize| [px[(y * w + x) * 3], px[(y * w + x) * 3 + 1], px[(y * w + x) * 3 + 2]];
        assert_eq!(at(20, 20), [255, 0, 0], "on the line");
        assert_eq!(at(20, 30), [255, 255, 255], "off it");
        assert_eq!(at(60, 20), [128, 128, 255], "half blue over white");
        assert_eq!(at(78, 39), [255, 255, 255], "outside the square");
    }

    #[test]
    fn text_draws_the_font_glyphs() {
        let text = |s: &str| Scene {
            width: 30.0,
            height: 10.0,
            shapes: vec![Shape::Text {
                at: (1.0, 8.0),
                text: s.into(),
                size: 12.0,
                anchor: Anchor::Start,
                vertical: false,
            }],
        };
        let ink = |s: &str| decode(&png(&text(s))).2.iter().filter(|&&v| v == 0).count() / 3;
        // `I` has 7 + 2 + 2 font pixels (a bar and its serifs), each 2×2 output pixels.
        assert_eq!(ink("I"), 11 * 4);
        assert_eq!(ink(" "), 0);
        assert_eq!(ink("II"), 2 * ink("I"));
        // Characters outside the font draw as `?`.
        assert_eq!(ink("±"), ink("?"));
    }
}
