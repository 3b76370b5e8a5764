//! Loading a Stable Diffusion 1.x model onto a device: configs, tokenizer, the three networks' weights (a diffusers
//! folder, an HF-cache entry or a single-file checkpoint) and an optional replacement text encoder. Sampling is in
//! [`crate::pipeline`]; this module knows nothing of it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Tensor};

use crate::clip::{CLIPTextModel, ClipTextConfig};
use crate::device::SelectedDevice;
use crate::error::{Error, Result};
use crate::model::{ModelLocation, component_weights, locate, read_config};
use crate::scheduler::SchedulerConfig;
use crate::tokenizer::{ClipTokenizer, Tokens};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::{TensorSource, check_file, load_module};

/// Options for [`StableDiffusion::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Scan every weight of a large single-file checkpoint for NaN/Inf before loading it (a diffusers folder's
    /// weights are always checked, as they are read).
    pub check: bool,
    /// Configs and tokenizer for a single-file checkpoint (default: SD-1.5's).
    pub config_dir: Option<PathBuf>,
    /// A separately shipped text encoder that replaces the model's (an erased or robust one, e.g. written by
    /// `erasepro-text`): a `text_encoder` folder (`config.json` + `model.safetensors`) or a diffusers folder that
    /// has one. Its width must match the UNet's cross-attention width.
    pub text_encoder: Option<PathBuf>,
    /// The model folder is a bundle whose manifest was already checked ([`crate::bundle::open`], with the keys the
    /// caller trusts). A bundle given without it is checked here without a signature check.
    pub bundle: Option<std::sync::Arc<crate::bundle::Verified>>,
    /// LoRA files merged into the UNet and text encoder after everything else is loaded, in order
    /// ([`crate::lora`]).
    pub loras: Vec<crate::lora::LoraSpec>,
    /// Which networks to load (default: all three). A low-memory engine ([`crate::engine::EngineOptions::low_memory`])
    /// loads none at open and one per stage of a generation. Loading only some refuses single-file checkpoints,
    /// LoRAs and replacement text encoders (they need the networks loaded together).
    pub parts: Parts,
}

/// One of the three networks of a [`StableDiffusion`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    TextEncoder,
    Unet,
    Vae,
}

/// A set of [`Part`]s ([`LoadOptions::parts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    pub text_encoder: bool,
    pub unet: bool,
    pub vae: bool,
}

impl Default for Parts {
    fn default() -> Self {
        Self::ALL
    }
}

impl Parts {
    pub const ALL: Parts = Parts { text_encoder: true, unet: true, vae: true };
    pub const NONE: Parts = Parts { text_encoder: false, unet: false, vae: false };
    pub fn only(part: Part) -> Self {
        Parts { text_encoder: part == Part::TextEncoder, unet: part == Part::Unet, vae: part == Part::Vae }
    }
}

/// One network of a [`StableDiffusion`]: loaded, or not (the model a low-memory engine keeps between the stages of a
/// generation, [`LoadOptions::parts`]). It reads as the network itself; reading one that is not loaded is a bug of
/// the caller and panics (the engine refuses, with a typed error, every operation that would).
#[derive(Clone)]
pub struct Net<M>(Option<M>);

impl<M> Net<M> {
    pub fn new(m: M) -> Self {
        Self(Some(m))
    }
    pub fn absent() -> Self {
        Self(None)
    }
    pub fn is_loaded(&self) -> bool {
        self.0.is_some()
    }
    pub fn get(&self) -> Option<&M> {
        self.0.as_ref()
    }
}

impl<M> std::ops::Deref for Net<M> {
    type Target = M;
    fn deref(&self) -> &M {
        self.0.as_ref().expect("a network read while it is not loaded (a low-memory engine's model between stages)")
    }
}

impl<M> std::ops::DerefMut for Net<M> {
    fn deref_mut(&mut self) -> &mut M {
        self.0.as_mut().expect("a network read while it is not loaded (a low-memory engine's model between stages)")
    }
}

/// Reads and loads the CLIP text encoder in `root/component` (transformers ≥ 5 writes CLIPTextModel without the
/// `text_model.` prefix that released SD folders have; both are accepted).
fn load_text_encoder(root: &Path, component: &str, device: &SelectedDevice,
                     bundle: Option<&crate::bundle::Verified>) -> Result<(CLIPTextModel, ClipTextConfig, PathBuf)> {
    let config: ClipTextConfig = read_config(root, component, "config.json")?;
    let mut model = new_text_encoder(&config, device)?;
    let file = component_weights(root, component, "model")?;
    // "text_encoder" whatever the folder is called: the loader adds the `text_model.` prefix for it.
    load_weights(&mut model, "text_encoder", &file, device, bundle)?;
    Ok((model, config, file))
}

