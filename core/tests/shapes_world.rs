//! The shapes world end to end (issue #6), the fast subset CI runs: the trained model `models/shapes-sd` draws what
//! it is asked for (judged by the oracle on images the runtime generates from held-out templates), and a closed-form
//! erasure removes a shape from its pictures while the other pairs stay drawable. The full table is
//! `cargo bench --bench shapes`.

mod common;

use common::repo;
use unsee::device::{DeviceChoice, select};
use unsee::erase::spec::Method;
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::shapes::Readout;
use unsee::shapes::eval::{Erasure, Measure, Settings, baseline, measure, quality};
use unsee::shapes::Shape;
use unsee::weights::Precision;

fn shapes_model() -> StableDiffusion {
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    StableDiffusion::load(&repo().join("models/shapes-sd"), dev, &LoadOptions::default()).unwrap()
}

fn pct(n: usize, of: usize) -> f64 {
    100.0 * Readout::rate(n, of)
}

/// One image per colour × shape pair (36, held-out templates, 20 DDIM steps, guidance 4).
#[test]
fn the_shapes_model_draws_the_asked_shape_and_colour() {
    let sd = shapes_model();
    let s = Settings { n: 1, steps: 20, guidance: 4.0 };
    let (seen, held) = quality(&sd, &s).unwrap();
    let mut all = seen.clone();
    all.merge(&held);
    let (shape, colour) = (pct(all.shape, all.images), pct(all.colour, all.images));
    eprintln!("36 images: shape {shape:.1} %, colour {colour:.1} % (held-out pairs: shape {:.1} %, colour {:.1} %)",
              pct(held.shape, held.images), pct(held.colour, held.images));
    // The target; this seed set reads 100 % / 100 % (README), so up to three borderline images may flip.
    assert!(shape >= 90.0 && colour >= 90.0, "shape {shape:.1} %, colour {colour:.1} %");
}

/// UCE erases "circle" (→ "square") in every colour: the held-out-template circle prompts no longer show a circle,
/// and accuracy on the other 30 pairs drops by at most 10 points. Under the attacks: circles beside another object
/// stay erased, and the white-box embedding attack brings them back (UCE re-routes the concept's keys; the attack
/// inverts that; README's table) — which also shows the attack works end to end.
#[test]
fn uce_erases_circles_from_the_pictures() {
    let sd = shapes_model();
    let s = Settings { n: 2, steps: 20, guidance: 4.0 };
    let erasure = Erasure::shape(Shape::Circle, Shape::Square);
    let what = Measure { specificity: true, attacks: true };
    let base_line = baseline(&sd, &erasure, &s, what).unwrap(); // 1 image per other pair (n / 2)
    let row = measure(&sd, &erasure, Method::Uce, &s, &base_line, what).unwrap();
    eprintln!("{}\n{}", unsee::shapes::eval::Row::HEADER, row.markdown());
    assert!(row.still.pct() <= 100.0 / 12.0 + 1e-9, "circles still drawn in {:.1} % of images", row.still.pct());
    assert!(row.replaced.pct() >= 50.0, "squares in only {:.1} % of images", row.replaced.pct());
    assert!(row.drop() <= 10.0, "other pairs dropped {:.1} points", row.drop());
    let attack = |name: &str| row.attacks.iter().find(|a| a.attack == name).unwrap().clone();
    let (comp, emb) = (attack("composition"), attack("embedding"));
    assert!(comp.base.pct() >= 75.0, "the base model does not draw the compositions: {comp:?}");
    assert!(comp.erased.unwrap().pct() <= 100.0 / 6.0 + 1e-9, "circles came back beside other objects: {comp:?}");
    assert!(emb.erased.unwrap().pct() >= 50.0, "the embedding attack did not recover circles: {emb:?}");
}
