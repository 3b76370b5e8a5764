//! The oracle of the synthetic-shapes world (issue #6): reads the shapes and colours in an image from its pixels,
//! with no learned weights — background estimation, colour segmentation, connected components, and per component
//! its hue and its geometry (holes, k-fold angular moments, fill = area / bounding-box area; solidity = area /
//! convex-hull area is reported too).
//!
//! The scenes are drawn by `models/shapes/shapes.py`; the thresholds sit midway between the feature ranges
//! measured on that generator's renders (`tests/fixtures/shapes`, where the test checks the accuracy).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
    Cross,
    Ring,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Colour {
    Red,
    Orange,
    Yellow,
    Green,
    Blue,
    Purple,
}

pub const SHAPES: [Shape; 6] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star, Shape::Cross, Shape::Ring];
pub const COLOURS: [Colour; 6] =
    [Colour::Red, Colour::Orange, Colour::Yellow, Colour::Green, Colour::Blue, Colour::Purple];

impl Shape {
    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Cross => "cross",
            Shape::Ring => "ring",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        SHAPES.into_iter().find(|x| x.name() == s)
    }
}

impl Colour {
    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Orange => "orange",
            Colour::Yellow => "yellow",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Purple => "purple",
        }
    }
    pub fn from_name(s: &str) -> Option<Self> {
        COLOURS.into_iter().find(|x| x.name() == s)
    }
    /// Hue ranges (degrees) between the generator's reference colours (red 0°, orange 28°, yellow 50°, green 128°,
    /// blue 227°, purple 282°).
    fn from_hue(h: f32) -> Self {
        match h {
            h if !(15.0..345.0).contains(&h) => Colour::Red,
            h if h < 39.0 => Colour::Orange,
            h if h < 85.0 => Colour::Yellow,
            h if h < 180.0 => Colour::Green,
            h if h < 255.0 => Colour::Blue,
            _ => Colour::Purple,
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for Colour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One object found in an image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Detection {
    pub shape: Shape,
    pub colour: Colour,
    /// Pixels in the object's mask.
    pub area: usize,
    /// Centre of mass, in pixels.
    pub centroid: (f32, f32),
    pub holes: usize,
    pub solidity: f32,
    pub fill: f32,
    /// |m_k| for k = 3, 4, 5: the k-fold angular moments of the mask around its centroid (weight ρ²), large for
    /// shapes with k-fold symmetry (triangle 3, square and cross 4, star 5).
    pub moments: [f32; 3],
    pub hue: f32,
}

/// Objects smaller than this many pixels are noise.
const MIN_AREA: usize = 8;
/// A pixel is foreground when its colour is this far (RGB, Euclidean) from the background …
const COARSE_DISTANCE: f32 = 60.0;
/// … and, in the refined mask, when it is at least this share of the way from the background to the object's
/// core colour (anti-aliased edges count when more than half covered).
const REFINE_SHARE: f32 = 0.5;

fn dist(a: [f32; 3], b: [f32; 3]) -> f32 {
    ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
}

fn hue(c: [f32; 3]) -> f32 {
    let (r, g, b) = (c[0], c[1], c[2]);
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let d = max - min;
    if d <= f32::EPSILON {
        return 0.0;
    }
    let h = if max == r {
        60.0 * (((g - b) / d).rem_euclid(6.0))
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    h.rem_euclid(360.0)
}

/// Median of each channel over the image border.
fn background(px: &[[f32; 3]], w: usize, h: usize) -> [f32; 3] {
    let mut border = vec![];
    for x in 0..w {
        border.push(px[x]);
        border.push(px[(h - 1) * w + x]);
    }
    for y in 1..h - 1 {
        border.push(px[y * w]);
        border.push(px[y * w + w - 1]);
    }
    let mut out = [0.0; 3];
    for (c, o) in out.iter_mut().enumerate() {
        let mut v: Vec<f32> = border.iter().map(|p| p[c]).collect();
        v.sort_by(f32::total_cmp);
        *o = v[v.len() / 2];
    }
    out
}

/// 4-connected components of `mask`; returns a label per pixel (0 = none) and the number of labels.
fn components(mask: &[bool], w: usize, h: usize) -> (Vec<usize>, usize) {
    let mut label = vec![0usize; w * h];
    let mut n = 0;
    for start in 0..w * h {
        if !mask[start] || label[start] != 0 {
            continue;
        }
        n += 1;
        let mut stack = vec![start];
        label[start] = n;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % w, i / w);
            let mut push = |j: usize| {
                if mask[j] && label[j] == 0 {
                    label[j] = n;
                    stack.push(j);
                }
            };
            if x > 0 {
                push(i - 1);
            }
            if x + 1 < w {
                push(i + 1);
            }
            if y > 0 {
                push(i - w);
            }
            if y + 1 < h {
                push(i + w);
            }
        }
    }
    (label, n)
}

/// Area of the convex hull of integer points (Andrew's monotone chain + shoelace).
fn hull_area(mut pts: Vec<(i64, i64)>) -> f64 {
    pts.sort_unstable();
    pts.dedup();
    if pts.len() < 3 {
        return 0.0;
    }
    let cross = |o: (i64, i64), a: (i64, i64), b: (i64, i64)| (a.0 - o.0) * (b.1 - o.1) - (a.1 - o.1) * (b.0 - o.0);
    let mut hull: Vec<(i64, i64)> = vec![];
    for pass in 0..2 {
        let start = hull.len();
        let iter: Box<dyn Iterator<Item = &(i64, i64)>> =
            if pass == 0 { Box::new(pts.iter()) } else { Box::new(pts.iter().rev()) };
        for &p in iter {
            while hull.len() >= start + 2 && cross(hull[hull.len() - 2], hull[hull.len() - 1], p) <= 0 {
                hull.pop();
            }
            hull.push(p);
        }
        hull.pop();
    }
    let twice: i64 = (0..hull.len()).map(|i| {
        let (a, b) = (hull[i], hull[(i + 1) % hull.len()]);
        a.0 * b.1 - b.0 * a.1
    }).sum();
    twice.abs() as f64 / 2.0
}

/// Classifies a component from its geometry: a hole makes a ring; otherwise the dominant k-fold angular moment
/// (measured on the generator's renders: triangles m₃ ≥ 0.49, stars m₅ ≥ 0.46, crosses m₄ ≥ 0.33, squares
/// m₄ ≥ 0.20, every other shape's off-symmetry moments ≤ 0.27, circles all ≤ 0.11) separates triangle, star and the
/// four-fold shapes, and the bounding-box fill separates square (≥ 0.78) from cross (≤ 0.64).
fn classify(holes: usize, _solidity: f32, fill: f32, moments: [f32; 3]) -> Shape {
    let [m3, m4, m5] = moments;
    if holes > 0 {
        Shape::Ring
    } else if m3 >= 0.3 && m3 >= m4 && m3 >= m5 {
        Shape::Triangle
    } else if m5 >= 0.3 && m5 >= m4 {
        Shape::Star
    } else if m4 >= 0.15 {
        if fill >= 0.71 { Shape::Square } else { Shape::Cross }
    } else {
        Shape::Circle
    }
}

/// The objects in an RGBA8 (or RGB8, with `channels = 3`) image, left to right.
pub fn analyse(pixels: &[u8], width: usize, height: usize, channels: usize) -> Vec<Detection> {
    assert!(channels >= 3 && pixels.len() == width * height * channels, "image buffer size");
    assert!(width >= 3 && height >= 3, "image too small");
    let (w, h) = (width, height);
    let px: Vec<[f32; 3]> =
        pixels.chunks_exact(channels).map(|p| [p[0] as f32, p[1] as f32, p[2] as f32]).collect();
    let bg = background(&px, w, h);
    let d: Vec<f32> = px.iter().map(|&p| dist(p, bg)).collect();
    let coarse: Vec<bool> = d.iter().map(|&x| x > COARSE_DISTANCE).collect();
    let (label, n) = components(&coarse, w, h);
    let mut out = vec![];
    for l in 1..=n {
        let members: Vec<usize> = (0..w * h).filter(|&i| label[i] == l).collect();
        if members.len() < MIN_AREA {
            continue;
        }
        // Core colour: the members farthest from the background (the un-blended interior).
        let dmax = members.iter().map(|&i| d[i]).fold(0.0f32, f32::max);
        let core: Vec<usize> = members.iter().copied().filter(|&i| d[i] >= 0.8 * dmax).collect();
        let mut mean = [0.0f32; 3];
        for &i in &core {
            for c in 0..3 {
                mean[c] += px[i][c] / core.len() as f32;
            }
        }
        let core_d = dist(mean, bg);
        // Refined mask: pixels of the (1-pixel expanded) bounding box more than half-way to the core colour and
        // closer to this object's colour than to the background; connected to the component.
        let (x0, x1) = (members.iter().map(|i| i % w).min().unwrap(), members.iter().map(|i| i % w).max().unwrap());
        let (y0, y1) = (members.iter().map(|i| i / w).min().unwrap(), members.iter().map(|i| i / w).max().unwrap());
        let (x0, y0, x1, y1) = (x0.saturating_sub(1), y0.saturating_sub(1), (x1 + 1).min(w - 1), (y1 + 1).min(h - 1));
        let mut mask = vec![false; w * h];
        for y in y0..=y1 {
            for x in x0..=x1 {
                let i = y * w + x;
                let own = label[i] == l || label[i] == 0;
                mask[i] = own && d[i] >= REFINE_SHARE * core_d && dist(px[i], mean) < dist(px[i], bg);
            }
        }
        let area = mask.iter().filter(|&&m| m).count();
        if area < MIN_AREA {
            continue;
        }
        let (mut bx0, mut bx1, mut by0, mut by1) = (w, 0, h, 0);
        let (mut sx, mut sy) = (0.0f32, 0.0f32);
        let mut corners = vec![];
        for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
            let (x, y) = (i % w, i / w);
            (bx0, bx1, by0, by1) = (bx0.min(x), bx1.max(x), by0.min(y), by1.max(y));
            sx += x as f32 + 0.5;
            sy += y as f32 + 0.5;
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                corners.push((x as i64 + dx, y as i64 + dy));
            }
        }
        // Holes: non-mask pixels of the bounding box not reachable from outside it.
        let (bw, bh) = (bx1 - bx0 + 3, by1 - by0 + 3);
        let inside = |x: usize, y: usize| -> bool {
            // (x, y) in the padded box; the padding ring is outside the object.
            x >= 1 && y >= 1 && x <= bw - 2 && y <= bh - 2 && mask[(by0 + y - 1) * w + bx0 + x - 1]
        };
        let mut seen = vec![false; bw * bh];
        let mut stack = vec![0usize];
        seen[0] = true;
        while let Some(i) = stack.pop() {
            let (x, y) = (i % bw, i / bw);
            for (nx, ny) in [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)] {
                if nx < bw && ny < bh && !seen[ny * bw + nx] && !inside(nx, ny) {
                    seen[ny * bw + nx] = true;
                    stack.push(ny * bw + nx);
                }
            }
        }
        let hole_px = (0..bw * bh).filter(|&i| !seen[i] && !inside(i % bw, i / bw)).count();
        let holes = usize::from(hole_px >= 2);
        let solidity = (area as f64 / hull_area(corners).max(1.0)) as f32;
        let fill = area as f32 / ((bx1 - bx0 + 1) * (by1 - by0 + 1)) as f32;
        let hue = hue(mean);
        let (cx, cy) = (sx / area as f32, sy / area as f32);
        let mut m = [(0.0f32, 0.0f32); 3];
        let mut norm = 0.0f32;
        for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
            let (dx, dy) = ((i % w) as f32 + 0.5 - cx, (i / w) as f32 + 0.5 - cy);
            let (rho2, theta) = (dx * dx + dy * dy, dy.atan2(dx));
            norm += rho2;
            for (j, k) in [3.0f32, 4.0, 5.0].into_iter().enumerate() {
                m[j].0 += rho2 * (k * theta).cos();
                m[j].1 += rho2 * (k * theta).sin();
            }
        }
        let moments = m.map(|(re, im)| (re * re + im * im).sqrt() / norm.max(1e-6));
        out.push(Detection {
            shape: classify(holes, solidity, fill, moments),
            colour: Colour::from_hue(hue),
            area,
            centroid: (cx, cy),
            holes,
            solidity,
            fill,
            moments,
            hue,
        });
    }
    out.sort_by(|a, b| a.centroid.0.total_cmp(&b.centroid.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hull_of_a_square_of_pixels() {
        let pts: Vec<(i64, i64)> = (0..=3).flat_map(|x| (0..=3).map(move |y| (x, y))).collect();
        assert_eq!(hull_area(pts), 9.0);
    }

    #[test]
    fn hues_of_the_reference_colours() {
        for (rgb, c) in [([220., 30., 30.], Colour::Red), ([245., 130., 20.], Colour::Orange),
                         ([240., 210., 20.], Colour::Yellow), ([30., 165., 50.], Colour::Green),
                         ([35., 70., 225.], Colour::Blue), ([140., 45., 190.], Colour::Purple)] {
            assert_eq!(Colour::from_hue(hue(rgb)), c, "{rgb:?} hue {}", hue(rgb));
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Measuring a model with the oracle.

pub mod eval;

/// Colour × shape pairs held out from training (as `HELD_OUT_PAIRS` in `models/shapes/shapes.py`).
pub const HELD_OUT_PAIRS: [(Colour, Shape); 6] = [
    (Colour::Purple, Shape::Star),
    (Colour::Orange, Shape::Ring),
    (Colour::Green, Shape::Triangle),
    (Colour::Blue, Shape::Cross),
    (Colour::Yellow, Shape::Circle),
    (Colour::Red, Shape::Square),
];

/// Single-object templates never used in training (as `HELD_OUT_SINGLE` in `shapes.py`).
pub const HELD_OUT_TEMPLATES: [&str; 3] = ["an image of a {}", "a rendering of a {}", "there is a {}"];

/// `template` with "{colour} {shape}" in place of `{}`, with [`article`] applied.
pub fn fill_template(template: &str, colour: Colour, shape: Shape) -> String {
    article(&template.replace("{}", &format!("{colour} {shape}")))
}

/// "a" → "an" before a vowel (as `article` in `shapes.py`).
pub fn article(text: &str) -> String {
    let words: Vec<&str> = text.split(' ').collect();
    let fixed: Vec<&str> = words
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            let next_vowel = words.get(i + 1).is_some_and(|n| n.starts_with(['a', 'e', 'i', 'o', 'u']));
            if w == "a" && next_vowel { "an" } else { w }
        })
        .collect();
    fixed.join(" ")
}

/// How a set of generated images reads, for prompts asking for one `(colour, shape)` each.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Readout {
    pub images: usize,
    /// Exactly one object was found.
    pub one_object: usize,
    /// One of the objects found has the asked shape / colour / both.
    pub shape: usize,
    pub colour: usize,
    pub both: usize,
}

impl Readout {
    pub fn add(&mut self, found: &[Detection], colour: Colour, shape: Shape) {
        self.images += 1;
        self.one_object += usize::from(found.len() == 1);
        self.shape += usize::from(found.iter().any(|d| d.shape == shape));
        self.colour += usize::from(found.iter().any(|d| d.colour == colour));
        self.both += usize::from(found.iter().any(|d| d.shape == shape && d.colour == colour));
    }
    pub fn merge(&mut self, o: &Readout) {
        self.images += o.images;
        self.one_object += o.one_object;
        self.shape += o.shape;
        self.colour += o.colour;
        self.both += o.both;
    }
    pub fn rate(n: usize, of: usize) -> f64 {
        n as f64 / of.max(1) as f64
    }
}

/// Generates one image with the runtime and reads it with the oracle.
pub fn generate_and_read(sd: &crate::load::StableDiffusion, prompt: &str, seed: u64, steps: usize, guidance: f64)
    -> crate::error::Result<Vec<Detection>> {
    let req = crate::pipeline::GenerateRequest {
        prompt: prompt.to_string(),
        steps,
        guidance,
        seed,
        ..Default::default()
    };
    let g = sd.generate(&req, Default::default(), &mut |_| crate::pipeline::Control::Continue,
                        crate::pipeline::Target::Rgba)?;
    Ok(analyse(&g.rgba, g.width, g.height, 4))
}