/// A text encoder for `device`: the token-embedding table stays on the CPU when one GPU binding cannot hold it
/// ([`CLIPTextModel::new_with_table_on`]); every other parameter must fit one binding ([`check_fits`]).
fn new_text_encoder(config: &ClipTextConfig, device: &SelectedDevice) -> Result<CLIPTextModel> {
    let table_bytes = (config.vocab_size * config.hidden_size * 4) as u64;
    let table_device = device.lookup_table_device(table_bytes);
    if table_device != device.device {
        tracing::info!("token-embedding table ({:.0} MB) kept on the CPU: {} binds at most {:.0} MiB",
                       table_bytes as f64 / 1e6, device.description,
                       device.max_binding_bytes.unwrap_or(0) as f64 / 1048576.0);
    }
    CLIPTextModel::new_with_table_on(config, &device.device, &table_device)
}

/// Refuses, from the file's header and before any weight is read, a weight file with a tensor larger than one
/// binding of `device` in the precision it will be stored in (the token-embedding table excepted: it stays on the
/// CPU, [`new_text_encoder`]).
fn check_fits(file: &Path, component: &str, device: &SelectedDevice) -> Result<()> {
    if device.max_binding_bytes.is_none() {
        return Ok(());
    }
    let mapped = crate::weights::MappedSafetensors::open(file)?;
    let bytes_per_value = match device.precision {
        crate::weights::Precision::F32 => 4,
        crate::weights::Precision::F16 => 2,
    };
    for (name, view) in mapped.tensors().tensors() {
        if !name.ends_with("embeddings.token_embedding.weight") {
            // Quantized values stay one byte each on the device (burn's QFloat).
            let per_value = match view.dtype() {
                safetensors::Dtype::I8 | safetensors::Dtype::U8 => 1,
                _ => bytes_per_value,
            };
            device.check_fits(component, &name, view.shape().iter().product::<usize>() as u64 * per_value)?;
        }
    }
    Ok(())
}

/// Loads one component's weight file through [`crate::quant::load_component`]: read once, front to back, and handed
/// to the module 128 MiB at a time (plain f32/f16/bf16 files, `unsee-quantized` files and bundle components alike;
/// every value is checked finite; a bundle's file is hashed against its manifest). Not memory-mapped: the pages of a
/// mapped file count in the process's resident set while the tensors are copied out of it, which held a
/// full-size UNet twice at load.
fn load_weights<M: burn::store::ModuleSnapshot>(module: &mut M, component: &str, file: &Path,
                                                device: &SelectedDevice,
                                                bundle: Option<&crate::bundle::Verified>) -> Result<()> {
    check_fits(file, component, device)?;
    let expected = bundle.map(|b| b.expected(file)).transpose()?;
    // GPUs get a bundle's quantized weights widened at load (see `quant::quantized_pack`).
    let loaded = crate::quant::load_component(module, component, file, device.precision, expected.as_ref(),
                                              device.is_gpu)?;
    if let Some(q) = loaded.quant.filter(|q| device.is_gpu && *q != crate::quant::Quant::F16) {
        tracing::info!("{component}: {} weights widened to {:?} at load on the GPU (burn's GPU quantized tensors \
                        cannot hold the bundle's block layout)", q.name(), device.precision);
    }
    Ok(())
}

/// Checks that a text encoder fits the UNet and the tokenizer: its width is the UNet's cross-attention width, every
/// token id is inside its embedding table, and a tokenized prompt fits its position table.
fn check_text_encoder(path: &Path, config: &ClipTextConfig, unet: &UNetConfig, tokenizer: &ClipTokenizer)
    -> Result<()> {
    config.validate().map_err(|m| Error::invalid_model(path, m))?;
    if config.hidden_size != unet.cross_attention_dim {
        return Err(Error::invalid_model(path, format!(
            "this text encoder's width is {} but the UNet's cross-attention expects {}",
            config.hidden_size, unet.cross_attention_dim
        )));
    }
    if tokenizer.vocab_size() > config.vocab_size || tokenizer.max_id() as usize >= config.vocab_size {
        return Err(Error::invalid_model(path, format!(
            "the tokenizer has {} tokens with ids up to {}, but the text encoder's vocab_size is {}",
            tokenizer.vocab_size(), tokenizer.max_id(), config.vocab_size
        )));
    }
    if tokenizer.max_length > config.max_position_embeddings {
        return Err(Error::invalid_model(path, format!(
            "the tokenizer makes {} tokens but the text encoder has {} positions",
            tokenizer.max_length, config.max_position_embeddings
        )));
    }
    Ok(())
}

