//! `unsee harden` (#13): adversarial training of the text encoder on the shapes model — the loss falls, frozen
//! parts stay bit-identical, runs are deterministic, and the folder and the compact delta load to the same encoder
//! while a delta for another encoder or an altered one is refused.

mod common;

use std::path::Path;

use common::*;
use unsee::engine::{Engine, EngineOptions};
use unsee::erase::harden::HardenParams;
use unsee::erase::matrices::text_encoder_hash_of;
use unsee::erase::spec::Spec;
use unsee::error::Error;

fn spec(params: HardenParams) -> Spec {
    let mut s = Spec::from_file(&repo().join("models/specs/shapes-circle.toml")).unwrap();
    s.erase.truncate(2);
    s.harden = Some(params);
    s
}

fn small() -> HardenParams {
    HardenParams { iterations: 20, warmup: 5, attack_steps: 2, lr: 1e-4, images: 4, retain_batch: 2,
                   ..HardenParams::default() }
}

fn engine(text_encoder: Option<&Path>) -> Result<Engine, Error> {
    Engine::open(&EngineOptions { model: repo().join("models/shapes-sd"),
                                  text_encoder: text_encoder.map(Path::to_path_buf), ..EngineOptions::default() })
}

fn hidden(e: &Engine) -> Vec<f32> {
    unsee::tensor::to_f32_vec(e.encode_prompt("an image of a red circle").unwrap().0).unwrap()
}

#[test]
fn hardening_trains_the_chosen_layers_only_and_round_trips() {
    let mut e = engine(None).unwrap();
    let base = e.model().text_encoder.clone();
    let report = e.harden(&spec(HardenParams { layers: vec![1], ..small() }), &mut |_, _, _| {}, &|| false).unwrap();
    assert!(report.unlearn_loss.1 < report.unlearn_loss.0, "the unlearning loss falls: {:?}", report.unlearn_loss);
    let te = &e.model().text_encoder;
    let vals = |t: burn::tensor::Tensor<2>| unsee::tensor::to_f32_vec(t).unwrap();
    assert_eq!(vals(te.token_embeddings()), vals(base.token_embeddings()), "token embeddings are frozen");
    let l0 = |m: &unsee::clip::CLIPTextModel| vals(m.text_model.encoder.layers[0].mlp.fc1.weight.val());
    let l1 = |m: &unsee::clip::CLIPTextModel| vals(m.text_model.encoder.layers[1].mlp.fc1.weight.val());
    assert_eq!(l0(te), l0(&base), "layer 0 is not in harden.layers");
    assert_ne!(l1(te), l1(&base), "layer 1 is trained");

    let dir = tmp_dir("harden", "roundtrip");
    e.save_text_encoder(&dir.join("text_encoder")).unwrap();
    e.save_hardened_delta(&dir.join("delta.safetensors")).unwrap();
    let want = hidden(&e);
    assert_eq!(hidden(&engine(Some(&dir.join("text_encoder"))).unwrap()), want, "folder");
    assert_eq!(hidden(&engine(Some(&dir.join("delta.safetensors"))).unwrap()), want, "delta");
    assert!(std::fs::metadata(dir.join("delta.safetensors")).unwrap().len()
            < std::fs::metadata(dir.join("text_encoder/model.safetensors")).unwrap().len() / 10,
            "the delta holds only the trained tensors");
    assert!(e.save_text_encoder(&dir.join("text_encoder")).is_err(), "an existing folder is not overwritten");
    // The single-file export carries the hardened encoder (`unsee harden --bake-single-file`).
    e.bake_single_file(&dir.join("hardened.safetensors")).unwrap();
    let single = Engine::open(&EngineOptions { model: dir.join("hardened.safetensors"),
                                               config_dir: Some(repo().join("models/shapes-sd")),
                                               ..Default::default() }).unwrap();
    assert_eq!(hidden(&single), want, "single file");

    // An altered delta and a delta for another encoder are refused.
    let mut bytes = std::fs::read(dir.join("delta.safetensors")).unwrap();
    let n = bytes.len();
    bytes[n - 3] ^= 0x40;
    std::fs::write(dir.join("altered.safetensors"), &bytes).unwrap();
    let altered = engine(Some(&dir.join("altered.safetensors"))).map(|_| ()).unwrap_err().to_string();
    assert!(altered.contains("altered"), "{altered}");
    let tiny = Engine::open(&EngineOptions { model: model_dir("tiny"), text_encoder: Some(dir.join("delta.safetensors")),
                                             ..Default::default() });
    assert!(tiny.is_err(), "a delta trained from another encoder is refused");
}

#[test]
fn hardening_is_deterministic_and_cancellable() {
    let p = HardenParams { iterations: 6, warmup: 2, ..small() };
    let run = || {
        let mut e = engine(None).unwrap();
        e.harden(&spec(p.clone()), &mut |_, _, _| {}, &|| false).unwrap();
        text_encoder_hash_of(&e.model().text_encoder)
    };
    assert_eq!(run(), run());
    let mut e = engine(None).unwrap();
    let before = text_encoder_hash_of(&e.model().text_encoder);
    let r = e.harden(&spec(p.clone()), &mut |_, _, _| {}, &|| true);
    assert!(matches!(r, Err(Error::Cancelled)), "{:?}", r.err());
    assert_eq!(text_encoder_hash_of(&e.model().text_encoder), before, "nothing changes when cancelled");
    for bad in [HardenParams { layers: vec![7], ..p.clone() }, HardenParams { lr: f64::NAN, ..p.clone() },
                HardenParams { iterations: 0, ..p.clone() }] {
        let err = e.harden(&spec(bad), &mut |_, _, _| {}, &|| false).unwrap_err();
        assert!(matches!(err, Error::InvalidSpec(_)), "{err}");
    }
}

#[test]
fn the_harden_table_parses_with_line_numbers() {
    let text = std::fs::read_to_string(repo().join("models/specs/shapes-circle.toml")).unwrap()
        .replace("templates = \"shapes-templates.txt\"", "");
    let ok = Spec::parse_inline(&format!("{text}\n[harden]\niterations = 50\nlayers = [0, 1]\nobjective = \"esd\"\n"))
        .unwrap();
    let h = ok.harden.unwrap();
    assert_eq!((h.iterations, h.layers.clone(), h.warmup), (50, vec![0, 1], 200));
    let bad = Spec::parse_inline(&format!("{text}\n[harden]\niteratons = 50\n")).unwrap_err().to_string();
    assert!(bad.contains("iteratons"), "{bad}");
}
