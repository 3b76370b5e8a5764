//! What each fuzz target feeds its input to. Shared (by `#[path]`) between the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` and `core/tests/fuzz_corpus.rs`, which replays the committed corpora in CI.
//!
//! Every function must return (an `Err` is fine) for any input: a panic, an abort, a hang or a leak is a bug.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use unsee::clip::{CLIPTextModel, ClipTextConfig};
use unsee::device::{DeviceChoice, select};
use unsee::unet::{UNet2DConditionModel, UNetConfig};
use unsee::vae::{AutoencoderKL, VaeConfig};
use unsee::weights::{MappedSafetensors, Precision, TensorSource, load_module};

/// The targets, by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/corpus/*`).
pub const TARGETS: [(&str, fn(&[u8])); 12] = [
    ("safetensors_load", safetensors_load),
    ("compvis", compvis),
    ("config", config),
    ("spec", spec),
    ("erasure_file", erasure_file),
    ("tokenizer", tokenizer),
    ("latents", latents),
    ("http_body", http_body),
    ("quantized_component", quantized_component),
    ("bundle_manifest", bundle_manifest),
    ("lora_file", lora_file),
    ("pytorch_checkpoint", pytorch_checkpoint),
];

fn tiny() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-sd"))
}

fn read_json<T: serde::de::DeserializeOwned>(rel: &str) -> T {
    let text = std::fs::read_to_string(tiny().join(rel)).expect("tiny-sd config");
    serde_json::from_str(&text).expect("tiny-sd config parses")
}

/// The tiny model's text encoder, freshly initialised on the CPU.
fn tiny_text_encoder() -> CLIPTextModel {
    let cfg: ClipTextConfig = read_json("text_encoder/config.json");
    let device = select(DeviceChoice::Cpu, Precision::F32).expect("cpu").device;
    CLIPTextModel::new(&cfg, &device).expect("tiny text encoder")
}

