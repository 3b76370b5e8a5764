//! The text-to-image pipeline (`StableDiffusionPipeline`): tokenize, encode, denoise with classifier-free
//! guidance, decode. One entry point, [`StableDiffusion::generate`]: a request plus optional [`Inputs`] (init
//! latents, per-step noise, conditioning), a step callback and an output [`Target`].

use std::borrow::Cow;
use std::time::{Duration, Instant};

use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::load::{Part, StableDiffusion, not_loaded};
use crate::scheduler::{Scheduler, SchedulerKind};

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

/// The largest classifier-free guidance scale accepted (AUTOMATIC1111's UI stops at 30).
pub const MAX_GUIDANCE: f64 = 100.0;
/// The largest magnitude of an init-latent value (they are unit-variance noise).
pub const MAX_INIT_LATENT: f32 = 1e4;

/// [`Error::NonFiniteOutput`] unless every value of `v` is finite.
fn finite(v: &[f32], stage: &str) -> Result<()> {
    if v.iter().all(|x| x.is_finite()) { Ok(()) } else { Err(Error::NonFiniteOutput(stage.into())) }
}

impl GenerateRequest {
    /// The checks that need no model (front ends run them before loading one); [`StableDiffusion::generate`]
    /// also checks the size against the model.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        if !self.guidance.is_finite() || !(0.0..=MAX_GUIDANCE).contains(&self.guidance) {
            return Err(Error::InvalidRequest(format!(
                "guidance must be a number between 0 and {MAX_GUIDANCE} (got {})", self.guidance
            )));
        }
        for (name, v) in [("width", self.width), ("height", self.height)] {
            if let Some(v) = v
                && (v == 0 || v % 8 != 0)
            {
                return Err(Error::InvalidRequest(format!("{name} must be a positive multiple of 8 (got {v})")));
            }
        }
        Ok(())
    }
}

/// Optional inputs that replace what the pipeline would otherwise derive from the request.
#[derive(Default)]
pub struct Inputs<'a> {
    /// Unit-variance starting latents `[1, 4, h, w]` in place of the seeded noise; the run is then fully
    /// determined by them (ancestral samplers still draw their per-step noise from the seed).
    pub init_latents: Option<Tensor<4>>,
    /// The per-step noise of ancestral samplers, by step index (the parity tests feed diffusers' noise).
    pub noise: Option<&'a mut dyn FnMut(usize) -> Tensor<4>>,
    /// Conditioning `[1, 77, hidden]` in place of the encoded prompt (embedding-space attacks,
    /// [`crate::erase::attack`]); the negative prompt is still encoded.
    pub context: Option<Tensor<3>>,
    /// Asked between the UNet's blocks: once it says yes the call ends with [`Error::Cancelled`] without finishing
    /// the step (the step callback can only cancel between steps).
    pub cancelled: Option<&'a dyn Fn() -> bool>,
    /// Run even above the work budget ([`crate::limits::MAX_LATENT_PIXEL_STEPS`]).
    pub over_budget: bool,
}

/// Where the result goes.
pub enum Target<'a> {
    /// A new RGBA8 buffer in [`Generated::rgba`].
    Rgba,
    /// The caller's buffer of exactly width × height × 4 bytes (see [`StableDiffusion::image_size`]), checked
    /// before any work is done: the zero-copy path for an Android `Bitmap` or a direct `ByteBuffer`.
    /// [`Generated::rgba`] stays empty.
    Buffer(&'a mut [u8]),
    /// No decode: only [`Generated::latents`].
    Latents,
}

/// Timings of one generation.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Timings {
    /// Loading networks for their stage (a low-memory engine; 0 otherwise).
    pub load_s: f64,
    pub encode_s: f64,
    pub steps_s: Vec<f64>,
    pub decode_s: f64,
}

pub struct Generated {
    pub width: usize,
    pub height: usize,
    /// RGBA8, row-major (empty unless the target was [`Target::Rgba`]).
    pub rgba: Vec<u8>,
    /// The final (unscaled-by-VAE) latents, `[1, 4, h/8, w/8]`.
    pub latents: Tensor<4>,
    pub timings: Timings,
}

