//! The commands of the `unsee` CLI, one file each. They parse and check their arguments, open an
//! [`Engine`](unsee::engine::Engine) through [`ModelArgs::open`], call it, and print or write the result.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::error::{Error, Result};
use unsee::weights::Precision;

mod attack;
mod audit;
mod bundle;
mod convert;
mod encode;
mod erase;
mod generate;
mod harden;
mod grid;
mod info;
#[cfg(feature = "serve")]
mod serve;

#[derive(Parser)]
#[command(name = "unsee", version, about = "Stable Diffusion 1.x on burn, with on-device concept erasure")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate(generate::Args),
    /// Write the text encoder's last_hidden_state for one or more prompts.
    Encode(encode::Args),
    /// Describe a model and the devices available.
    Info(info::Args),
    /// Erase concepts in closed form and write the edit as an erasure file.
    Erase(erase::Args),
    /// Generate a grid of images: one column per prompt (× seed), one row for the model as loaded and, with
    /// --spec, a second row for the same prompts and seeds after erasing the spec's concepts.
    Grid(grid::Args),
    /// Measure leakage of erased concepts and drift of preserved prompts on held-out templates.
    Audit(audit::Args),
    /// Attack an erasure: optimised typed prompts (UnlearnDiffAtk), textual inversion or adversarial conditioning;
    /// judged by the oracle on the shapes world.
    Attack(attack::Args),
    /// Write a PyTorch text-encoder checkpoint (AdvUnlearn's) as a safetensors `text_encoder` folder, without
    /// executing any pickle code.
    Convert(convert::Args),
    /// Train a robust erased text encoder on the device (AdvUnlearn) and write it as a `text_encoder` folder.
    Harden(harden::Args),
    /// Write a minisign key pair for signing bundles (NAME.key, owner-only, and NAME.pub).
    Keygen(bundle::KeygenArgs),
    /// Quantized, signed model bundles: build, verify, info.
    #[command(subcommand)]
    Bundle(bundle::BundleCommand),
    /// Serve a local web page and an AUTOMATIC1111-compatible HTTP API (`/sdapi/v1/txt2img`) on one engine.
    #[cfg(feature = "serve")]
    Serve(serve::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate(a) => generate::run(a),
        Command::Encode(a) => encode::run(a),
        Command::Info(a) => info::run(a),
        Command::Erase(a) => erase::run(a),
        Command::Grid(a) => grid::run(a),
        Command::Audit(a) => audit::run(a),
        Command::Attack(a) => attack::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Harden(a) => harden::run(a),
        Command::Keygen(a) => bundle::keygen(a),
        Command::Bundle(c) => bundle::run(c),
        #[cfg(feature = "serve")]
        Command::Serve(a) => serve::run(a),
    }
}

/// The model options every command shares.
#[derive(clap::Args, Clone)]
pub struct ModelArgs {
    /// A diffusers folder, an HF-cache `models--org--name` folder, or a single-file `.safetensors` checkpoint.
    /// Default: `$UNSEE_MODEL`, else the embedded shapes model (`models/shapes-sd`).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder with the configs and tokenizer for a single-file checkpoint (default: SD-1.5's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// auto (hardware GPU if any, else CPU), cpu (burn flex) or gpu (wgpu: Vulkan/Metal/DX12).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// f32 or f16 (f16 needs a device with f16 arithmetic).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Scan every weight of a single-file checkpoint for NaN/Inf before loading (a diffusers folder is always
    /// checked as it is read; a small checkpoint always).
    #[arg(long)]
    check: bool,
    /// Replace the model's text encoder with this one (a `text_encoder` folder, e.g. written by `erasepro-text`
    /// with --bake, or a model folder that has one).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// Apply an erasure file at load (repeatable, applied in order).
    #[arg(long = "erasure")]
    erasures: Vec<PathBuf>,
    /// Merge a LoRA into the weights at load: FILE or FILE:SCALE (kohya or diffusers/PEFT safetensors; repeatable,
    /// merged in order before any erasure). With an LCM-LoRA, `--scheduler lcm --steps 4 --guidance 1.5`.
    #[arg(long = "lora", value_name = "FILE[:SCALE]")]
    loras: Vec<unsee::lora::LoraSpec>,
    /// Guarded mode: load only a bundle signed by this minisign public key (`.pub` file; repeatable), refuse
    /// --text-encoder, --erasure, raw conditioning and init latents.
    #[arg(long = "trust")]
    trust: Vec<PathBuf>,
    /// Guarded mode: the bundle must erase this concept (repeatable; needs --trust).
    #[arg(long = "require-concept")]
    require_concepts: Vec<String>,
    /// Sequential residency: load each network only for its stage of a generation (text encoder, then UNet, then
    /// VAE), so at most one is in memory; weights are read again at every generation. Generation only; refuses
    /// single-file checkpoints, --lora and --text-encoder.
    #[arg(long)]
    low_memory: bool,
}

