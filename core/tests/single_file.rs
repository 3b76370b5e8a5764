//! Single-file (CompVis key names) checkpoints load to the same model as the diffusers folder.
//!
//! The checkpoint is assembled from the `small` folder with the key map that `tests/reference/make_compvis_map.py`
//! wrote and validated against diffusers' own single-file converters; unsee's converter (`compvis.rs`) is then
//! checked against the goldens.

mod common;

use std::collections::HashMap;

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
    let dir = std::env::temp_dir().join(format!("unsee-single-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
    let dir = std::env::temp_dir().join(format!("unsee-single-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("odd.safetensors");
    build_checkpoint(&ckpt, &[("model.diffusion_model.extra_block.0.weight", vec![4])]);
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let opts = LoadOptions { check: false, config_dir: Some(model_dir("small")), ..Default::default() };
    let err = StableDiffusion::load(&ckpt, dev, &opts).err().expect("must fail").to_string();
    assert!(err.contains("unexpected: model.diffusion_model.extra_block.0.weight"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
