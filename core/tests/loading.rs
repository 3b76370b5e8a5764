//! Storage formats and layouts: f32/f16/bf16 storage, the `fp16` variant, the HF cache layout, f16 compute.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use common::checks::*;
use common::*;
use safetensors::{Dtype, SafeTensors};
use unsee::device::{DeviceChoice, select};
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::scheduler::SchedulerKind;
use unsee::weights::Precision;

fn tmp(name: &str) -> PathBuf {
    tmp_dir("load", name)
}


/// Rewrites every f32 tensor of a safetensors file as bf16 (round to nearest even).
fn to_bf16(path: &Path) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let converted: Vec<(String, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), Dtype::F32);
            let b = v
                .data()
                .chunks_exact(4)
                .flat_map(|c| half::bf16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
                .collect();
            (n, v.shape().to_vec(), b)
        })
        .collect();
    let views: Vec<_> = converted
        .iter()
        .map(|(n, s, b)| (n.clone(), safetensors::tensor::TensorView::new(Dtype::BF16, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn cpu(precision: Precision) -> unsee::device::SelectedDevice {
    select(DeviceChoice::Cpu, precision).unwrap()
}

#[test]
fn bf16_storage_loads_as_f32() {
    let m = tmp("bf16").join("model");
    copy_dir(&model_dir("tiny"), &m);
    to_bf16(&m.join("vae/diffusion_pytorch_model.safetensors"));
    let sd = StableDiffusion::load(&m, cpu(Precision::F32), &LoadOptions::default()).unwrap();
    assert_eq!(sd.vae.decoder.conv_in.weight.val().dtype(), DType::F32);
    let g = Golden::load("tiny");
    // bf16 keeps 8 mantissa bits: the decode moves by a few 1e-2 at most.
    let decoded = host(sd.vae.decode(g.tensor("vae.latents", sd.dev())));
    assert_close("vae decode from bf16 storage", &decoded, g.f32("vae.decoded").1, 5e-2);
    // ...and it really is the bf16 weights that were loaded (not a stale f32 file): f32 precision is not reached.
    assert!(compare("bf16 vs f32", &decoded, g.f32("vae.decoded").1, 1e-5).is_err());
}

#[test]
fn fp16_variant_files_are_found() {
    let sd = StableDiffusion::load(&model_dir("small"), cpu(Precision::F32), &LoadOptions::default()).unwrap();
    for (component, file) in &sd.files {
        assert!(file.to_string_lossy().ends_with(".fp16.safetensors"), "{component}: {}", file.display());
    }
    assert_eq!(sd.unet.conv_in.weight.val().dtype(), DType::F32, "f16 storage is cast to the compute precision");
}

#[test]
fn f16_compute_on_cpu_stays_close_to_f32() {
    let dev = cpu(Precision::F16);
    let sd = StableDiffusion::load(&model_dir("tiny"), dev, &LoadOptions::default()).unwrap();
    assert_eq!(sd.unet.conv_in.weight.val().dtype(), DType::F16);
    let g = Golden::load("tiny");
    // Half precision: 11 mantissa bits through ~40 layers and 10 steps (measured 0.14 of latents up to 27: 5e-3).
    check_run(&sd, &g, "ddim", SchedulerKind::Ddim, 1e-2);
}

#[test]
fn hf_cache_layout_is_resolved() {
    let repo = tmp("hf").join("models--unsee--tiny-sd");
    let snap = repo.join("snapshots").join("0123456789abcdef");
    copy_dir(&model_dir("tiny"), &snap);
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123456789abcdef\n").unwrap();
    let sd = StableDiffusion::load(&repo, cpu(Precision::F32), &LoadOptions::default()).unwrap();
    assert!(sd.files[0].1.starts_with(&snap));
}

#[test]
fn prefix_encoding_equals_full_encoding() {
    // CLIP is causal: the hidden state at position p depends only on tokens ≤ p.
    let sd = StableDiffusion::load(&model_dir("tiny"), cpu(Precision::F32), &LoadOptions::default()).unwrap();
    let tokens = sd.tokenizer.encode("a photo of van gogh's starry night").unwrap();
    let ids: Vec<i64> = tokens.ids.iter().map(|&i| i as i64).collect();
    let full = host(sd.text_encoder.forward(
        burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids.clone(), [77]), sd.dev())
            .reshape([1, 77]),
    ));
    let p = tokens.eos_position + 1;
    let prefix = host(sd.text_encoder.forward(
        burn::tensor::Tensor::<1, burn::tensor::Int>::from_data(burn::tensor::TensorData::new(ids[..p].to_vec(), [p]), sd.dev())
            .reshape([1, p]),
    ));
    let d = sd.text_config.hidden_size;
    assert_close("prefix encoding", &prefix, &full[..p * d], 1e-5);
}

#[test]
fn batched_prefix_encoding_equals_one_prompt_at_a_time() {
    // Keys::prefetch encodes many prompts per call, padded to the batch's longest prefix; every key must equal the
    // one-prompt encoding. Enough prompts for several batches in each mode, of many lengths, with duplicates, the
    // empty prompt and one cut at 77 tokens.
    use unsee::erase::keys::Keys;
    use unsee::erase::spec::TokenMode;
    let sd = StableDiffusion::load(&model_dir("tiny"), cpu(Precision::F32), &LoadOptions::default()).unwrap();
    let words = ["cat", "a red circle", "van gogh's starry night over the river", "x", "painter 7 style"];
    let mut prompts: Vec<String> = (0..300).map(|i| format!("{} number {i}", words[i % words.len()])).collect();
    prompts.extend(["".to_string(), "cat number 0".into(), "long ".repeat(100)]);
    for (mode, n) in [(TokenMode::Last, prompts.len()), (TokenMode::Tail, 60)] {
        let mut batched = Keys::new(&sd);
        batched.prefetch(&prompts[prompts.len() - n..], mode).unwrap();
        // Every distinct prompt was encoded by the batched call (one duplicate in the Last set).
        assert_eq!(batched.cached(), if mode == TokenMode::Last { n - 1 } else { n });
        let mut single = Keys::new(&sd);
        for p in &prompts[prompts.len() - n..] {
            let (a, b) = (batched.columns(p, mode).unwrap(), single.columns(p, mode).unwrap());
            assert_eq!(a.len(), b.len(), "{p:?}");
            let (a, b): (Vec<f32>, Vec<f32>) = (a.concat().iter().map(|&x| x as f32).collect(),
                                                b.concat().iter().map(|&x| x as f32).collect());
            assert_close(&format!("{mode:?} keys of {p:?}"), &a, &b, 1e-5);
        }
    }
}