/// Loads only the UNet of a diffusers folder or bundle (benchmarks, tools).
pub fn load_unet(path: &Path, device: &SelectedDevice) -> Result<(UNet2DConditionModel, UNetConfig)> {
    let (dir, bundle) = folder_alone(path)?;
    let cfg: UNetConfig = read_config(&dir, "unet", "config.json")?;
    let mut unet = UNet2DConditionModel::new(&cfg, &device.device)?;
    let file = component_weights(&dir, "unet", "diffusion_pytorch_model")?;
    load_weights(&mut unet, "unet", &file, device, bundle.as_ref())?;
    Ok((unet, cfg))
}

/// Loads only the VAE of a diffusers folder or bundle (benchmarks, tools).
pub fn load_vae(path: &Path, device: &SelectedDevice) -> Result<(AutoencoderKL, VaeConfig)> {
    let (dir, bundle) = folder_alone(path)?;
    let cfg: VaeConfig = read_config(&dir, "vae", "config.json")?;
    let mut vae = new_vae(&cfg, &device.device, bundle.as_ref())?;
    let file = component_weights(&dir, "vae", "diffusion_pytorch_model")?;
    load_weights(&mut vae, "vae", &file, device, bundle.as_ref())?;
    Ok((vae, cfg))
}

/// The VAE module a model's weights go into: decoder-only when the bundle's manifest says its VAE is (a file that
/// disagrees with its manifest is then refused by name: missing or unexpected tensors).
pub(crate) fn new_vae(cfg: &VaeConfig, dev: &burn::tensor::Device, bundle: Option<&crate::bundle::Verified>)
    -> Result<AutoencoderKL> {
    if bundle.is_some_and(|b| b.manifest.components.get("vae").is_some_and(|c| c.decoder_only)) {
        AutoencoderKL::decoder_only(cfg, dev)
    } else {
        AutoencoderKL::new(cfg, dev)
    }
}

/// A diffusers folder (and its bundle manifest, checked without a signature, when it is one) for loading one
/// component alone.
fn folder_alone(path: &Path) -> Result<(PathBuf, Option<crate::bundle::Verified>)> {
    let ModelLocation::Folder(dir) = locate(path, None)? else {
        return Err(Error::InvalidRequest("loading one component needs a diffusers folder".into()));
    };
    let bundle = if crate::bundle::is_bundle(&dir) { Some(crate::bundle::open(&dir, &[], false)?) } else { None };
    Ok((dir, bundle))
}

/// The error for a stage run on a model without its network (a low-memory engine's model between stages).
pub(crate) fn not_loaded(what: &str) -> Error {
    Error::Internal(format!("{what} is not loaded (a low-memory engine loads each network for its stage only)"))
}

/// A loaded model on one device. Cloning is cheap: tensors are shared until one side is edited.
#[derive(Clone)]
pub struct StableDiffusion {
    pub location: ModelLocation,
    pub device: SelectedDevice,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: Net<CLIPTextModel>,
    pub unet: Net<UNet2DConditionModel>,
    pub vae: Net<AutoencoderKL>,
    pub text_config: ClipTextConfig,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// The weight files each component was loaded from.
    pub files: Vec<(String, PathBuf)>,
    /// The identity erasure files check ([`crate::erase::matrices::text_encoder_hash`]) when it is not the
    /// encoder's own hash: a bundle's quantized encoder carries the hash of the encoder it was quantized from.
    pub text_encoder_identity: Option<String>,
    /// The bundle the model was loaded from, with its checked manifest.
    pub bundle: Option<std::sync::Arc<crate::bundle::Verified>>,
    /// LoRAs merged into the weights, in order.
    pub loras: Vec<crate::lora::AppliedLora>,
    pub load_time: Duration,
}

