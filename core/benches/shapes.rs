//! The shapes model, measured by the oracle on images the runtime generates (issue #6):
//! 1. quality: shape and colour accuracy on held-out templates, for colour × shape pairs seen in training and for
//!    the held-out pairs;
//! 2. erasure: for every method, erase a shape (circle → square), a colour (red → blue) and a pair (blue circle →
//!    blue square); efficacy (share of concept images that still show the concept), replacement (share showing
//!    the replacement) and specificity (accuracy on the other pairs before → after).
//!
//! ```text
//! cargo bench --bench shapes        # UNSEE_SHAPES_MODEL (default models/shapes-sd), UNSEE_SHAPES_N (images per
//!                                   # prompt, default 4), UNSEE_SHAPES_STEPS (20), UNSEE_SHAPES_GUIDANCE (4.0),
//!                                   # UNSEE_SHAPES_METHODS (uce,time,speed,rece,erasepro,erasepro-text)
//! ```

use std::path::PathBuf;

use unsee::device::{DeviceChoice, select};
use unsee::erase::{erase, spec::Spec};
use unsee::pipeline::{LoadOptions, StableDiffusion};
use unsee::shapes::{COLOURS, Colour, HELD_OUT_PAIRS, HELD_OUT_TEMPLATES, Readout, SHAPES, Shape, fill_template,
                    generate_and_read};
use unsee::weights::Precision;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

struct Settings {
    n: usize,
    steps: usize,
    guidance: f64,
}

/// Images of `(colour, shape)` on held-out templates (rotating), seeds 0..n.
fn read_pair(sd: &StableDiffusion, s: &Settings, colour: Colour, shape: Shape, salt: usize)
    -> Vec<Vec<unsee::shapes::Detection>> {
    (0..s.n)
        .map(|i| {
            let t = HELD_OUT_TEMPLATES[(i + salt) % HELD_OUT_TEMPLATES.len()];
            generate_and_read(sd, &fill_template(t, colour, shape), (1000 * salt + i) as u64, s.steps, s.guidance)
                .unwrap()
        })
        .collect()
}

fn pct(n: usize, of: usize) -> String {
    format!("{:.1}", 100.0 * Readout::rate(n, of))
}

fn all_pairs() -> Vec<(Colour, Shape)> {
    COLOURS.iter().flat_map(|&c| SHAPES.iter().map(move |&s| (c, s))).collect()
}

