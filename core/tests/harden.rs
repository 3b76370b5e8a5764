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
    HardenParams { iterations: 20, warmup: 5, attack_steps: 2, lr: 1e-4, images: 4, retain_batch: 2, retain_images: 4,
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
    // All warm-up (no inner attack): the loss is then the plain prompts', comparable from start to end (a
    // persistent attack grows stronger as the run goes on).
    // 40 iterations at a large lr, so the fall is far above the noise of 4 random (image, timestep) draws per tenth.
    let p = HardenParams { layers: vec![1], iterations: 40, warmup: 40, lr: 1e-3, ..small() };
    let report = e.harden(&spec(p), &mut |_, _, _| {}, &|| false).unwrap();
    eprintln!("unlearning loss, first and last tenth: {:?}", report.unlearn_loss);
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
                HardenParams { iterations: 0, ..p.clone() }, HardenParams { retain_images: 0, ..p.clone() }] {
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

/// The inner attack's k tokens go in front of the prompt, after it, or in place of the concept phrase.
#[test]
fn the_attack_goes_where_attack_type_says() {
    use unsee::erase::attack::loss::embed_ids;
    use unsee::erase::harden::{AttackType, attacked};
    let e = engine(None).unwrap();
    let sd = e.model();
    let ids = |prompt: &str| sd.tokenizer.encode(prompt).unwrap().ids;
    let values = |t: burn::tensor::Tensor<3>| unsee::tensor::to_f32_vec(t).unwrap();
    // Two known tokens as the attack's embeddings, so each placement equals a typed prompt.
    let words = sd.tokenizer.content_ids("big green").unwrap();
    assert_eq!(words.len(), 2);
    let adv = embed_ids(sd, &words);
    for (kind, typed) in [(AttackType::Prefix, "big green an image of a red circle"),
                          (AttackType::Suffix, "an image of a red circle big green"),
                          (AttackType::Replace, "an image of a big green")] {
        let got = attacked(sd, "an image of a {}", "red circle", Some(&adv), kind).unwrap();
        assert_eq!(values(got), values(embed_ids(sd, &ids(typed))), "{kind:?}");
    }
    let plain = attacked(sd, "an image of a {}", "red circle", None, AttackType::Replace).unwrap();
    assert_eq!(values(plain), values(embed_ids(sd, &ids("an image of a red circle"))));
}

/// `start = "erasepro-text"`: training starts from the closed-form edit, so an (almost) untrained result is the
/// encoder `unsee erase` makes with `method = "erasepro-text"` and the same spec.
#[test]
fn hardening_can_start_from_the_closed_form_edit() {
    use unsee::erase::harden::Start;
    use unsee::erase::spec::Method;
    let fc2 = |e: &Engine| -> Vec<f32> {
        e.model().text_encoder.text_model.encoder.layers.iter()
            .flat_map(|l| unsee::tensor::to_f32_vec(l.mlp.fc2.weight.val()).unwrap()).collect()
    };
    let base = fc2(&engine(None).unwrap());
    let mut closed_form = engine(None).unwrap();
    closed_form.erase(&spec(small()).with_method(Method::EraseproText), None).unwrap();
    let edited = fc2(&closed_form);
    let gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(gap(&edited, &base) > 1e-3, "the closed-form edit changes fc2");
    for (start, from) in [(Start::Original, &base), (Start::EraseproText, &edited)] {
        let mut e = engine(None).unwrap();
        // One Adam step of 1e-9 moves each weight by at most ~1e-9.
        let p = HardenParams { iterations: 1, warmup: 1, lr: 1e-9, start, ..small() };
        e.harden(&spec(p), &mut |_, _, _| {}, &|| false).unwrap();
        let got = fc2(&e);
        assert!(gap(&got, from) < 1e-6, "{start:?}: {} from where it should start", gap(&got, from));
    }
}

#[test]
fn the_attack_options_parse_and_bad_ones_are_refused() {
    use unsee::erase::harden::{AttackInit, AttackType, Start};
    let text = std::fs::read_to_string(repo().join("models/specs/shapes-circle.toml")).unwrap()
        .replace("templates = \"shapes-templates.txt\"", "");
    let ok = Spec::parse_inline(&format!("{text}\n[harden]\nattack_type = \"replace\"\nattack_init = \"random\"\n\
                                          start = \"erasepro-text\"\n")).unwrap();
    let h = ok.harden.unwrap();
    assert_eq!((h.attack_type, h.attack_init, h.start), (AttackType::Replace, AttackInit::Random, Start::EraseproText));
    let d = HardenParams::default();
    assert_eq!((d.attack_type, d.attack_init, d.start), (AttackType::Prefix, AttackInit::Latest, Start::Original));
    for bad in ["attack_type = \"middle\"", "attack_init = \"best\"", "start = \"uce\""] {
        let err = Spec::parse_inline(&format!("{text}\n[harden]\n{bad}\n")).unwrap_err().to_string();
        assert!(err.contains(bad.split(" = ").nth(1).unwrap().trim_matches('"')), "{bad}: {err}");
    }
}
