//! The text-to-image pipeline (`StableDiffusionPipeline`): tokenize, encode, denoise with classifier-free
//! guidance, decode.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::clip::{CLIPTextModel, ClipTextConfig};
use crate::device::SelectedDevice;
use crate::error::{Error, Result};
use crate::model::{ModelLocation, component_weights, locate, read_config};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::vae::{AutoencoderKL, VaeConfig};
use crate::weights::{TensorSource, check_file, load_module, load_module_remapped};

/// Options for [`StableDiffusion::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// Scan every weight for NaN/Inf even in large files.
    pub check: bool,
    /// Configs and tokenizer for a single-file checkpoint (default: SD-1.5's).
    pub config_dir: Option<PathBuf>,
    /// A separately shipped text encoder that replaces the model's (an erased or robust one, e.g. written by
    /// `erasepro-text`): a `text_encoder` folder (`config.json` + `model.safetensors`) or a diffusers folder that
    /// has one. Its width must match the UNet's cross-attention width.
    pub text_encoder: Option<PathBuf>,
}

/// Reads and loads the CLIP text encoder in `root/component` (transformers ≥ 5 writes CLIPTextModel without the
/// `text_model.` prefix that released SD folders have; both are accepted).
fn load_text_encoder(root: &Path, component: &str, device: &SelectedDevice, check: bool)
    -> Result<(CLIPTextModel, ClipTextConfig, PathBuf)> {
    let config: ClipTextConfig = read_config(root, component, "config.json")?;
    let mut model = CLIPTextModel::new(&config, &device.device)?;
    let file = component_weights(root, component, "model")?;
    check_file(&file, component, check)?;
    load_module_remapped(&mut model, component, TensorSource::File(file.clone()), device.precision,
                         &[(r"^(embeddings|encoder|final_layer_norm)\.", "text_model.$1.")])?;
    Ok((model, config, file))
}

/// Loads only the UNet of a diffusers folder (benchmarks, tools).
pub fn load_unet(path: &Path, device: &SelectedDevice) -> Result<(UNet2DConditionModel, UNetConfig)> {
    let ModelLocation::Folder(dir) = locate(path, None)? else {
        return Err(Error::InvalidRequest("load_unet needs a diffusers folder".into()));
    };
    let cfg: UNetConfig = read_config(&dir, "unet", "config.json")?;
    let mut unet = UNet2DConditionModel::new(&cfg, &device.device)?;
    let file = component_weights(&dir, "unet", "diffusion_pytorch_model")?;
    check_file(&file, "unet", false)?;
    load_module(&mut unet, "unet", TensorSource::File(file), device.precision)?;
    Ok((unet, cfg))
}

/// A loaded model on one device. Cloning is cheap: tensors are shared until one side is edited.
#[derive(Clone)]
pub struct StableDiffusion {
    pub location: ModelLocation,
    pub device: SelectedDevice,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: CLIPTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub text_config: ClipTextConfig,
    pub unet_config: UNetConfig,
    pub vae_config: VaeConfig,
    pub scheduler_config: SchedulerConfig,
    /// The weight files each component was loaded from.
    pub files: Vec<(String, PathBuf)>,
    pub load_time: Duration,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    /// Image size in pixels; `None` = the UNet's `sample_size` × the VAE scale factor.
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: SchedulerKind,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            negative_prompt: String::new(),
            steps: 20,
            guidance: 7.5,
            seed: 0,
            width: None,
            height: None,
            scheduler: SchedulerKind::Ddim,
        }
    }
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    pub encode_s: f64,
    pub steps_s: Vec<f64>,
    pub decode_s: f64,
}

pub struct Generated {
    pub width: usize,
    pub height: usize,
    /// RGBA8, row-major.
    pub rgba: Vec<u8>,
    /// The final (unscaled-by-VAE) latents, `[1, 4, h/8, w/8]`.
    pub latents: Tensor<4>,
    pub timings: Timings,
}

/// Returned by the step callback: keep going or stop (→ [`Error::Cancelled`]).
pub enum Control {
    Continue,
    Cancel,
}

/// Progress of a generation, reported after each denoising step.
pub struct StepEvent {
    pub step: usize,
    pub total: usize,
    pub elapsed: Duration,
}

