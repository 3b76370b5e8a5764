//! The shapes model, measured by the oracle on images the runtime generates (issue #6):
//! 1. quality: shape and colour accuracy on held-out templates, for colour × shape pairs seen in training and for
//!    the held-out pairs;
//! 2. erasure: for every method, erase a shape (circle → square), a colour (red → blue) and a pair (blue circle →
//!    blue square); efficacy (share of concept images that still show the concept), replacement (share showing
//!    the replacement), specificity (accuracy on the other pairs before → after), and efficacy under the
//!    composition and embedding attacks (`unsee::shapes::eval`).
//!
//! ```text
//! cargo bench --bench shapes        # UNSEE_SHAPES_MODEL (default models/shapes-sd), UNSEE_SHAPES_N (images per
//!                                   # prompt, default 4), UNSEE_SHAPES_STEPS (20), UNSEE_SHAPES_GUIDANCE (4.0),
//!                                   # UNSEE_SHAPES_METHODS (uce,time,speed,rece,erasepro,erasepro-text; "" =
//!                                   # quality only), UNSEE_SHAPES_QUALITY=0 skips the quality table
//! ```

use std::path::PathBuf;
use std::time::Instant;

use unsee::device::{DeviceChoice, select};
use unsee::erase::spec::Method;
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::shapes::Readout;
use unsee::shapes::eval::{Erasure, Measure, Row, Settings, baseline, measure, quality};
use unsee::weights::Precision;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn pct(n: usize, of: usize) -> String {
    format!("{:.1}", 100.0 * Readout::rate(n, of))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var("UNSEE_SHAPES_MODEL").map(PathBuf::from).unwrap_or(repo.join("models/shapes-sd"));
    let model = if model.is_relative() { std::env::current_dir().unwrap().join(model) } else { model };
    let s = Settings { n: env("UNSEE_SHAPES_N", 4), steps: env("UNSEE_SHAPES_STEPS", 20),
                       guidance: env("UNSEE_SHAPES_GUIDANCE", 4.0) };
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let base = StableDiffusion::load(&model, dev, &LoadOptions::default()).unwrap();
    println!("model {}, {} images per prompt, {} DDIM steps, guidance {}\n", model.display(), s.n, s.steps, s.guidance);

    // 1. Quality.
    if env("UNSEE_SHAPES_QUALITY", 1) != 0 {
        let (seen, held) = quality(&base, &s).unwrap();
        println!("| prompts | images | shape % | colour % | both % | exactly one object % |");
        println!("|---|---|---|---|---|---|");
        for (name, r) in [("seen pairs, held-out templates", &seen), ("held-out pairs, held-out templates", &held)] {
            println!("| {name} | {} | {} | {} | {} | {} |", r.images, pct(r.shape, r.images),
                     pct(r.colour, r.images), pct(r.both, r.images), pct(r.one_object, r.images));
        }
        println!();
    }

    // 2. Erasure.
    let methods: Vec<Method> = std::env::var("UNSEE_SHAPES_METHODS")
        .unwrap_or_else(|_| "uce,time,speed,rece,erasepro,erasepro-text".into())
        .split(',')
        .filter(|m| !m.is_empty())
        .map(|m| m.parse().unwrap_or_else(|e| panic!("UNSEE_SHAPES_METHODS: {e}")))
        .collect();
    if methods.is_empty() {
        return;
    }
    println!("{}", Row::HEADER);
    let what = Measure { specificity: true, attacks: true };
    for erasure in Erasure::standard() {
        let base_line = baseline(&base, &erasure, &s, what).unwrap();
        for method in &methods {
            let t = Instant::now();
            match measure(&base, &erasure, *method, &s, &base_line, what) {
                Ok(row) => println!("{}", row.markdown()),
                Err(e) => println!("| {} | {method} | error: {e} | | | | | |", erasure.name),
            }
            eprintln!("{} / {method}: {:.0}s", erasure.name, t.elapsed().as_secs_f64());
        }
    }
}
