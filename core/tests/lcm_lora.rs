//! Few-step sampling: the LCM scheduler and LoRA merging against diffusers (goldens and LoRA files written by
//! `tests/reference/make_lcm_lora.py` on the tiny model), erasure on merged weights, and LoRA files that must be
//! refused.
//!
//! Tolerances as in the parity tests: text encoder and UNet 1e-4, complete runs 1e-3.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use common::checks::*;
use common::*;
use unsee::device::{DeviceChoice, select};
use unsee::engine::{Engine, EngineOptions};
use unsee::error::Error;
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::lora::LoraSpec;
use unsee::scheduler::SchedulerKind;
use unsee::weights::{OwnedTensor, Precision, write_safetensors};

fn golden() -> Golden {
    Golden::load_file(&fixtures().join("tiny/lcm_lora_golden.safetensors"))
}

fn lora_file(format: &str) -> PathBuf {
    fixtures().join(format!("tiny/lora_{format}.safetensors"))
}

fn load_with(loras: Vec<LoraSpec>) -> Result<StableDiffusion, Error> {
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    StableDiffusion::load(&model_dir("tiny"), dev, &LoadOptions { loras, ..Default::default() })
}

#[test]
fn lcm_run_matches_diffusers() {
    let sd = load("tiny", DeviceChoice::Cpu);
    check_run_with(&sd, &Golden::load("tiny"), &golden(), "lcm", SchedulerKind::Lcm, 4, 1.5, 1e-3);
}

/// Each format merged at its scale gives diffusers' `load_lora_weights` + `fuse_lora` model: the text encoder's
/// hidden states, the UNet's noise prediction and a 4-step LCM run.
#[test]
fn lora_merges_like_diffusers_fuse_lora() {
    let g = golden();
    let init = Golden::load("tiny");
    for (format, scale) in [("kohya", 0.7), ("peft", 1.0)] {
        let sd = load_with(vec![LoraSpec { path: lora_file(format), scale }]).expect(format);
        assert_eq!(sd.loras.len(), 1);
        assert_eq!(sd.loras[0].format, format);
        let layers = &sd.loras[0].layers;
        assert_eq!((layers["unet"], layers["text_encoder"]), (if format == "kohya" { 12 } else { 10 }, 3), "{format}");
        let dev = sd.dev().clone();
        let (hidden, _) = sd.encode_prompt("a lighthouse at dusk").unwrap();
        assert_close(&format!("{format}: text encoder"), &host(hidden.clone()), g.f32(&format!("{format}.te_hidden")).1,
                     1e-4);
        let sample: Tensor<4> = g.tensor("unet_in.sample", &dev);
        let ctx = Tensor::cat(vec![hidden.clone(), hidden], 0);
        assert_close(&format!("{format}: unet"), &host(sd.unet.forward(sample, 499.0, &ctx)),
                     g.f32(&format!("{format}.unet_eps")).1, 1e-4);
        check_run_with(&sd, &init, &g, format, SchedulerKind::Lcm, 4, 1.5, 1e-3);
    }
    // Scale 0 is the base model; the LoRA does change it otherwise.
    let base = load("tiny", DeviceChoice::Cpu);
    let zero = load_with(vec![LoraSpec { path: lora_file("kohya"), scale: 0.0 }]).unwrap();
    let te = |sd: &StableDiffusion| host(sd.encode_prompt("a lighthouse").unwrap().0);
    assert_eq!(te(&base), te(&zero));
    let one = load_with(vec![LoraSpec { path: lora_file("kohya"), scale: 1.0 }]).unwrap();
    assert_ne!(te(&base), te(&one));
}