impl StableDiffusion {
    pub fn load(path: &Path, device: SelectedDevice, opts: &LoadOptions) -> Result<Self> {
        let t0 = Instant::now();
        let location = locate(path, opts.config_dir.as_deref())?;
        let root = match &location {
            ModelLocation::Folder(d) => d.clone(),
            ModelLocation::SingleFile { config_dir, .. } => config_dir.clone(),
        };
        let mut text_config: ClipTextConfig = read_config(&root, "text_encoder", "config.json")?;
        let unet_config: UNetConfig = read_config(&root, "unet", "config.json")?;
        let vae_config: VaeConfig = read_config(&root, "vae", "config.json")?;
        let scheduler_config: SchedulerConfig = read_config(&root, "scheduler", "scheduler_config.json")?;
        let tok_dir = root.join("tokenizer");
        let tokenizer = if tok_dir.is_dir() {
            ClipTokenizer::from_dir(&tok_dir)?
        } else {
            ClipTokenizer::from_dir(&crate::model::default_model_dir().join("tokenizer"))?
        };
        if tokenizer.vocab_size() > text_config.vocab_size {
            return Err(Error::invalid_model(&root, format!(
                "tokenizer has {} tokens but the text encoder's vocab_size is {}",
                tokenizer.vocab_size(),
                text_config.vocab_size
            )));
        }

        let dev = &device.device;
        let precision = device.precision;
        let mut text_encoder;
        let mut unet = UNet2DConditionModel::new(&unet_config, dev)?;
        let mut vae = AutoencoderKL::new(&vae_config, dev)?;
        let mut files = vec![];
        match &location {
            ModelLocation::Folder(dir) => {
                let file;
                (text_encoder, text_config, file) = load_text_encoder(dir, "text_encoder", &device, opts.check)?;
                files.push(("text_encoder".to_string(), file));
                for component in ["unet", "vae"] {
                    let file = component_weights(dir, component, "diffusion_pytorch_model")?;
                    check_file(&file, component, opts.check)?;
                    let src = TensorSource::File(file.clone());
                    match component {
                        "unet" => load_module(&mut unet, component, src, precision)?,
                        _ => load_module(&mut vae, component, src, precision)?,
                    }
                    files.push((component.to_string(), file));
                }
            }
            ModelLocation::SingleFile { file, .. } => {
                text_encoder = CLIPTextModel::new(&text_config, dev)?;
                let mapped = check_file(file, "checkpoint", opts.check)?;
                let parts = crate::compvis::split_checkpoint(&mapped, &unet_config, &vae_config)?;
                load_module(&mut text_encoder, "text_encoder",
                            TensorSource::Bytes { origin: file.clone(), bytes: parts.text_encoder }, precision)?;
                load_module(&mut unet, "unet", TensorSource::Bytes { origin: file.clone(), bytes: parts.unet },
                            precision)?;
                load_module(&mut vae, "vae", TensorSource::Bytes { origin: file.clone(), bytes: parts.vae },
                            precision)?;
                files.push(("checkpoint".into(), file.clone()));
            }
        }
        if let Some(te) = &opts.text_encoder {
            if !te.exists() {
                return Err(Error::ModelNotFound(te.clone()));
            }
            // A `text_encoder` folder itself, or a model folder that has one.
            let (te_root, component) = if te.join("config.json").is_file() {
                let name = te.file_name().and_then(|n| n.to_str()).unwrap_or("text_encoder").to_string();
                (te.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from(".")), name)
            } else {
                (te.clone(), "text_encoder".to_string())
            };
            let (model, config, file) = load_text_encoder(&te_root, &component, &device, opts.check)?;
            if config.hidden_size != unet_config.cross_attention_dim {
                return Err(Error::invalid_model(te, format!(
                    "this text encoder's width is {} but the UNet's cross-attention expects {}",
                    config.hidden_size, unet_config.cross_attention_dim
                )));
            }
            if tokenizer.vocab_size() > config.vocab_size {
                return Err(Error::invalid_model(te, format!(
                    "tokenizer has {} tokens but this text encoder's vocab_size is {}",
                    tokenizer.vocab_size(), config.vocab_size
                )));
            }
            (text_encoder, text_config) = (model, config);
            files.retain(|(c, _)| c != "text_encoder");
            files.push(("text_encoder".into(), file));
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
            load_time: t0.elapsed(),
        })
    }

    pub fn dev(&self) -> &Device {
        &self.device.device
    }

    fn float(&self, t: Tensor<4>) -> Tensor<4> {
        t.cast(self.device.precision.dtype())
    }

    /// `last_hidden_state` of one prompt, `[1, 77, hidden]`, plus the tokens.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor<3>, crate::tokenizer::Tokens)> {
        let tokens = self.tokenizer.encode_prompt(prompt)?;
        let ids: Vec<i64> = tokens.ids.iter().map(|&i| i as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [tokens.ids.len()]), self.dev())
            .reshape([1, tokens.ids.len()]);
        Ok((self.text_encoder.forward(ids), tokens))
    }

    /// Latent size for a request, validated.
    pub fn latent_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let f = self.vae_config.scale_factor();
        let default = self.unet_config.sample_size.unwrap_or(64) * f;
        let (w, h) = (req.width.unwrap_or(default), req.height.unwrap_or(default));
        if w == 0 || h == 0 || w % 8 != 0 || h % 8 != 0 || w % f != 0 || h % f != 0 {
            return Err(Error::InvalidRequest(format!("width and height must be positive multiples of 8 (got {w}×{h})")));
        }
        if w > 4096 || h > 4096 {
            return Err(Error::InvalidRequest(format!("{w}×{h} is larger than the 4096×4096 limit")));
        }
        Ok((h / f, w / f))
    }

    /// Standard-normal noise from a seeded ChaCha8 stream: the same on every platform.
    pub fn seeded_noise(&self, rng: &mut rand_chacha::ChaCha8Rng, shape: [usize; 4]) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        self.float(Tensor::<4>::from_data(TensorData::new(v, shape), self.dev()))
    }

    /// Runs the pipeline. `init_latents` (unit-variance noise, `[1, 4, h, w]`) replaces the seeded noise; then the
    /// run is fully determined by it (for ancestral samplers, the per-step noise still comes from `seed`).
    /// `noise_source` overrides the per-step noise of ancestral samplers (used by the parity tests).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        init_latents: Option<Tensor<4>>,
        noise_source: Option<&mut dyn FnMut(usize) -> Tensor<4>>,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<Generated> {
        let (x, mut timings) = self.denoise(req, init_latents, noise_source, on_step)?;
        let t = Instant::now();
        let (rgba, height, width) = self.decode_rgba(x.clone())?;
        timings.decode_s = t.elapsed().as_secs_f64();
        Ok(Generated { width, height, rgba, latents: x, timings })
    }

    /// The pixel size a request produces, validated (`(width, height)`).
    pub fn image_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let (lh, lw) = self.latent_size(req)?;
        let f = self.vae_config.scale_factor();
        Ok((lw * f, lh * f))
    }

    /// Like [`generate`](Self::generate) with seeded noise, but writes the RGBA8 pixels straight into `out`, which
    /// must hold exactly width × height × 4 bytes (see [`image_size`](Self::image_size)): the zero-copy path for a
    /// caller-owned buffer (an Android `Bitmap`, a direct `ByteBuffer`). `out` is checked before any work is done.
    pub fn generate_into(&self, req: &GenerateRequest, on_step: &mut dyn FnMut(StepEvent) -> Control, out: &mut [u8])
        -> Result<Timings> {
        let (w, h) = self.image_size(req)?;
        if out.len() != w * h * 4 {
            return Err(Error::InvalidRequest(format!(
                "the output buffer has {} bytes; a {w}×{h} RGBA8 image needs {}", out.len(), w * h * 4
            )));
        }
        let (x, mut timings) = self.denoise(req, None, None, on_step)?;
        let t = Instant::now();
        self.decode_rgba_into(x, out)?;
        timings.decode_s = t.elapsed().as_secs_f64();
        Ok(timings)
    }

    /// The denoising loop: returns the final latents (decode with [`decode_rgba`](Self::decode_rgba)).
    pub fn denoise(
        &self,
        req: &GenerateRequest,
        init_latents: Option<Tensor<4>>,
        noise_source: Option<&mut dyn FnMut(usize) -> Tensor<4>>,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<(Tensor<4>, Timings)> {
        self.denoise_with(req, None, init_latents, noise_source, on_step)
    }

    /// Like [`generate`](Self::generate) (seeded noise), but conditioned on `context` (`[1, 77, hidden]`) in place
    /// of the encoded `req.prompt`: for embedding-space attacks on an erased model
    /// ([`crate::erase::attack`]). The negative prompt is still encoded.
    pub fn generate_with_context(&self, req: &GenerateRequest, context: Tensor<3>) -> Result<Generated> {
        let [_, s, d] = context.dims();
        if s != self.tokenizer.max_length || d != self.text_config.hidden_size {
            return Err(Error::InvalidRequest(format!(
                "a context of shape [1, {s}, {d}] given; this model takes [1, {}, {}]",
                self.tokenizer.max_length, self.text_config.hidden_size
            )));
        }
        let context = context.cast(self.device.precision.dtype());
        let (x, mut timings) = self.denoise_with(req, Some(context), None, None, &mut |_| Control::Continue)?;
        let t = Instant::now();
        let (rgba, height, width) = self.decode_rgba(x.clone())?;
        timings.decode_s = t.elapsed().as_secs_f64();
        Ok(Generated { width, height, rgba, latents: x, timings })
    }

    fn denoise_with(
        &self,
        req: &GenerateRequest,
        given_context: Option<Tensor<3>>,
        init_latents: Option<Tensor<4>>,
        mut noise_source: Option<&mut dyn FnMut(usize) -> Tensor<4>>,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
    ) -> Result<(Tensor<4>, Timings)> {
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return Err(Error::InvalidRequest(format!("guidance must be a finite number ≥ 0 (got {})", req.guidance)));
        }
        let (lh, lw) = self.latent_size(req)?;
        let mut scheduler = Scheduler::new(req.scheduler, &self.scheduler_config, req.steps)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(req.seed);
        let channels = self.unet_config.in_channels;
        let shape = [1, channels, lh, lw];
        let latents = match init_latents {
            Some(l) => {
                if l.dims() != shape {
                    return Err(Error::InvalidRequest(format!(
                        "init latents have shape {:?}, expected {:?} for {}×{}",
                        l.dims(), shape, lw * self.vae_config.scale_factor(), lh * self.vae_config.scale_factor()
                    )));
                }
                self.float(l)
            }
            None => self.seeded_noise(&mut rng, shape),
        };
        let mut timings = Timings::default();

        let t = Instant::now();
        let cfg = req.guidance > 1.0;
        let cond = match given_context {
            Some(c) => c,
            None => self.encode_prompt(&req.prompt)?.0,
        };
        let context = if cfg {
            let (uncond, _) = self.encode_prompt(&req.negative_prompt)?;
            Tensor::cat(vec![uncond, cond], 0)
        } else {
            cond
        };
        timings.encode_s = t.elapsed().as_secs_f64();

        let mut x = latents * scheduler.init_noise_sigma as f32;
        let total = scheduler.timesteps.len();
        for i in 0..total {
            let ts = Instant::now();
            let t = scheduler.timesteps[i];
            let input = scheduler.scale_model_input(x.clone(), i);
            let input = if cfg { Tensor::cat(vec![input.clone(), input], 0) } else { input };
            let eps = self.unet.forward(input, t, &context);
            let eps = if cfg {
                let mut parts = eps.chunk(2, 0);
                let text = parts.pop().unwrap();
                let uncond = parts.pop().unwrap();
                uncond.clone() + (text - uncond) * req.guidance as f32
            } else {
                eps
            };
            let noise = if scheduler.needs_noise() {
                Some(match noise_source.as_mut() {
                    Some(f) => self.float(f(i)),
                    None => self.seeded_noise(&mut rng, shape),
                })
            } else {
                None
            };
            x = scheduler.step(eps, i, x, noise);
            // Wait for the device so per-step timings and progress are real.
            let _ = self.dev().sync();
            let elapsed = ts.elapsed();
            timings.steps_s.push(elapsed.as_secs_f64());
            if let Control::Cancel = on_step(StepEvent { step: i + 1, total, elapsed }) {
                return Err(Error::Cancelled);
            }
        }

        Ok((x, timings))
    }

    /// VAE decode of denoised latents to RGBA8 (diffusers' `(x / 2 + 0.5).clamp(0, 1)`, rounded).
    pub fn decode_rgba(&self, latents: Tensor<4>) -> Result<(Vec<u8>, usize, usize)> {
        let [_, _, lh, lw] = latents.dims();
        let f = self.vae_config.scale_factor();
        let mut rgba = vec![0u8; lh * f * lw * f * 4];
        let (h, w) = self.decode_rgba_into(latents, &mut rgba)?;
        Ok((rgba, h, w))
    }

    /// [`decode_rgba`](Self::decode_rgba) into a caller-provided buffer of exactly h × w × 4 bytes; returns `(h, w)`.
    pub fn decode_rgba_into(&self, latents: Tensor<4>, out: &mut [u8]) -> Result<(usize, usize)> {
        let shift = self.vae_config.shift_factor.unwrap_or(0.0) as f32;
        let z = latents / self.vae_config.scaling_factor as f32 + shift;
        let img = self.vae.decode(z);
        let [_, _, h, w] = img.dims();
        if out.len() != h * w * 4 {
            return Err(Error::Internal(format!("decoded {w}×{h} pixels into a buffer of {} bytes", out.len())));
        }
        let img = (img / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0;
        let data = img.cast(burn::tensor::DType::F32).into_data();
        let v: Vec<f32> = data.try_to_vec::<f32>().map_err(|e| Error::Internal(format!("reading image: {e:?}")))?;
        for (p, px) in out.chunks_exact_mut(4).enumerate() {
            for c in 0..3 {
                px[c] = v[c * h * w + p].round() as u8;
            }
            px[3] = 255;
        }
        Ok((h, w))
    }
}

/// Reads a tensor back to the host as f32.
pub fn to_vec(t: Tensor<4>) -> Vec<f32> {
    t.cast(burn::tensor::DType::F32).into_data().try_to_vec::<f32>().expect("f32 data")
}