impl StableDiffusion {
    pub fn load(path: &Path, device: SelectedDevice, opts: &LoadOptions) -> Result<Self> {
        let t0 = Instant::now();
        let location = locate(path, opts.config_dir.as_deref())?;
        let root = match &location {
            ModelLocation::Folder(d) => d.clone(),
            ModelLocation::SingleFile { config_dir, .. } => config_dir.clone(),
        };
        let bundle = match (&opts.bundle, &location) {
            (Some(b), _) => Some(b.clone()),
            (None, ModelLocation::Folder(d)) if crate::bundle::is_bundle(d) => {
                Some(std::sync::Arc::new(crate::bundle::open(d, &[], false)?))
            }
            _ => None,
        };
        if let Some(b) = &bundle {
            // The small files (configs, tokenizer, erasure records) are hashed here, just before they are read;
            // the weight files as they are read.
            for r in b.manifest.resources.iter().filter(|r| !r.name.ends_with(".safetensors") || r.name.starts_with("erasures/")) {
                b.check_file(&r.name)?;
            }
        }
        let mut text_config: ClipTextConfig = read_config(&root, "text_encoder", "config.json")?;
        let unet_config: UNetConfig = read_config(&root, "unet", "config.json")?;
        let vae_config: VaeConfig = read_config(&root, "vae", "config.json")?;
        let scheduler_config: SchedulerConfig = read_config(&root, "scheduler", "scheduler_config.json")?;
        scheduler_config.validate()?;
        if unet_config.in_channels != vae_config.latent_channels || unet_config.out_channels != vae_config.latent_channels {
            return Err(Error::invalid_model(&root, format!(
                "the UNet takes {} and gives {} latent channels but the VAE's latent_channels is {}",
                unet_config.in_channels, unet_config.out_channels, vae_config.latent_channels
            )));
        }
        let tok_dir = root.join("tokenizer");
        let tokenizer = if tok_dir.is_dir() {
            ClipTokenizer::from_dir(&tok_dir)?
        } else {
            let fallback = crate::model::default_model_dir().join("tokenizer");
            tracing::warn!("{} has no tokenizer/ folder: using CLIP's tokenizer from {}", root.display(),
                           fallback.display());
            ClipTokenizer::from_dir(&fallback)?
        };
        check_text_encoder(&root, &text_config, &unet_config, &tokenizer)?;

        let dev = &device.device;
        let precision = device.precision;
        let parts = opts.parts;
        if parts != Parts::ALL {
            let refuse = |what: &str| Err(Error::InvalidRequest(format!(
                "{what} need the three networks loaded together: open the model without low-memory mode")));
            if matches!(location, ModelLocation::SingleFile { .. }) {
                return refuse("single-file checkpoints (one file holds all three networks)");
            }
            if opts.text_encoder.is_some() {
                return refuse("replacement text encoders (bake it into a bundle: `unsee bundle build --text-encoder`)");
            }
            if !opts.loras.is_empty() {
                return refuse("LoRAs (merge them into a bundle: `unsee bundle build --lora`)");
            }
        }
        let mut text_encoder = Net::absent();
        let mut unet = Net::absent();
        let mut vae = Net::absent();
        let mut files = vec![];
        match &location {
            ModelLocation::Folder(dir) => {
                if parts.text_encoder {
                    let (model, config, file) = load_text_encoder(dir, "text_encoder", &device, bundle.as_deref())?;
                    (text_encoder, text_config) = (Net::new(model), config);
                    files.push(("text_encoder".to_string(), file));
                } else {
                    files.push(("text_encoder".to_string(), component_weights(dir, "text_encoder", "model")?));
                }
                for component in ["unet", "vae"] {
                    let file = component_weights(dir, component, "diffusion_pytorch_model")?;
                    match component {
                        "unet" if parts.unet => {
                            let mut m = UNet2DConditionModel::new(&unet_config, dev)?;
                            load_weights(&mut m, component, &file, &device, bundle.as_deref())?;
                            unet = Net::new(m);
                        }
                        "vae" if parts.vae => {
                            let mut m = new_vae(&vae_config, dev, bundle.as_deref())?;
                            load_weights(&mut m, component, &file, &device, bundle.as_deref())?;
                            vae = Net::new(m);
                        }
                        _ => {}
                    }
                    files.push((component.to_string(), file));
                }
            }
            ModelLocation::SingleFile { file, .. } => {
                let mut te = new_text_encoder(&text_config, &device)?;
                let mut u = UNet2DConditionModel::new(&unet_config, dev)?;
                let mut v = AutoencoderKL::new(&vae_config, dev)?;
                check_fits(file, "checkpoint", &device)?;
                let mapped = check_file(file, "checkpoint", opts.check)?;
                let parts = crate::compvis::split_checkpoint(&mapped, &unet_config, &vae_config)?;
                load_module(&mut te, "text_encoder",
                            TensorSource::Bytes { origin: file.clone(), bytes: parts.text_encoder }, precision)?;
                load_module(&mut u, "unet", TensorSource::Bytes { origin: file.clone(), bytes: parts.unet },
                            precision)?;
                load_module(&mut v, "vae", TensorSource::Bytes { origin: file.clone(), bytes: parts.vae },
                            precision)?;
                (text_encoder, unet, vae) = (Net::new(te), Net::new(u), Net::new(v));
                files.push(("checkpoint".into(), file.clone()));
            }
        }
        if let Some(te) = &opts.text_encoder {
            if !te.exists() {
                return Err(Error::ModelNotFound(te.clone()));
            }
            // A hardened encoder's delta file (`unsee harden --delta`): applied to the model's own encoder.
            if crate::erase::harden::is_delta(te) {
                crate::erase::harden::apply_delta_file(&mut text_encoder, te)?;
                files.retain(|(c, _)| c != "text_encoder");
                files.push(("text_encoder".into(), te.clone()));
            } else
            // A PyTorch checkpoint (AdvUnlearn's encoders are published only as pickles): read without executing
            // it, with the config beside it or, for a bare `.pt`, the model's own text-encoder config.
            if let Some(ckpt) = crate::pickle::text_encoder_checkpoint(te) {
                let config_root = if te.is_dir() && te.join("config.json").is_file() {
                    te.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
                } else {
                    root.clone()
                };
                let component = if te.is_dir() && te.join("config.json").is_file() {
                    te.file_name().and_then(|n| n.to_str()).unwrap_or("text_encoder").to_string()
                } else {
                    "text_encoder".to_string()
                };
                let config: ClipTextConfig = read_config(&config_root, &component, "config.json")?;
                check_text_encoder(te, &config, &unet_config, &tokenizer)?;
                let mut model = new_text_encoder(&config, &device)?;
                let bytes = crate::pickle::text_encoder_safetensors(&ckpt)?;
                load_module(&mut model, "text_encoder", TensorSource::Bytes { origin: ckpt.clone(), bytes }, precision)?;
                (text_encoder, text_config) = (Net::new(model), config);
                files.retain(|(c, _)| c != "text_encoder");
                files.push(("text_encoder".into(), ckpt));
            } else {
            // A `text_encoder` folder itself, or a model folder that has one.
            let (te_root, component) = if te.join("config.json").is_file() {
                let name = te.file_name().and_then(|n| n.to_str()).unwrap_or("text_encoder").to_string();
                (te.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")), name)
            } else {
                (te.clone(), "text_encoder".to_string())
            };
            let (model, config, file) = load_text_encoder(&te_root, &component, &device, None)?;
            check_text_encoder(te, &config, &unet_config, &tokenizer)?;
            (text_encoder, text_config) = (Net::new(model), config);
            files.retain(|(c, _)| c != "text_encoder");
            files.push(("text_encoder".into(), file));
            }
        }
        let mut loras = vec![];
        let mut te_adapted = false;
        for spec in &opts.loras {
            let lora = crate::lora::Lora::read(&spec.path, &unet, &unet_config, &text_encoder)?;
            te_adapted |= lora.touches_text_encoder();
            let applied = lora.merge(spec.scale, &mut unet, &mut text_encoder, precision)?;
            tracing::info!("merged LoRA {} (scale {}, {:?})", spec.path.display(), spec.scale, applied.layers);
            loras.push(applied);
        }
        Ok(Self {
            location,
            device,
            tokenizer,
            text_encoder,
            unet,
            vae,
            text_config,
            unet_config,
            vae_config,
            scheduler_config,
            files,
            text_encoder_identity: match (&bundle, &opts.text_encoder, te_adapted) {
                (Some(b), None, false) => b.manifest.text_encoder.get("hash").cloned(),
                _ => None,
            },
            bundle,
            loras,
            load_time: t0.elapsed(),
        })
    }

    pub fn dev(&self) -> &Device {
        &self.device.device
    }

    /// `last_hidden_state` of one prompt, `[1, 77, hidden]`, plus the tokens.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor<3>, Tokens)> {
        let te = self.text_encoder.get().ok_or_else(|| not_loaded("the text encoder"))?;
        let tokens = self.tokenizer.encode_prompt(prompt)?;
        Ok((te.forward(crate::tensor::token_ids(&tokens.ids, self.dev())), tokens))
    }
}
