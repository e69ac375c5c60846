//! A plot as PNG: the very SVG `plot::svg` writes, rendered by resvg (anti-aliased shapes,
//! text shaped with the DejaVu Sans font built into xlab, so Greek letters and other non-ASCII
//! labels such as ρ, λ, γ draw as themselves), at twice the scene's size. No system font or
//! graphics library is needed. DejaVu Sans is under the Bitstream Vera licence, kept beside it
//! in `assets/`.

use crate::plot::Scene;
use resvg::{tiny_skia, usvg};
use std::sync::Arc;

/// Output pixels per scene unit.
const SCALE: f32 = 2.0;

/// The font every PNG's text is set in.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// The scene as PNG bytes, at twice its size.
pub fn png(scene: &Scene) -> Result<Vec<u8>, String> {
    let mut fonts = usvg::fontdb::Database::new();
    fonts.load_font_data(FONT.to_vec());
    fonts.set_sans_serif_family("DejaVu Sans");
    let options = usvg::Options { font_family: "DejaVu Sans".into(), fontdb: Arc::new(fonts), ..Default::default() };
    let tree =
        usvg::Tree::from_str(&crate::plot::svg(scene), &options).map_err(|e| format!("cannot draw the plot: {e}"))?;
    let (w, h) = ((scene.width as f32 * SCALE).ceil() as u32, (scene.height as f32 * SCALE).ceil() as u32);
    let mut pixmap = tiny_skia::Pixmap::new(w.max(1), h.max(1)).ok_or("the plot is too large to draw")?;
    resvg::render(&tree, tiny_skia::Transform::from_scale(SCALE, SCALE), &mut pixmap.as_mut());
    pixmap.encode_png().map_err(|e| format!("cannot encode the plot as PNG: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plot::{Anchor, Shape};

    /// Width, height and RGBA pixels.
    fn decode(bytes: &[u8]) -> (usize, usize, Vec<u8>) {
        let mut r = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgba);
        (info.width as usize, info.height as usize, buf)
    }

    #[test]
    fn shapes_land_where_the_scene_puts_them() {
        let scene = Scene {
            width: 40.0,
            height: 20.0,
            shapes: vec![
                Shape::Line { from: (2.0, 10.0), to: (18.0, 10.0), color: "#ff0000", width: 2.0 },
                Shape::Polygon {
                    points: vec![(22.0, 2.0), (38.0, 2.0), (38.0, 18.0), (22.0, 18.0)],
                    color: "#0000ff",
                    opacity: 0.5,
                },
            ],
        };
        let (w, h, px) = decode(&png(&scene).unwrap());
        assert_eq!((w, h), (80, 40));
        let at = |x: usize, y: usize| [px[(y * w + x) * 4], px[(y * w + x) * 4 + 1], px[(y * w + x) * 4 + 2]];
        assert_eq!(at(20, 19), [255, 0, 0], "on the line");
        assert_eq!(at(20, 30), [255, 255, 255], "off it");
        let half = at(60, 20);
        assert!(
            half[2] == 255 && (127..=128).contains(&half[0]) && half[0] == half[1],
            "half blue over white: {half:?}"
        );
        assert_eq!(at(78, 39), [255, 255, 255], "outside the square");
    }

    /// Dark pixels of a line of text.
    fn ink(s: &str) -> usize {
        let scene = Scene {
            width: 60.0,
            height: 16.0,
            shapes: vec![Shape::Text {
                at: (2.0, 12.0),
                text: s.into(),
                size: 12.0,
                anchor: Anchor::Start,
                vertical: false,
            }],
        };
        let (_, _, px) = decode(&png(&scene).unwrap());
        px.chunks(4).filter(|p| p[0] < 128).count()
    }

    #[test]
    fn text_is_set_in_the_built_in_font_greek_included() {
        assert_eq!(ink(" "), 0);
        assert!(ink("I") > 0);
        assert!(ink("II") > ink("I"));
        // Greek letters are glyphs of their own, not a replacement box or `?` shared by all.
        let (rho, lambda, gamma) = (ink("ρ"), ink("λ"), ink("γ"));
        assert!(rho > 0 && lambda > 0 && gamma > 0);
        assert!(rho != lambda && lambda != gamma, "ρ {rho}, λ {lambda}, γ {gamma}");
        assert_ne!(ink("ρ"), ink("?"));
    }
}
