//! Single-file (CompVis key names) checkpoints load to the same model as the diffusers folder.
//!
//! The checkpoint is assembled from the `small` folder with the key map that `tests/reference/make_compvis_map.py`
//! wrote and validated against diffusers' own single-file converters; unsee's converter (`compvis.rs`) is then
//! checked against the goldens.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use common::checks::*;
use common::*;
use safetensors::SafeTensors;
use unsee::device::{DeviceChoice, select};
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::scheduler::SchedulerKind;
use unsee::weights::Precision;

fn build_checkpoint(path: &std::path::Path, extra: &[(&str, Vec<usize>)]) {
    let map: HashMap<String, (String, String, bool)> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("small/compvis_keys.json")).unwrap()).unwrap();
    let root = model_dir("small");
    let files: HashMap<&str, Vec<u8>> = [
        ("unet", "unet/diffusion_pytorch_model.fp16.safetensors"),
        ("vae", "vae/diffusion_pytorch_model.fp16.safetensors"),
        ("text_encoder", "text_encoder/model.fp16.safetensors"),
    ]
    .into_iter()
    .map(|(c, f)| (c, std::fs::read(root.join(f)).unwrap()))
    .collect();
    let parsed: HashMap<&str, SafeTensors<'_>> =
        files.iter().map(|(c, b)| (*c, SafeTensors::deserialize(b).unwrap())).collect();
    let mut views = vec![];
    for (ldm, (component, key, as_conv)) in &map {
        let v = parsed[component.as_str()].tensor(key).unwrap();
        let mut shape = v.shape().to_vec();
        if *as_conv {
            shape.extend([1, 1]);
        }
        views.push((ldm.clone(), safetensors::tensor::TensorView::new(v.dtype(), shape, v.data()).unwrap()));
    }
    // Real checkpoints carry buffers and EMA copies that are not parameters.
    let zeros: Vec<Vec<u8>> = extra.iter().map(|(_, s)| vec![0u8; s.iter().product::<usize>() * 4]).collect();
    for ((name, shape), bytes) in extra.iter().zip(&zeros) {
        views.push((name.to_string(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap()));
    }
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn single_file_checkpoint_matches_the_folder() {
    let dir = common::tmp_dir("single", "single");
    let ckpt = dir.join("small-pruned.safetensors");
    build_checkpoint(&ckpt, &[]);
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let opts = LoadOptions { check: true, config_dir: Some(model_dir("small")), ..Default::default() };
    let sd = StableDiffusion::load(&ckpt, dev, &opts).expect("single-file load");
    let g = Golden::load("small");
    check_text_encoder(&sd, &g, 1e-4);
    check_unet(&sd, &g, 1e-4);
    check_vae(&sd, &g, 1e-4);
    check_run(&sd, &g, "ddim", SchedulerKind::Ddim, 1e-3);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn single_file_with_unknown_weights_is_refused() {
    let dir = common::tmp_dir("single", "single-bad");
    let ckpt = dir.join("odd.safetensors");
    build_checkpoint(&ckpt, &[("model.diffusion_model.extra_block.0.weight", vec![4])]);
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let opts = LoadOptions { check: false, config_dir: Some(model_dir("small")), ..Default::default() };
    let err = StableDiffusion::load(&ckpt, dev, &opts).err().expect("must fail").to_string();
    assert!(err.contains("unexpected: model.diffusion_model.extra_block.0.weight"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

/// The reverse map (diffusers → CompVis names) of `--bake-single-file` gives back, for every tensor of the small
/// model, the CompVis name that diffusers' own single-file converters were checked to read
/// (`tests/reference/make_compvis_map.py` → `compvis_keys.json`), with the VAE attention weights as 1×1 convs.
#[test]
fn reverse_key_map_matches_the_diffusers_checked_map() {
    let map: HashMap<String, (String, String, bool)> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("small/compvis_keys.json")).unwrap()).unwrap();
    let root = model_dir("small");
    let unet: unsee::unet::UNetConfig =
        serde_json::from_str(&std::fs::read_to_string(root.join("unet/config.json")).unwrap()).unwrap();
    let vae: unsee::vae::VaeConfig =
        serde_json::from_str(&std::fs::read_to_string(root.join("vae/config.json")).unwrap()).unwrap();
    for (ldm, (component, key, as_conv)) in &map {
        let (got, conv) = match component.as_str() {
            "unet" => (format!("model.diffusion_model.{}", unsee::compvis::unet_key_to_compvis(key, &unet).unwrap()), false),
            "vae" => {
                let (k, c) = unsee::compvis::vae_key_to_compvis(key, &vae).unwrap();
                (format!("first_stage_model.{k}"), c)
            }
            _ => (unsee::compvis::text_encoder_key_to_compvis(key), false),
        };
        assert_eq!((&got, conv), (ldm, *as_conv), "{component} {key}");
    }
}

/// `Engine::bake_single_file` (`unsee erase --bake-single-file`) on the shapes model with "circle" erased: the
/// checkpoint loads back through the single-file loader and draws exactly what the baked diffusers folder draws, and
/// what the engine with the erasure draws to f32 rounding — no circle.
#[test]
fn baked_single_file_loads_back_with_the_erasure() {
    use unsee::engine::{Engine, EngineOptions};
    use unsee::pipeline::{Control, GenerateRequest, Target};
    let dir = common::tmp_dir("single", "bake");
    let shapes = unsee::model::default_model_dir();
    let mut engine = Engine::open(&EngineOptions { device: DeviceChoice::Cpu, ..Default::default() }).unwrap();
    let spec = unsee::erase::spec::Spec::from_file(&shapes.join("../specs/shapes-circle.toml")).unwrap();
    engine.erase(&spec, None).unwrap();
    let ckpt = dir.join("shapes-no-circles.safetensors");
    engine.bake_single_file(&ckpt).unwrap();
    engine.bake(&dir.join("folder")).unwrap();
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().starts_with('.')),
            "the staging folder was left behind");
    let names: Vec<String> = {
        let bytes = std::fs::read(&ckpt).unwrap();
        SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(str::to_string).collect()
    };
    assert!(names.iter().any(|n| n.starts_with("model.diffusion_model.input_blocks.")));
    assert!(names.iter().any(|n| n == "first_stage_model.decoder.mid.attn_1.q.weight"));
    assert!(names.iter().any(|n| n.starts_with("cond_stage_model.transformer.text_model.")));

    let req = GenerateRequest { prompt: "an image of a red circle".into(), steps: 20, guidance: 4.0, seed: 5,
                                ..Default::default() };
    let draw = |model: &std::path::Path, config: Option<PathBuf>| {
        let e = Engine::open(&EngineOptions { model: model.to_path_buf(), config_dir: config, device: DeviceChoice::Cpu,
                                              check: true, ..Default::default() }).unwrap();
        e.generate(&req, Default::default(), &mut |_| Control::Continue, Target::Rgba).unwrap()
    };
    let single = draw(&ckpt, Some(shapes.clone()));
    let folder = draw(&dir.join("folder"), None);
    let live = engine.generate(&req, Default::default(), &mut |_| Control::Continue, Target::Rgba).unwrap();
    assert!(single.rgba == folder.rgba, "the single file draws differently from the baked folder");
    // the live engine adds the delta on the device, the bake on the host: the same to f32 rounding
    let worst = single.rgba.iter().zip(&live.rgba).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
    assert!(worst <= 2, "the single file draws differently from the engine with the erasure (by {worst}/255)");
    let found = unsee::shapes::analyse(&single.rgba, single.width, single.height, 4);
    assert!(found.iter().all(|d| d.shape != unsee::shapes::Shape::Circle), "{found:?}");

    // not a .safetensors name, and a base model that is not a folder: clean errors
    assert!(engine.bake_single_file(&dir.join("model.ckpt")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}

/// With a replaced text encoder (the shipped robust one, a delta file) the single file carries that encoder, not the
/// base folder's: loaded back, its text encoder hashes the same as the engine's.
#[test]
fn baked_single_file_carries_the_text_encoder_in_use() {
    use unsee::engine::{Engine, EngineOptions};
    use unsee::erase::matrices::text_encoder_hash_of;
    let dir = common::tmp_dir("single", "te");
    let shapes = unsee::model::default_model_dir();
    let robust = shapes.join("../robust/shapes-circle.safetensors");
    let engine = Engine::open(&EngineOptions { device: DeviceChoice::Cpu, text_encoder: Some(robust),
                                               ..Default::default() }).unwrap();
    let base = Engine::open(&EngineOptions { device: DeviceChoice::Cpu, ..Default::default() }).unwrap();
    let ckpt = dir.join("robust.safetensors");
    engine.bake_single_file(&ckpt).unwrap();
    let back = Engine::open(&EngineOptions { model: ckpt, config_dir: Some(shapes), device: DeviceChoice::Cpu,
                                             ..Default::default() }).unwrap();
    let (mine, theirs) = (text_encoder_hash_of(&engine.model().text_encoder),
                          text_encoder_hash_of(&back.model().text_encoder));
    assert_eq!(mine, theirs, "the checkpoint's text encoder is not the one in use");
    assert_ne!(theirs, text_encoder_hash_of(&base.model().text_encoder));
    std::fs::remove_dir_all(&dir).ok();
}