/// Accuracy (both colour and shape right) over `pairs`, one seed per pair (n / 2, at least 1).
fn accuracy(sd: &StableDiffusion, s: &Settings, pairs: &[(Colour, Shape)]) -> Readout {
    let few = Settings { n: (s.n / 2).max(1), steps: s.steps, guidance: s.guidance };
    let mut r = Readout::default();
    for (k, &(c, sh)) in pairs.iter().enumerate() {
        for found in read_pair(sd, &few, c, sh, 7 + k) {
            r.add(&found, c, sh);
        }
    }
    r
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var("UNSEE_SHAPES_MODEL").map(PathBuf::from).unwrap_or(repo.join("models/shapes-sd"));
    let s = Settings { n: env("UNSEE_SHAPES_N", 4), steps: env("UNSEE_SHAPES_STEPS", 20),
                       guidance: env("UNSEE_SHAPES_GUIDANCE", 4.0) };
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let base = StableDiffusion::load(&model, dev, &LoadOptions::default()).unwrap();
    println!("model {}, {} images per prompt, {} DDIM steps, guidance {}\n", model.display(), s.n, s.steps, s.guidance);

    // 1. Quality.
    println!("| prompts | images | shape % | colour % | both % | exactly one object % |");
    println!("|---|---|---|---|---|---|");
    let mut seen = Readout::default();
    let mut held = Readout::default();
    for (k, (c, sh)) in all_pairs().into_iter().enumerate() {
        let mut r = Readout::default();
        for found in read_pair(&base, &s, c, sh, k) {
            r.add(&found, c, sh);
        }
        if HELD_OUT_PAIRS.contains(&(c, sh)) { held.merge(&r) } else { seen.merge(&r) }
    }
    for (name, r) in [("seen pairs, held-out templates", &seen), ("held-out pairs, held-out templates", &held)] {
        println!("| {name} | {} | {} | {} | {} | {} |", r.images, pct(r.shape, r.images), pct(r.colour, r.images),
                 pct(r.both, r.images), pct(r.one_object, r.images));
    }

    // 2. Erasure.
    let methods: Vec<String> = std::env::var("UNSEE_SHAPES_METHODS")
        .unwrap_or_else(|_| "uce,time,speed,rece,erasepro,erasepro-text".into())
        .split(',')
        .filter(|m| !m.is_empty())
        .map(str::to_string)
        .collect();
    if methods.is_empty() {
        return; // UNSEE_SHAPES_METHODS="" → quality only
    }
    let tmp = std::env::temp_dir().join(format!("unsee-shapes-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let templates = tmp.join("templates.txt");
    std::fs::write(&templates, "a {}\n{}\na photo of a {}\na drawing of a {}\none {}\na picture of a {}\n").unwrap();
    // (name, what counts as the concept, items: (concept pair, replacement pair)).
    #[derive(Clone, Copy)]
    enum Kind {
        Shape,
        Colour,
        Pair,
    }
    type Erasure = (&'static str, Kind, Vec<((Colour, Shape), (Colour, Shape))>);
    let erasures: Vec<Erasure> = vec![
        ("shape: circle → square", Kind::Shape,
         COLOURS.iter().map(|&c| ((c, Shape::Circle), (c, Shape::Square))).collect()),
        ("colour: red → blue", Kind::Colour,
         SHAPES.iter().map(|&sh| ((Colour::Red, sh), (Colour::Blue, sh))).collect()),
        ("pair: blue circle → blue square", Kind::Pair,
         vec![((Colour::Blue, Shape::Circle), (Colour::Blue, Shape::Square))]),
    ];
    println!("\n| erasure | method | efficacy: still shows the concept % | shows the replacement % | other pairs correct before → after % | drop (points) |");
    println!("|---|---|---|---|---|---|");
    for (name, kind, items) in &erasures {
        let erased: Vec<(Colour, Shape)> = items.iter().map(|i| i.0).collect();
        let others: Vec<(Colour, Shape)> = all_pairs().into_iter().filter(|p| !erased.contains(p)).collect();
        let before = accuracy(&base, &s, &others);
        for method in &methods {
            let mut spec = format!("method = \"{method}\"\ntemplates = \"{}\"\npreserve = [", templates.display());
            spec.push_str(&others.iter().map(|(c, sh)| format!("\"{c} {sh}\"")).collect::<Vec<_>>().join(", "));
            spec.push_str("]\n");
            for ((c, sh), (rc, rsh)) in items {
                spec.push_str(&format!("[[erase]]\nconcept = \"{c} {sh}\"\nreplace_with = \"{rc} {rsh}\"\n"));
            }
            let spec = Spec::parse(&spec, &tmp.join("spec.toml")).unwrap();
            let mut sd = base.clone();
            if let Err(e) = erase(&mut sd, &spec) {
                println!("| {name} | {method} | error: {e} | | | |");
                continue;
            }
            let (mut still, mut replaced, mut total) = (0, 0, 0);
            for (k, ((c, sh), (rc, rsh))) in items.iter().enumerate() {
                for found in read_pair(&sd, &s, *c, *sh, 100 + k) {
                    total += 1;
                    still += usize::from(found.iter().any(|d| match kind {
                        Kind::Shape => d.shape == *sh,
                        Kind::Colour => d.colour == *c,
                        Kind::Pair => d.shape == *sh && d.colour == *c,
                    }));
                    replaced += usize::from(found.iter().any(|d| d.shape == *rsh && d.colour == *rc));
                }
            }
            let after = accuracy(&sd, &s, &others);
            let drop = 100.0 * (Readout::rate(before.both, before.images) - Readout::rate(after.both, after.images));
            println!("| {name} | {method} | {} | {} | {} → {} | {drop:.1} |", pct(still, total), pct(replaced, total),
                     pct(before.both, before.images), pct(after.both, after.images));
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}
