//! The shapes oracle on clean renders of the generator (`models/shapes/shapes.py --fixture tests/fixtures/shapes`):
//! 400 scenes of one or two shapes, half of them with the colour × shape pairs held out from training.

use std::collections::BTreeMap;
use std::path::PathBuf;

use unsee::shapes::{Colour, Shape, analyse};

#[test]
fn oracle_reads_clean_renders() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/shapes");
    let sheet = image::open(dir.join("clean.png")).unwrap().to_rgb8();
    let meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("clean.json")).unwrap()).unwrap();
    let tile = meta["tile"].as_u64().unwrap() as u32;
    let cols = meta["columns"].as_u64().unwrap() as u32;
    let labels = meta["labels"].as_array().unwrap();
    let (mut objects, mut shape_ok, mut colour_ok, mut scenes_ok) = (0, 0, 0, 0);
    let mut confusion: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (k, label) in labels.iter().enumerate() {
        let (r, c) = (k as u32 / cols, k as u32 % cols);
        let img = image::imageops::crop_imm(&sheet, c * tile, r * tile, tile, tile).to_image();
        let found = analyse(img.as_raw(), tile as usize, tile as usize, 3);
        let want: Vec<(Shape, Colour)> = label["objects"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (Shape::from_name(o["shape"].as_str().unwrap()).unwrap(),
                      Colour::from_name(o["colour"].as_str().unwrap()).unwrap()))
            .collect();
        let got: Vec<(Shape, Colour)> = found.iter().map(|d| (d.shape, d.colour)).collect();
        if got == want {
            scenes_ok += 1;
        } else {
            eprintln!("scene {k} {:?}: want {want:?}, got {got:?} ({:?})", label["caption"], found);
        }
        objects += want.len();
        if got.len() == want.len() {
            for (g, w) in got.iter().zip(&want) {
                shape_ok += usize::from(g.0 == w.0);
                colour_ok += usize::from(g.1 == w.1);
                *confusion.entry((w.0.to_string(), g.0.to_string())).or_default() += 1;
            }
        }
    }
    let n = labels.len();
    let (shape_acc, colour_acc, scene_acc) =
        (shape_ok as f64 / objects as f64, colour_ok as f64 / objects as f64, scenes_ok as f64 / n as f64);
    eprintln!("{n} scenes, {objects} objects: shape {shape_acc:.4}, colour {colour_acc:.4}, whole scene {scene_acc:.4}");
    eprintln!("confusion (want, got): {confusion:?}");
    assert!(shape_acc >= 0.98 && colour_acc >= 0.98 && scene_acc >= 0.98,
            "oracle below 98 %: shape {shape_acc}, colour {colour_acc}, scene {scene_acc}");
}