/// A scratch file of this process holding `data`.
fn scratch(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("unsee-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let p = dir.join(name);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("scratch dir");
    std::fs::write(&p, data).expect("scratch file");
    p
}

/// A safetensors buffer loaded into the tiny text encoder (headers, offsets, dtypes, shapes, names).
pub fn safetensors_load(data: &[u8]) {
    let _ = load_module(&mut tiny_text_encoder(), "text_encoder",
                        TensorSource::Bytes { origin: "fuzz".into(), bytes: data.to_vec() }, Precision::F32);
    let p = scratch("weights.safetensors", data);
    if let Ok(m) = MappedSafetensors::open(&p) {
        let _ = (m.non_finite_tensors(), m.num_values(), m.dtypes());
    }
}

/// A single-file checkpoint with CompVis names, split into the diffusers components of the tiny configs.
pub fn compvis(data: &[u8]) {
    let p = scratch("checkpoint.safetensors", data);
    let (unet, vae): (UNetConfig, VaeConfig) = (read_json("unet/config.json"), read_json("vae/config.json"));
    if let Ok(m) = MappedSafetensors::open(&p) {
        let _ = unsee::compvis::split_checkpoint(&m, &unet, &vae);
    }
}

/// A `config.json` as each component reads it, validated, and the model built from it when valid (parameters
/// are initialised lazily, so this allocates only the module tree), plus the scheduler built for a few step counts.
pub fn config(data: &[u8]) {
    let device = select(DeviceChoice::Cpu, Precision::F32).expect("cpu").device;
    if let Ok(c) = serde_json::from_slice::<UNetConfig>(data) {
        let _ = UNet2DConditionModel::new(&c, &device);
    }
    if let Ok(c) = serde_json::from_slice::<VaeConfig>(data) {
        let _ = AutoencoderKL::new(&c, &device);
    }
    if let Ok(c) = serde_json::from_slice::<ClipTextConfig>(data) {
        let _ = CLIPTextModel::new(&c, &device);
    }
    if let Ok(c) = serde_json::from_slice::<unsee::scheduler::SchedulerConfig>(data) {
        for kind in unsee::scheduler::SchedulerKind::ALL {
            for steps in [1, 20, 999, 1000] {
                let _ = unsee::scheduler::Scheduler::new(kind, &c, steps);
            }
        }
    }
}

/// An edit spec (TOML), parsed and validated.
pub fn spec(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(s) = unsee::erase::spec::Spec::parse(text, Path::new("/nonexistent/spec.toml"))
    {
        let _ = s.validate();
    }
}

/// An erasure file, read and checked.
pub fn erasure_file(data: &[u8]) {
    let _ = unsee::erase::file::load(&scratch("erasure.safetensors", data));
}

/// A `tokenizer.json` (with the tiny model's `tokenizer_config.json`), then a prompt tokenized.
pub fn tokenizer(data: &[u8]) {
    let p = scratch("tokenizer/tokenizer.json", b"");
    let dir = p.parent().expect("dir").to_path_buf();
    let _ = std::fs::copy(tiny().join("tokenizer/tokenizer_config.json"), dir.join("tokenizer_config.json"));
    std::fs::write(&p, data).expect("tokenizer.json");
    if let Ok(t) = unsee::tokenizer::ClipTokenizer::from_dir(&dir) {
        let _ = (t.encode("a photo of a red circle"), t.max_id(), t.vocab_size());
    }
}

/// An init-latents file as `generate --init-latents` reads it.
pub fn latents(data: &[u8]) {
    let _ = unsee::weights::read_f32_tensor(&scratch("latents.safetensors", data), "latents", 4);
}

/// A request body of `unsee serve`: parsed as an AUTOMATIC1111 txt2img request (and, when it checks, turned into
/// the engine's requests and their validation), and as a spec sent to `/v1/audit` (which may not name files).
pub fn http_body(data: &[u8]) {
    if let Ok(t) = unsee::serve::a1111::Txt2Img::parse(data) {
        for i in 0..t.count() {
            let _ = t.request(t.seed.unwrap_or(0), i).validate();
        }
        let _ = unsee::serve::a1111::infotext(&t, 0, (8, 8), "model");
    }
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(s) = unsee::erase::spec::Spec::parse_remote(text)
    {
        let _ = s.validate();
    }
}

/// A component file as a bundle's loader reads it (`unsee::quant::load_component`: streaming header and offset
/// checks, `unsee-quantized` metadata, scale/data pairing, the rule, value and scale ranges), into the tiny VAE, as
/// quantized tensors (the CPU's way) and widened at load (the GPU's).
pub fn quantized_component(data: &[u8]) {
    let cfg: VaeConfig = read_json("vae/config.json");
    let device = select(DeviceChoice::Cpu, Precision::F32).expect("cpu").device;
    let p = scratch("quantized.safetensors", data);
    for widen in [false, true] {
        let mut vae = AutoencoderKL::new(&cfg, &device).expect("tiny vae");
        let _ = unsee::quant::load_component(&mut vae, "vae", &p, Precision::F32, None, widen);
    }
}

/// A bundle's `manifest.json` (beside one file, `a.txt` = "hello"), checked as `unsee bundle verify` does.
pub fn bundle_manifest(data: &[u8]) {
    let dir = scratch("bundle/a.txt", b"hello").parent().expect("bundle dir").to_path_buf();
    let _ = std::fs::remove_file(dir.join("manifest.json.minisig"));
    std::fs::write(dir.join("manifest.json"), data).expect("manifest");
    let _ = unsee::bundle::open(&dir, &[], true);
}

/// A LoRA file read against the tiny model and merged into it (`--lora FILE`).
pub fn lora_file(data: &[u8]) {
    // Built once per thread and cloned per input (a clone shares the weights until the merge replaces them):
    // building the UNet for every input made this target ~5 inputs/s.
    thread_local! {
        static MODELS: (UNetConfig, UNet2DConditionModel, CLIPTextModel) = {
            let ucfg: UNetConfig = read_json("unet/config.json");
            let device = select(DeviceChoice::Cpu, Precision::F32).expect("cpu").device;
            let unet = UNet2DConditionModel::new(&ucfg, &device).expect("tiny unet");
            (ucfg, unet, tiny_text_encoder())
        };
    }
    let (ucfg, mut unet, mut te) = MODELS.with(|(c, u, t)| (c.clone(), u.clone(), t.clone()));
    let p = scratch("lora.safetensors", data);
    if let Ok(lora) = unsee::lora::Lora::read(&p, &unet, &ucfg, &te) {
        let _ = lora.merge(0.5, &mut unet, &mut te, Precision::F32);
    }
}

/// A PyTorch checkpoint (`--text-encoder model.pt`, `unsee convert`): the input as a `torch.save` zip archive (its
/// `data.pkl` walked by the reference check, the tensors read by burn-store's pickle reader, converted and loaded
/// into the tiny text encoder), and the input as a bare pickle stream through the reference check.
pub fn pytorch_checkpoint(data: &[u8]) {
    let p = scratch("model.pt", data);
    if let Ok(bytes) = unsee::pickle::text_encoder_safetensors(&p) {
        let _ = load_module(&mut tiny_text_encoder(), "text_encoder", TensorSource::Bytes { origin: p.clone(), bytes },
                            Precision::F32);
    }
    let _ = unsee::pickle::check_references(data, &p);
}