impl ModelArgs {
    /// The same model with no erasures and its own text encoder.
    pub fn base(&self) -> Self {
        Self { erasures: vec![], text_encoder: None, ..self.clone() }
    }

    /// The model path (`--model`, `$UNSEE_MODEL` or the embedded default).
    pub fn model_dir(&self) -> PathBuf {
        self.model.clone().unwrap_or_else(unsee::model::default_model_dir)
    }

    pub fn set_text_encoder(&mut self, path: PathBuf) {
        self.text_encoder = Some(path);
    }

    pub fn open(&self) -> Result<Engine> {
        if self.trust.is_empty() && !self.require_concepts.is_empty() {
            return Err(Error::InvalidRequest("--require-concept needs --trust KEY.pub (guarded mode)".into()));
        }
        let guard = if self.trust.is_empty() {
            None
        } else {
            Some(unsee::engine::Guard { trusted_keys: bundle::read_keys(&self.trust)?,
                                        required_concepts: self.require_concepts.clone() })
        };
        Engine::open(&EngineOptions {
            guard,
            model: self.model_dir(),
            config_dir: self.config.clone(),
            text_encoder: self.text_encoder.clone(),
            erasures: self.erasures.clone(),
            loras: self.loras.clone(),
            device: self.device,
            precision: self.precision,
            check: self.check,
            low_memory: self.low_memory,
        })
    }
}

/// Writes an RGBA8 image as PNG, atomically.
pub fn save_png(img: &image::RgbaImage, out: &Path) -> Result<()> {
    let png = unsee::pipeline::encode_png(img.width() as usize, img.height() as usize, img.as_raw())?;
    unsee::weights::write_atomic(out, &png)
}

/// An RGBA8 image from a generation's pixels.
pub fn rgba_image(width: usize, height: usize, rgba: Vec<u8>) -> Result<image::RgbaImage> {
    image::RgbaImage::from_raw(width as u32, height as u32, rgba).ok_or_else(|| Error::Internal("image buffer size".into()))
}

/// A progress bar for work in named stages (`stage`, `done`, `total`), hidden with `--json`.
pub fn stage_bar(hidden: bool) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(1);
    if let Ok(style) = indicatif::ProgressStyle::with_template("{spinner} {msg} {pos}/{len} [{bar:30}] ETA {eta}") {
        bar.set_style(style.progress_chars("=> "));
    }
    if hidden {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar
}

/// Shows `stage`, `done` of `total` on a [`stage_bar`].
pub fn show_stage(bar: &indicatif::ProgressBar, stage: &str, done: usize, total: usize) {
    bar.set_message(stage.to_string());
    bar.set_length(total as u64);
    bar.set_position(done as u64);
}

/// Pretty JSON on stdout.
pub fn print_json(v: &impl serde::Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(v).map_err(|e| Error::Internal(e.to_string()))?);
    Ok(())
}