/// RGBA8 pixels (`width × height × 4` bytes, row-major) encoded as PNG: what the CLI writes and the server sends.
pub fn encode_png(width: usize, height: usize, rgba: &[u8]) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    if rgba.len() != width * height * 4 {
        return Err(Error::Internal(format!("image buffer of {} bytes for {width}×{height}", rgba.len())));
    }
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(rgba, width as u32, height as u32, image::ExtendedColorType::Rgba8)
        .map_err(|e| Error::Internal(format!("PNG: {e}")))?;
    Ok(out)
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
    fn float(&self, t: Tensor<4>) -> Tensor<4> {
        t.cast(self.device.precision.dtype())
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

    /// The pixel size a request produces, validated (`(width, height)`).
    pub fn image_size(&self, req: &GenerateRequest) -> Result<(usize, usize)> {
        let (lh, lw) = self.latent_size(req)?;
        let f = self.vae_config.scale_factor();
        Ok((lw * f, lh * f))
    }

    /// Standard-normal noise from a seeded ChaCha8 stream: the same on every platform.
    pub fn seeded_noise(&self, rng: &mut rand_chacha::ChaCha8Rng, shape: [usize; 4]) -> Tensor<4> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        self.float(Tensor::<4>::from_data(TensorData::new(v, shape), self.dev()))
    }

    /// Runs the pipeline: validates the request and the inputs, denoises (calling `on_step` after every step; a
    /// [`Control::Cancel`] ends the call with [`Error::Cancelled`]) and decodes into `target`.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        inputs: Inputs,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
        target: Target,
    ) -> Result<Generated> {
        self.generate_staged(req, inputs, on_step, target, &|_| Ok(Cow::Borrowed(self)))
    }

    /// [`Self::generate`] with the model of each stage — encoding ([`Part::TextEncoder`]), denoising
    /// ([`Part::Unet`]), decoding ([`Part::Vae`]) — given by `stage`, and dropped when the stage ends: a low-memory
    /// engine loads each network for its stage only. `self` gives the configs, tokenizer and device.
    pub fn generate_staged<'s>(
        &'s self,
        req: &GenerateRequest,
        inputs: Inputs,
        on_step: &mut dyn FnMut(StepEvent) -> Control,
        target: Target,
        stage: &dyn Fn(Part) -> Result<Cow<'s, StableDiffusion>>,
    ) -> Result<Generated> {
        req.validate()?;
        let (lh, lw) = self.latent_size(req)?;
        let (width, height) = self.image_size(req)?;
        let work = (lh * lw).saturating_mul(req.steps);
        if work > crate::limits::MAX_LATENT_PIXEL_STEPS && !inputs.over_budget {
            return Err(Error::InvalidRequest(format!(
                "{width}×{height} at {} steps is {work} latent pixel-steps, above the budget of {} (e.g. 512×512 at \
                 1,024 steps); use fewer pixels or steps, or force it", req.steps, crate::limits::MAX_LATENT_PIXEL_STEPS
            )));
        }
        if let Target::Buffer(out) = &target
            && out.len() != width * height * 4
        {
            return Err(Error::InvalidRequest(format!(
                "the output buffer has {} bytes; a {width}×{height} RGBA8 image needs {}", out.len(), width * height * 4
            )));
        }
        let Inputs { init_latents, mut noise, context: given_context, cancelled, .. } = inputs;
        let never = || false;
        let cancelled: &dyn Fn() -> bool = cancelled.unwrap_or(&never);
        if let Some(c) = &given_context {
            let [b, s, d] = c.dims();
            if b != 1 || s != self.tokenizer.max_length || d != self.text_config.hidden_size {
                return Err(Error::InvalidRequest(format!(
                    "a context of shape [{b}, {s}, {d}] given; this model takes [1, {}, {}]",
                    self.tokenizer.max_length, self.text_config.hidden_size
                )));
            }
        }
        let mut scheduler = Scheduler::new(req.scheduler, &self.scheduler_config, req.steps)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(req.seed);
        let shape = [1, self.unet_config.in_channels, lh, lw];
        let latents = match init_latents {
            Some(l) => {
                if l.dims() != shape {
                    return Err(Error::InvalidRequest(format!(
                        "init latents have shape {:?}, expected {:?} for {width}×{height}", l.dims(), shape
                    )));
                }
                if crate::tensor::to_f32_vec(l.clone())?.iter().any(|x| !(x.abs() <= MAX_INIT_LATENT)) {
                    return Err(Error::InvalidRequest(format!(
                        "init latents must be finite values of magnitude ≤ {MAX_INIT_LATENT} (unit-variance noise)"
                    )));
                }
                self.float(l)
            }
            None => self.seeded_noise(&mut rng, shape),
        };
        let mut timings = Timings::default();

        // Loads a stage's model, timed apart from the stage's work.
        let load_s = std::cell::Cell::new(0.0);
        let load = |part: Part| -> Result<Cow<'s, StableDiffusion>> {
            let t = Instant::now();
            let sd = stage(part)?;
            load_s.set(load_s.get() + t.elapsed().as_secs_f64());
            Ok(sd)
        };
        let cfg = req.guidance > 1.0;
        let context = match (given_context, cfg) {
            (Some(c), false) => c.cast(self.device.precision.dtype()),
            (given_context, _) => {
                let sd = load(Part::TextEncoder)?;
                let t = Instant::now();
                let cond = match given_context {
                    Some(c) => c.cast(self.device.precision.dtype()),
                    None => sd.encode_prompt(&req.prompt)?.0,
                };
                let context = if cfg {
                    let (uncond, _) = sd.encode_prompt(&req.negative_prompt)?;
                    Tensor::cat(vec![uncond, cond], 0)
                } else {
                    cond
                };
                timings.encode_s = t.elapsed().as_secs_f64();
                context
            }
        };
        let sd = load(Part::Unet)?;
        let unet = sd.unet.get().ok_or_else(|| not_loaded("the UNet"))?;

        let mut x = latents * scheduler.init_noise_sigma as f32;
        let total = scheduler.timesteps.len();
        for i in 0..total {
            let ts = Instant::now();
            let t = scheduler.timesteps[i];
            let input = scheduler.scale_model_input(x.clone(), i);
            let input = if cfg { Tensor::cat(vec![input.clone(), input], 0) } else { input };
            let eps = unet.forward_until(input, t, &context, cancelled).ok_or(Error::Cancelled)?;
            let eps = if cfg {
                let mut parts = eps.chunk(2, 0);
                let text = parts.pop().unwrap();
                let uncond = parts.pop().unwrap();
                uncond.clone() + (text - uncond) * req.guidance as f32
            } else {
                eps
            };
            let step_noise = if scheduler.needs_noise(i) {
                Some(match noise.as_mut() {
                    Some(f) => self.float(f(i)),
                    None => self.seeded_noise(&mut rng, shape),
                })
            } else {
                None
            };
            x = scheduler.step(eps, i, x, step_noise);
            // Wait for the device so per-step timings and progress are real.
            let _ = self.dev().sync();
            let elapsed = ts.elapsed();
            timings.steps_s.push(elapsed.as_secs_f64());
            if let Control::Cancel = on_step(StepEvent { step: i + 1, total, elapsed }) {
                return Err(Error::Cancelled);
            }
        }

        drop(sd);
        finite(&crate::tensor::to_f32_vec(x.clone())?, "denoising loop")?;
        let rgba = match target {
            Target::Latents => vec![],
            target => {
                let sd = load(Part::Vae)?;
                let t = Instant::now();
                let rgba = match target {
                    Target::Buffer(out) => {
                        sd.decode_rgba_into(x.clone(), out)?;
                        vec![]
                    }
                    _ => {
                        let mut rgba = vec![0u8; width * height * 4];
                        sd.decode_rgba_into(x.clone(), &mut rgba)?;
                        rgba
                    }
                };
                timings.decode_s = t.elapsed().as_secs_f64();
                rgba
            }
        };
        timings.load_s = load_s.get();
        Ok(Generated { width, height, rgba, latents: x, timings })
    }

    /// VAE decode of denoised latents to RGBA8 (diffusers' `(x / 2 + 0.5).clamp(0, 1)`, rounded) into a buffer of
    /// exactly h × w × 4 bytes; returns `(h, w)`.
    pub fn decode_rgba_into(&self, latents: Tensor<4>, out: &mut [u8]) -> Result<(usize, usize)> {
        let shift = self.vae_config.shift_factor.unwrap_or(0.0) as f32;
        let z = latents / self.vae_config.scaling_factor as f32 + shift;
        let img = self.vae.get().ok_or_else(|| not_loaded("the VAE"))?.decode(z);
        let [_, _, h, w] = img.dims();
        if out.len() != h * w * 4 {
            return Err(Error::Internal(format!("decoded {w}×{h} pixels into a buffer of {} bytes", out.len())));
        }
        finite(&crate::tensor::to_f32_vec(img.clone())?, "VAE decoder")?;
        let v = crate::tensor::to_f32_vec((img / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0)?;
        for (p, px) in out.chunks_exact_mut(4).enumerate() {
            for c in 0..3 {
                px[c] = v[c * h * w + p].round() as u8;
            }
            px[3] = 255;
        }
        Ok((h, w))
    }
}
