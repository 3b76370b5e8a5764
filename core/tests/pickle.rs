//! PyTorch text-encoder checkpoints (AdvUnlearn's two layouts) load with `--text-encoder` and convert to
//! safetensors without executing pickle code; hostile pickles are refused naming what they reference.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use unsee::device::{DeviceChoice, select};
use unsee::error::Error;
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::weights::Precision;

/// The checkpoints of `tests/reference/make_torch_checkpoints.py`, made from the tiny model's text encoder.
fn checkpoints(name: &str) -> PathBuf {
    let dir = tmp_dir("pickle", name);
    let status = Command::new("python3")
        .arg(repo().join("tests/reference/make_torch_checkpoints.py"))
        .arg(model_dir("tiny").join("text_encoder"))
        .arg(&dir)
        .status()
        .expect("python3 runs");
    assert!(status.success(), "make_torch_checkpoints.py failed");
    dir
}

fn load_with(text_encoder: &Path) -> Result<StableDiffusion, Error> {
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let opts = LoadOptions { text_encoder: Some(text_encoder.to_path_buf()), ..LoadOptions::default() };
    StableDiffusion::load(&model_dir("tiny"), dev, &opts)
}

fn hidden(sd: &StableDiffusion) -> Vec<f32> {
    unsee::tensor::to_f32_vec(sd.encode_prompt("a photo of a red circle").unwrap().0).unwrap()
}

#[test]
fn advunlearn_layouts_load_and_equal_the_safetensors_copy() {
    let dir = checkpoints("layouts");
    let expected = hidden(&load_with(&dir.join("expected/text_encoder")).unwrap());
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let own = hidden(&StableDiffusion::load(&model_dir("tiny"), dev, &LoadOptions::default()).unwrap());
    assert_ne!(expected, own, "the fixture's encoder differs from the model's own (final_layer_norm.bias + 0.25)");
    for path in [dir.join("hf"), dir.join("hf/pytorch_model.bin"), dir.join("TextEncoder-advunlearn-epoch_0.pt")] {
        let sd = load_with(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(hidden(&sd), expected, "{}", path.display());
    }
}

#[test]
fn convert_writes_a_text_encoder_folder() {
    let dir = checkpoints("convert");
    let out = dir.join("converted");
    let c = unsee::pickle::convert_text_encoder(&dir.join("TextEncoder-advunlearn-epoch_0.pt"), &model_dir("tiny"), &out)
        .unwrap();
    assert_eq!(c.tensors, 36, "the duplicated embedding./encoder./final_layer_norm. entries are dropped");
    assert_eq!(hidden(&load_with(&out).unwrap()), hidden(&load_with(&dir.join("expected/text_encoder")).unwrap()));
    let again = unsee::pickle::convert_text_encoder(&dir.join("hf"), &model_dir("tiny"), &out).unwrap_err();
    assert!(again.to_string().contains("exists"), "{again}");

    // The fp16 delta against the model's own encoder: only the changed tensor, loads close to the f32 result.
    let own = StableDiffusion::load(&model_dir("tiny"), select(DeviceChoice::Cpu, Precision::F32).unwrap(),
                                    &LoadOptions::default()).unwrap();
    let full = load_with(&out).unwrap();
    let delta = dir.join("delta.safetensors");
    unsee::erase::harden::write_delta(&own.text_encoder, &full.text_encoder, "test", true, &delta).unwrap();
    let st = std::fs::read(&delta).unwrap();
    let names = safetensors::SafeTensors::deserialize(&st).unwrap().names().iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(names, vec!["text_model.final_layer_norm.beta".to_string()], "only the changed tensor");
    let (a, b) = (hidden(&load_with(&delta).unwrap()), hidden(&full));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-3, "fp16 delta differs by {worst}");
    assert_ne!(a, hidden(&own), "the delta was applied");
}

#[test]
fn hostile_checkpoints_are_refused_naming_the_reference() {
    let dir = checkpoints("hostile");
    let refused = |file: &str| -> String {
        match load_with(&dir.join(file)) {
            Err(e @ Error::UnsafePickle { .. }) => e.to_string(),
            Err(other) => panic!("{file}: refused, but not as an unsafe pickle: {other}"),
            Ok(_) => panic!("{file} was loaded"),
        }
    };
    let system = refused("evil-system.pt");
    assert!(system.contains("posix.system") || system.contains("os.system"), "{system}");
    assert!(refused("evil-stack-global.pt").contains("STACK_GLOBAL"));
    assert!(refused("not-a-zip.pt").contains("zip"));
}

/// What PyTorch itself writes passes the reference check (and what only protocol 4 writes is refused with a
/// reason).
#[test]
fn the_reference_check_accepts_real_torch_save_files() {
    let real = repo().join("tests/fixtures/pickle/state_dict.pt");
    let refs = unsee::pickle::check_references(&unsee::pickle::archive_pickle(&real).unwrap(), &real).unwrap();
    assert!(refs.iter().any(|(m, n)| m == "torch._utils" && n == "_rebuild_tensor_v2"), "{refs:?}");
    assert!(refs.iter().any(|(m, n)| m == "torch" && n == "FloatStorage"), "{refs:?}");
    let p4 = repo().join("tests/fixtures/pickle/protocol4.pt");
    let err = unsee::pickle::check_references(&unsee::pickle::archive_pickle(&p4).unwrap(), &p4).unwrap_err();
    assert!(err.to_string().contains("STACK_GLOBAL"), "{err}");
    // Truncated streams and unknown opcodes are refused, never guessed.
    let pickle = unsee::pickle::archive_pickle(&real).unwrap();
    for cut in [1, pickle.len() / 2, pickle.len() - 1] {
        assert!(unsee::pickle::check_references(&pickle[..cut], &real).is_err(), "cut at {cut}");
    }
    assert!(unsee::pickle::check_references(b"\x80\x02\xff.", &real).is_err());
}