/// An erasure computed on SD + LoRA records the merged weights in its base hashes: it applies with the LoRA and is
/// refused without it.
#[test]
fn an_erasure_on_merged_weights_needs_the_lora() {
    let dir = tmp_dir("lcm-lora", "erasure");
    let lora = LoraSpec { path: lora_file("kohya"), scale: 1.0 };
    let open = |loras: Vec<LoraSpec>, erasures: Vec<PathBuf>| Engine::open(&EngineOptions {
        model: model_dir("tiny"), device: DeviceChoice::Cpu, loras, erasures, ..Default::default()
    });
    let mut engine = open(vec![lora.clone()], vec![]).unwrap();
    let spec = unsee::erase::spec::Spec::parse(
        "method = \"uce\"\npreserve = [\"Monet\"]\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n",
        Path::new("test.toml")).unwrap();
    let file = dir.join("van-gogh.safetensors");
    engine.erase(&spec, Some(&file)).unwrap();
    let with = open(vec![lora.clone()], vec![file.clone()]).expect("applies on the same merged weights");
    assert_eq!(with.erasures().len(), 1);
    assert_eq!(with.info().unwrap().loras.len(), 1);
    match open(vec![], vec![file.clone()]) {
        Err(Error::ErasureMismatch { .. }) => {}
        other => panic!("expected an erasure mismatch without the LoRA, got {:?}", other.map(|_| ())),
    }
    // --bake copies files: it cannot carry a merged LoRA and says so instead of dropping it.
    let err = with.bake(&dir.join("baked")).err().expect("bake refuses merged LoRAs");
    assert!(err.to_string().contains("LoRA"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A small LoRA file for the refusal tests: `entries` of (name, shape, value).
fn write_lora(dir: &Path, name: &str, entries: &[(&str, Vec<usize>, f32)]) -> PathBuf {
    let tensors: Vec<OwnedTensor> = entries.iter().map(|(n, shape, v)| {
        OwnedTensor::f32(*n, shape.clone(), &vec![*v; shape.iter().product()])
    }).collect();
    let p = dir.join(format!("{name}.safetensors"));
    write_safetensors(&p, &tensors, None).unwrap();
    p
}

#[test]
fn bad_lora_files_are_refused_with_the_tensor_named() {
    let dir = tmp_dir("lcm-lora", "hostile");
    // tiny-sd: to_q of the first transformer block is 32 × 32.
    let q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let ok = |n: &str| format!("{q}.{n}");
    let cases: Vec<(&str, Vec<(String, Vec<usize>, f32)>, &str)> = vec![
        ("unknown-layer", vec![("lora_unet_no_such_layer.lora_down.weight".into(), vec![4, 32], 0.1),
                               ("lora_unet_no_such_layer.lora_up.weight".into(), vec![32, 4], 0.1)], "names no Linear"),
        ("wrong-shape", vec![(ok("lora_down.weight"), vec![4, 31], 0.1), (ok("lora_up.weight"), vec![32, 4], 0.1)],
         "do not fit"),
        ("rank-mismatch", vec![(ok("lora_down.weight"), vec![4, 32], 0.1), (ok("lora_up.weight"), vec![32, 3], 0.1)],
         "do not fit"),
        ("no-up", vec![(ok("lora_down.weight"), vec![4, 32], 0.1)], "needs both"),
        ("nan", vec![(ok("lora_down.weight"), vec![4, 32], f32::NAN), (ok("lora_up.weight"), vec![32, 4], 0.1)],
         "NaN"),
        ("loha", vec![(format!("{q}.hada_w1_a"), vec![4, 32], 0.1)], "not plain LoRA factors"),
        ("alpha-shape", vec![(ok("lora_down.weight"), vec![4, 32], 0.1), (ok("lora_up.weight"), vec![32, 4], 0.1),
                             (ok("alpha"), vec![2], 1.0)], "one value"),
        ("overflow", vec![(ok("lora_down.weight"), vec![4, 32], 1e30), (ok("lora_up.weight"), vec![32, 4], 1e30)],
         "NaN or Inf"),
        ("empty", vec![], "no LoRA layers"),
    ];
    for (name, entries, needle) in cases {
        let entries: Vec<(&str, Vec<usize>, f32)> = entries.iter().map(|(n, s, v)| (n.as_str(), s.clone(), *v)).collect();
        let path = write_lora(&dir, name, &entries);
        match load_with(vec![LoraSpec { path, scale: 1.0 }]) {
            Err(e @ Error::InvalidLora { .. }) => assert!(e.to_string().contains(needle), "{name}: {e}"),
            other => panic!("{name}: expected InvalidLora, got {:?}", other.map(|_| ())),
        }
    }
    // Not safetensors; missing; a scale out of range.
    std::fs::write(dir.join("garbage.safetensors"), b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}").unwrap();
    assert!(matches!(load_with(vec![LoraSpec { path: dir.join("garbage.safetensors"), scale: 1.0 }]),
                     Err(Error::CorruptWeights { .. })));
    match load_with(vec![LoraSpec { path: dir.join("missing.safetensors"), scale: 1.0 }]) {
        Err(e @ Error::InvalidLora { .. }) => assert!(e.to_string().contains("no such file"), "{e}"),
        other => panic!("missing: expected InvalidLora, got {:?}", other.map(|_| ())),
    }
    assert!(matches!(load_with(vec![LoraSpec { path: lora_file("kohya"), scale: f64::NAN }]),
                     Err(Error::InvalidRequest(_))));
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CLI: 4 LCM steps with the LoRA merged, `info` listing it, and a bad LoRA exiting 1.
#[test]
fn cli_generates_with_a_lora_and_lcm() {
    let dir = tmp_dir("lcm-lora", "cli");
    let bin = env!("CARGO_BIN_EXE_unsee");
    let run = |args: &[&str]| std::process::Command::new(bin).args(args).env("UNSEE_MODEL", model_dir("tiny"))
        .output().unwrap();
    let lora = format!("{}:0.7", lora_file("kohya").display());
    let out = dir.join("lcm.png");
    let o = run(&["generate", "--device", "cpu", "--lora", &lora, "--scheduler", "lcm", "--steps", "4", "--guidance",
                  "1.5", "--prompt", "a lighthouse", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.is_file());
    let o = run(&["info", "--device", "cpu", "--lora", &lora]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(info["loras"][0]["scale"], 0.7);
    assert_eq!(info["loras"][0]["format"], "kohya");
    let o = run(&["generate", "--device", "cpu", "--lora", "/nonexistent/lora.safetensors", "--prompt", "x", "--out",
                  out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    let o = run(&["generate", "--lora", "x.safetensors:inf", "--prompt", "x"]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&dir);
}

/// kohya files written with the original LDM names (`lora_unet_input_blocks_1_1_proj_in`, as sd-scripts writes for
/// some models) merge to the same model as the diffusers-named file.
#[test]
fn kohya_ldm_names_merge_the_same() {
    use burn::store::ModuleSnapshot;
    let dir = tmp_dir("lcm-lora", "ldm");
    let base = load("tiny", DeviceChoice::Cpu);
    let mut rename = std::collections::HashMap::new();
    for t in base.unet.collect(None, Some(Box::new(burn::store::BurnToPyTorchAdapter)), true) {
        let Some(path) = t.name.strip_suffix(".weight") else { continue };
        if let Some(ldm) = unsee::compvis::unet_key_to_compvis(&t.name, &base.unet_config) {
            rename.insert(format!("lora_unet_{}", path.replace('.', "_")),
                          format!("lora_unet_{}", ldm.trim_end_matches(".weight").replace('.', "_")));
        }
    }
    let src = unsee::weights::MappedSafetensors::open(&lora_file("kohya")).unwrap();
    let mut tensors = vec![];
    let mut renamed = 0;
    for (name, view) in src.tensors().tensors() {
        let (stem, suffix) = name.split_once('.').unwrap();
        let stem = match rename.get(stem) {
            Some(ldm) if ldm != stem => {
                renamed += 1;
                ldm.clone()
            }
            _ => stem.to_string(),
        };
        tensors.push(OwnedTensor { name: format!("{stem}.{suffix}"), dtype: view.dtype(), shape: view.shape().to_vec(),
                                   bytes: view.data().to_vec() });
    }
    assert!(renamed >= 30, "only {renamed} tensors renamed");
    let ldm = dir.join("ldm.safetensors");
    write_safetensors(&ldm, &tensors, None).unwrap();
    let a = load_with(vec![LoraSpec { path: lora_file("kohya"), scale: 0.7 }]).unwrap();
    let b = load_with(vec![LoraSpec { path: ldm, scale: 0.7 }]).unwrap();
    let g = golden();
    let sample: Tensor<4> = g.tensor("unet_in.sample", a.dev());
    let ctx = Tensor::cat(vec![a.encode_prompt("x").unwrap().0, a.encode_prompt("y").unwrap().0], 0);
    assert_eq!(host(a.unet.forward(sample.clone(), 499.0, &ctx)), host(b.unet.forward(sample, 499.0, &ctx)));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A quantized bundle's weights cannot take a LoRA (the merge would be lost to rounding or need dequantizing the
/// whole layer): refused by name, while a bundle built from an engine with the LoRA merged carries it.
#[test]
fn quantized_bundles_refuse_a_lora_and_carry_a_merged_one() {
    use unsee::bundle::BuildOptions;
    use unsee::quant::Quant;
    let dir = tmp_dir("lcm-lora", "bundle");
    let lora = LoraSpec { path: lora_file("kohya"), scale: 0.7 };
    let open = |model: PathBuf, loras: Vec<LoraSpec>| Engine::open(&EngineOptions {
        model, device: DeviceChoice::Cpu, loras, ..Default::default()
    });
    let opts = BuildOptions { quant: Quant::Int8, sign: None, creator: "test".into() };
    open(model_dir("tiny"), vec![]).unwrap().build_bundle(&opts, &dir.join("plain"), &mut |_, _, _| {}).unwrap();
    match open(dir.join("plain"), vec![lora.clone()]) {
        Err(e @ Error::InvalidLora { .. }) => assert!(e.to_string().contains("quantized"), "{e}"),
        other => panic!("expected InvalidLora, got {:?}", other.map(|_| ())),
    }
    let merged = open(model_dir("tiny"), vec![lora]).unwrap();
    merged.build_bundle(&BuildOptions { quant: Quant::F16, ..opts }, &dir.join("merged"), &mut |_, _, _| {}).unwrap();
    let bundled = open(dir.join("merged"), vec![]).unwrap();
    let manifest = bundled.info().unwrap().bundle.unwrap();
    assert!(manifest.base_model["lora.0"].starts_with("lora_kohya.safetensors sha256="), "{:?}", manifest.base_model);
    let te = |e: &Engine| host(e.encode_prompt("a lighthouse at dusk").unwrap().0);
    let want = golden();
    assert_close("bundle with the LoRA merged: text encoder", &te(&bundled), want.f32("kohya.te_hidden").1, 2e-2);
    let base = open(model_dir("tiny"), vec![]).unwrap();
    assert!(compare("base", &te(&base), want.f32("kohya.te_hidden").1, 2e-2).is_err(), "the tolerance cannot tell");
    let _ = std::fs::remove_dir_all(&dir);
}
