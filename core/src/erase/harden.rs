//! `unsee harden`: a robust erased text encoder, trained on the device — AdvUnlearn (Zhang, Chen, Jia, Zhang, Fan,
//! Liu, Liu, "Defensive Unlearning with Adversarial Training for Robust Concept Erasure in Diffusion Models",
//! NeurIPS 2024; code OPTML-Group/AdvUnlearn) in Rust, with burn's autodiff and Adam.
//!
//! The text encoder τ_θ (its encoder layers and final layer norm; the embeddings stay frozen, so the result plugs
//! into any UNet that shares the tokenizer and width) is trained against the frozen UNet ε and the frozen original
//! encoder τ₀, alternating
//!
//! - an **inner attack** (after `warmup` iterations): k = `prefix_tokens` continuous token embeddings δ put in
//!   front of the concept prompt c, after it, or in place of the concept phrase ([`AttackType`]), `attack_steps`
//!   of Adam (or signed-gradient, `sign_attack`) on min_δ ‖ε(x_t, t, τ_θ(c ⊕ δ)) − ε(x_t, t, τ₀(c))‖² — the
//!   tokens that make the current encoder show the concept again — each attack starting from the last one's δ
//!   (the paper code's `attack_init = latest`) or from random vocabulary tokens;
//! - an **outer step** on θ: min_θ ‖ε(x_t, t, τ_θ([δ, c])) − y‖² + w · ‖ε(x_t, t, τ_θ(p)) − ε(x_t, t, τ₀(p))‖²,
//!   with y the spec's replacement r, ε(x_t, t, τ₀(r)) (All-but-One style, the default when the spec names one),
//!   or ESD's negative guidance ε(x_t, ∅) − η(ε(x_t, c) − ε(x_t, ∅)) (`objective = "esd"`), and p drawn from the
//!   spec's preserve prompts (the retain set, weight w), each at its own picture x_t (the paper's `retain_z`).
//!
//! x_t are the spec's concept prompts drawn by the base model, noised to a uniformly drawn timestep. θ starts from
//! τ₀ or from τ₀ after the closed-form `erasepro-text` edit of the same spec ([`Start`]). The training attack
//! (continuous tokens) is deliberately not the evaluation attack: `unsee attack` judges the result with
//! typed prompts, textual inversion and compositions.

use std::time::Instant;

use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, Optimizer};
use burn::tensor::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::attack::loss::{DenoisingLoss, Noised, embed_ids, gradient, leaf, scalar};
use super::spec::Spec;
use crate::clip::CLIPTextModel;
use crate::engine::check_cancelled;
use crate::error::{Error, Result};
use crate::load::StableDiffusion;
use crate::pipeline::{Control, GenerateRequest, Inputs, Target};

/// What the erased prompt is trained towards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// ε(x_t, τ₀(replacement)).
    Replacement,
    /// ESD: ε(x_t, ∅) − η(ε(x_t, c) − ε(x_t, ∅)).
    Esd,
}

/// Where the inner attack's k continuous tokens go (the paper code's `attack_type`; its `prefix_k`, `suffix_k` and
/// `replace_k`, the concept phrase being the paper's prompt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttackType {
    /// `[BOS, δ, template(concept), EOS, …]`.
    Prefix,
    /// `[BOS, template(concept), δ, EOS, …]`.
    Suffix,
    /// The concept phrase itself replaced: `[BOS, template(δ), EOS, …]`.
    Replace,
}

/// How each inner attack starts (the paper code's `attack_init`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttackInit {
    /// From the previous attack's δ (a persistent adversary; the first from random tokens).
    Latest,
    /// From the embeddings of k tokens drawn uniformly from the vocabulary.
    Random,
}

/// The encoder the training starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// The model's own encoder (AdvUnlearn).
    Original,
    /// The model's encoder after the closed-form `erasepro-text` edit of the same spec (ErasePro's defaults).
    EraseproText,
}

/// The `[harden]` table of a spec (defaults: the paper's, except where noted).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HardenParams {
    pub iterations: usize,
    /// Iterations without the inner attack first.
    pub warmup: usize,
    pub lr: f64,
    pub attack_steps: usize,
    pub attack_lr: f64,
    /// k, the attack's continuous tokens (the paper's `adv_prompt_num`; the name is kept from when the attack was
    /// a prefix only).
    pub prefix_tokens: usize,
    pub attack_type: AttackType,
    pub attack_init: AttackInit,
    pub start: Start,
    /// Signed-gradient inner steps (the paper's `fast_at`) instead of Adam.
    pub sign_attack: bool,
    pub retain_weight: f64,
    /// Preserve prompts per outer step.
    pub retain_batch: usize,
    /// Preserve-prompt images drawn by the base model (the retain x₀ pool: the paper noises retain prompts' own
    /// pictures, `retain_z`, not the concept's), the preserve prompts in turn on the spec's templates.
    pub retain_images: usize,
    /// Encoder layers trained (empty = all, as AdvUnlearn's `text_encoder_full`); the final layer norm is trained
    /// with them.
    pub layers: Vec<usize>,
    /// `None`: replacement when the spec names one, else ESD.
    pub objective: Option<Objective>,
    pub eta: f64,
    /// Concept images drawn by the base model (the x₀ pool).
    pub images: usize,
    /// DDIM steps and guidance of those images.
    pub image_steps: usize,
    pub image_guidance: f64,
    pub seed: u64,
}

impl Default for HardenParams {
    fn default() -> Self {
        Self { iterations: 1000, warmup: 200, lr: 1e-5, attack_steps: 30, attack_lr: 1e-3, prefix_tokens: 1,
               attack_type: AttackType::Prefix, attack_init: AttackInit::Latest, start: Start::Original,
               sign_attack: false, retain_weight: 0.3, retain_batch: 5, retain_images: 32,
               layers: vec![], objective: None, eta: 1.0,
               images: 8, image_steps: 20, image_guidance: 7.5, seed: 0 }
    }
}

impl HardenParams {
    pub fn validate(&self, layers: usize) -> std::result::Result<(), String> {
        let count = |name: &str, v: usize, lo: usize, hi: usize| {
            if (lo..=hi).contains(&v) { Ok(()) } else { Err(format!("harden.{name} must be {lo} to {hi} (got {v})")) }
        };
        count("iterations", self.iterations, 1, 1_000_000)?;
        count("warmup", self.warmup, 0, 1_000_000)?;
        count("attack_steps", self.attack_steps, 0, 1000)?;
        count("prefix_tokens", self.prefix_tokens, 1, 20)?;
        count("retain_batch", self.retain_batch, 0, 64)?;
        count("retain_images", self.retain_images, 1, 10_000)?;
        count("images", self.images, 1, 10_000)?;
        count("image_steps", self.image_steps, 1, 1000)?;
        for (name, v, hi) in [("lr", self.lr, 1.0), ("attack_lr", self.attack_lr, 10.0), ("eta", self.eta, 100.0),
                              ("retain_weight", self.retain_weight, 1e6), ("image_guidance", self.image_guidance, 100.0)] {
            let positive = name != "retain_weight" && name != "image_guidance";
            if !(v.is_finite() && v <= hi && (if positive { v > 0.0 } else { v >= 0.0 })) {
                return Err(format!("harden.{name} = {v} is out of range"));
            }
        }
        if let Some(l) = self.layers.iter().find(|&&l| l >= layers) {
            return Err(format!("harden.layers: the text encoder has {layers} layers (0 to {}), not {l}", layers - 1));
        }
        Ok(())
    }
}

/// What a hardening run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HardenReport {
    pub iterations: usize,
    pub objective: Objective,
    /// Mean unlearning and retain losses over the first and the last tenth of the iterations.
    pub unlearn_loss: (f32, f32),
    pub retain_loss: (f32, f32),
    pub trained_layers: Vec<usize>,
    pub images_s: f64,
    pub train_s: f64,
}

fn fill(template: &str, concept: &str) -> String {
    Spec::fill(template, concept)
}

/// Token embeddings `[1, max_length, d]` of `template` filled with `concept`, with the attack's tokens `adv`
/// (`[1, k, d]`) placed as `kind` says (constants but `adv`); `None`: the plain prompt.
pub fn attacked(sd: &StableDiffusion, template: &str, concept: &str, adv: Option<&Tensor<3>>, kind: AttackType)
    -> Result<Tensor<3>> {
    let tok = &sd.tokenizer;
    let k = adv.map_or(0, |p| p.dims()[1]);
    let (mut head, mut tail) = match (adv, kind) {
        (Some(_), AttackType::Replace) => {
            let (before, after) = template.split_once("{}").unwrap_or((template, ""));
            (tok.content_ids(before)?, tok.content_ids(&Spec::fill(after, concept))?)
        }
        (Some(_), AttackType::Suffix) => (tok.content_ids(&fill(template, concept))?, vec![]),
        _ => (vec![], tok.content_ids(&fill(template, concept))?),
    };
    // Cut what does not fit in front of EOS, the attack's tokens kept.
    let room = tok.max_length - 2 - k;
    head.truncate(room);
    tail.truncate(room - head.len());
    head.insert(0, tok.bos);
    tail.push(tok.eos);
    tail.resize(tok.max_length - head.len() - k, tok.pad);
    let mut parts = vec![embed_ids(sd, &head)];
    parts.extend(adv.cloned());
    parts.push(embed_ids(sd, &tail));
    Ok(Tensor::cat(parts, 1))
}

/// The embeddings `[1, k, d]` of k tokens drawn uniformly from the vocabulary.
fn random_tokens(sd: &StableDiffusion, k: usize, rng: &mut ChaCha8Rng) -> Tensor<3> {
    let vocab = sd.text_encoder.token_embeddings().dims()[0];
    let ids: Vec<u32> = (0..k).map(|_| rng.random_range(0..vocab) as u32).collect();
    embed_ids(sd, &ids)
}

/// Trains `sd`'s text encoder as the spec and its `[harden]` table say, against `sd`'s UNet and the original
/// encoder `sd.text_encoder` (left unchanged); returns the hardened encoder. `progress(done, total)`.
pub fn harden(sd: &StableDiffusion, spec: &Spec, progress: &mut dyn FnMut(&str, usize, usize),
              cancelled: &dyn Fn() -> bool) -> Result<(CLIPTextModel, HardenReport)> {
    let p = spec.harden.clone().unwrap_or_default();
    let n_layers = sd.text_encoder.text_model.encoder.layers.len();
    p.validate(n_layers).map_err(Error::InvalidSpec)?;
    if spec.erase.is_empty() {
        return Err(Error::InvalidSpec("harden needs at least one [[erase]] concept".into()));
    }
    let objective = p.objective.unwrap_or(if spec.erase.iter().all(|e| !e.replace_with.trim().is_empty()) {
        Objective::Replacement
    } else {
        Objective::Esd
    });
    if objective == Objective::Replacement && spec.erase.iter().any(|e| e.replace_with.trim().is_empty()) {
        return Err(Error::InvalidSpec("harden.objective = \"replacement\" needs replace_with on every concept".into()));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(p.seed);
    let t_images = Instant::now();

    // One base-model picture (latents) of `prompt`, as the pools below draw them.
    let draw = |prompt: String, seed: u64| -> Result<Tensor<4>> {
        let req = GenerateRequest { prompt, steps: p.image_steps, guidance: p.image_guidance, seed, ..Default::default() };
        Ok(sd.generate(&req, Inputs { cancelled: Some(cancelled), ..Default::default() },
                       &mut |_| Control::Continue, Target::Latents)?.latents)
    };
    // The x₀ pool: concept prompts on the spec's templates, drawn by the (frozen) model.
    let mut pool = vec![];
    for k in 0..p.images {
        check_cancelled(cancelled)?;
        progress("concept images", k, p.images);
        let item = k % spec.erase.len();
        let template = &spec.templates[(k / spec.erase.len()) % spec.templates.len()];
        let x0 = draw(fill(template, &spec.erase[item].concept), p.seed.wrapping_add(10_000 + k as u64))?;
        pool.push((item, template.clone(), x0));
    }
    // The retain x₀ pool: preserve prompts drawn the same way.
    let mut retain_pool = vec![];
    let retain_images = if p.retain_batch > 0 && p.retain_weight > 0.0 { p.retain_images } else { 0 };
    for k in 0..if spec.preserve.is_empty() { 0 } else { retain_images } {
        check_cancelled(cancelled)?;
        progress("preserve images", k, retain_images);
        let template = &spec.templates[(k / spec.preserve.len()) % spec.templates.len()];
        let prompt = fill(template, &spec.preserve[k % spec.preserve.len()]);
        let x0 = draw(prompt.clone(), p.seed.wrapping_add(20_000 + k as u64))?;
        retain_pool.push((prompt, x0));
    }
    let images_s = t_images.elapsed().as_secs_f64();

    // The trained copy: an autodiff fork with the embeddings (and the layers not trained) frozen.
    let trained_layers: Vec<usize> = if p.layers.is_empty() { (0..n_layers).collect() } else { p.layers.clone() };
    let start = match p.start {
        Start::Original => (*sd.text_encoder).clone(),
        Start::EraseproText => {
            progress("closed-form start (erasepro-text)", 0, 1);
            let closed_form = spec.with_method(super::spec::Method::EraseproText);
            closed_form.validate()?;
            let edit = super::erasepro_text::erasepro_text(sd, &closed_form)?;
            tracing::info!("harden starts from the erasepro-text edit ({} layers)", edit.deltas.len());
            let mut work = sd.clone();
            for delta in &edit.deltas {
                super::matrices::apply_delta(&mut work, delta)?;
            }
            (*work.text_encoder).clone()
        }
    };
    let mut te = start.fork(&sd.dev().clone().autodiff()).train().set_require_grad(true);
    te.text_model.embeddings = te.text_model.embeddings.no_grad();
    for (i, layer) in te.text_model.encoder.layers.iter_mut().enumerate() {
        if !trained_layers.contains(&i) {
            *layer = layer.clone().no_grad();
        }
    }
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init();
    let objective_fn = DenoisingLoss::new(sd)?;
    let base = &sd.text_encoder;
    let (uncond, _) = sd.encode_prompt("")?;
    let mse = |a: Tensor<4>, b: Tensor<4>| {
        let e = (a - b).cast(burn::tensor::DType::F32);
        (e.clone() * e).mean()
    };
    let (mut unlearn_log, mut retain_log) = (vec![], vec![]);
    let mut latest: Option<Tensor<3>> = None;
    let t_train = Instant::now();
    for it in 0..p.iterations {
        check_cancelled(cancelled)?;
        let (item, template, x0) = &pool[rng.random_range(0..pool.len())];
        let concept_phrase = &spec.erase[*item].concept;
        let concept = fill(template, concept_phrase);
        let t = objective_fn.random_timestep(&mut rng);
        let noised: Noised = objective_fn.noise(x0, t, &mut rng)?;
        let unet = |ctx: &Tensor<3>| sd.unet.forward(noised.x_t.clone(), t as f64, ctx);
        // What the concept prompt gives the frozen model, and the training target.
        let (c0, _) = sd.encode_prompt(&concept)?;
        let eps_c = unet(&c0).detach();
        let target = match objective {
            Objective::Replacement => {
                let (r0, _) = sd.encode_prompt(&fill(template, &spec.erase[*item].replace_with))?;
                unet(&r0)
            }
            Objective::Esd => {
                let eps_u = unet(&uncond);
                eps_u.clone() - (eps_c.clone() - eps_u) * p.eta
            }
        }.detach();

        // Inner attack on a plain snapshot of the current encoder: only δ is a leaf.
        let adv = if it >= p.warmup && p.attack_steps > 0 {
            let snapshot = te.valid();
            let mut delta = match (p.attack_init, latest.take()) {
                (AttackInit::Latest, Some(previous)) => previous,
                _ => random_tokens(sd, p.prefix_tokens, &mut rng),
            };
            let adam = AdamConfig::new().with_epsilon(1e-8).build();
            let mut state = None;
            for _ in 0..p.attack_steps {
                let var = leaf(delta.clone());
                let ctx = snapshot.forward_embeds(attacked(sd, template, concept_phrase, Some(&var), p.attack_type)?);
                let loss = mse(unet(&ctx), eps_c.clone());
                let g = gradient(&loss, &var)?;
                if p.sign_attack {
                    delta = delta - g.sign() * p.attack_lr;
                } else {
                    let (next, s) = adam.step(p.attack_lr, delta, g, state);
                    (delta, state) = (next, s);
                }
            }
            let delta = delta.detach();
            latest = Some(delta.clone());
            Some(delta.autodiff())
        } else {
            None
        };

        // Outer step on θ.
        let ctx = te.forward_embeds(attacked(sd, template, concept_phrase, adv.as_ref(), p.attack_type)?.autodiff());
        let unlearn = mse(unet(&ctx), target);
        let mut loss = unlearn.clone();
        let mut retain_value = 0.0;
        if !retain_pool.is_empty() {
            let mut retain = None;
            for _ in 0..p.retain_batch {
                // A preserve prompt's own picture, noised to the same timestep.
                let (prompt, x0) = &retain_pool[rng.random_range(0..retain_pool.len())];
                let noised = objective_fn.noise(x0, t, &mut rng)?;
                let unet = |ctx: &Tensor<3>| sd.unet.forward(noised.x_t.clone(), t as f64, ctx);
                let ids = sd.tokenizer.encode(prompt)?.ids;
                let want = unet(&base.forward(crate::tensor::token_ids(&ids, sd.dev()))).detach();
                let got = unet(&te.forward_embeds(embed_ids(sd, &ids).autodiff()));
                let l = mse(got, want) / p.retain_batch as f64;
                retain = Some(match retain { None => l, Some(r) => r + l });
            }
            if let Some(r) = retain {
                retain_value = scalar(r.clone())?;
                loss = loss + r * p.retain_weight;
            }
        }
        let u = scalar(unlearn)?;
        let total = scalar(loss.clone())?;
        if !total.is_finite() {
            return Err(Error::NonFiniteOutput(format!("harden loss at iteration {it}")));
        }
        unlearn_log.push(u);
        retain_log.push(retain_value);
        if !loss.is_tracked() {
            return Err(Error::Internal("the hardening loss does not reach the text encoder's weights".into()));
        }
        let grads = GradientsParams::from_grads(loss.backward(), &te);
        te = optim.step(p.lr, te, grads);
        progress(if it < p.warmup { "hardening (warm-up)" } else { "hardening" }, it + 1, p.iterations);
    }
    let hardened = te.valid();
    // A NaN that the loss did not show (it is checked every step) would still be caught here.
    for layer in &hardened.text_model.encoder.layers {
        let w = crate::tensor::to_f32_vec(layer.mlp.fc2.weight.val().sum())?;
        if w.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFiniteOutput("hardened text encoder weights".into()));
        }
    }
    let tenth = (p.iterations / 10).max(1);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len().max(1) as f32;
    let ends = |v: &[f32]| (mean(&v[..tenth.min(v.len())]), mean(&v[v.len().saturating_sub(tenth)..]));
    Ok((hardened, HardenReport {
        iterations: p.iterations,
        objective,
        unlearn_loss: ends(&unlearn_log),
        retain_loss: ends(&retain_log),
        trained_layers,
        images_s,
        train_s: t_train.elapsed().as_secs_f64(),
    }))
}

/// Writes `te` as a diffusers `text_encoder` folder (`config.json` copied from `config`, `model.safetensors` with
/// transformers' key names), atomically per file; `out` must not exist or be empty.
pub fn save_text_encoder(te: &CLIPTextModel, config: &std::path::Path, out: &std::path::Path) -> Result<()> {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::InvalidRequest(format!("{} exists and is not empty", out.display())));
    }
    let mut store = SafetensorsStore::from_bytes(None).with_to_adapter(BurnToPyTorchAdapter)
        .metadata("format", "pt").metadata("unsee", "harden");
    te.save_into(&mut store).map_err(|e| Error::Internal(format!("serialising the text encoder: {e}")))?;
    let bytes = store.get_bytes().map_err(|e| Error::Internal(format!("serialising the text encoder: {e}")))?;
    let config_text = std::fs::read(config).map_err(|e| Error::io(config, e))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::weights::write_atomic(&out.join("config.json"), &config_text)?;
    crate::weights::write_atomic(&out.join("model.safetensors"), &bytes)
}

/// The format name of a hardened text encoder's delta file.
pub const DELTA_FORMAT: &str = "unsee-text-encoder-delta";
const DELTA_VERSION: &str = "1";

fn delta_digest(claims: &[&str], tensors: &[(String, Vec<usize>, Vec<u8>)]) -> String {
    let all: Vec<&str> = [DELTA_FORMAT, DELTA_VERSION].iter().chain(claims).copied().collect();
    super::file::claims_digest(&all, tensors)
}

/// The parameters of `m` as (name in the module, shape, f32 values), in burn's layout.
fn parameters(m: &CLIPTextModel) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>> {
    use burn::store::ModuleSnapshot;
    m.collect(None, None, true).iter().map(|t| {
        let data = burn::store::bridge::to_data(t).map_err(|e| Error::Internal(format!("{}: {e:?}", t.name.clone())))?;
        let shape = data.shape().to_vec();
        let v = data.convert::<f32>().try_to_vec::<f32>().map_err(|e| Error::Internal(format!("{e:?}")))?;
        Ok((t.name.clone(), shape, v))
    }).collect()
}

/// Writes the compact form of a hardened encoder: only the tensors that differ from `base` (the trained layers; the
/// frozen embeddings are not repeated), f32 in the module's own layout and names, with the hash of the encoder it
/// was trained from and of the result, the spec, and a digest over all of it. Loaded with `--text-encoder FILE`
/// onto the same base encoder only.
pub fn save_delta(base: &CLIPTextModel, hardened: &CLIPTextModel, spec: &Spec, path: &std::path::Path) -> Result<()> {
    let spec = serde_json::to_string(spec).map_err(|e| Error::Internal(e.to_string()))?;
    write_delta(base, hardened, &spec, false, path)
}

/// The delta of any encoder `target` against `base` (same format as [`save_delta`]); `f16` stores the tensors in
/// half precision (the result hash is then that of `base` with the rounded tensors, what loading gives).
/// `about` is recorded as the file's `spec` claim.
pub fn write_delta(base: &CLIPTextModel, target: &CLIPTextModel, about: &str, f16: bool, path: &std::path::Path)
    -> Result<()> {
    use crate::erase::matrices::text_encoder_hash_of;
    let before: std::collections::HashMap<String, Vec<f32>> =
        parameters(base)?.into_iter().map(|(n, _, v)| (n, v)).collect();
    let mut tensors = vec![];
    for (name, shape, v) in parameters(target)? {
        if before.get(&name) != Some(&v) {
            let mut t = crate::weights::OwnedTensor::f32(name, shape, &v);
            if f16 {
                t.dtype = safetensors::Dtype::F16;
                t.bytes = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
            }
            tensors.push(t);
        }
    }
    if tensors.is_empty() {
        return Err(Error::InvalidRequest("the encoder equals its base: nothing to write".into()));
    }
    let raw: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.bytes.clone())).collect();
    // The encoder the file gives back (rounded when f16).
    let result = if f16 {
        let views = tensors.iter()
            .map(|t| safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map(|v| (t.name.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>().map_err(|e| Error::Internal(e.to_string()))?;
        let bytes = safetensors::serialize(views, None).map_err(|e| Error::Internal(e.to_string()))?;
        let mut candidate = base.clone();
        apply_tensors(&mut candidate, bytes, path)?;
        text_encoder_hash_of(&candidate)
    } else {
        text_encoder_hash_of(target)
    };
    let claims = [text_encoder_hash_of(base), result, about.to_string()];
    let digest = delta_digest(&claims.iter().map(String::as_str).collect::<Vec<_>>(), &raw);
    let meta = std::collections::HashMap::from([
        ("format".to_string(), DELTA_FORMAT.to_string()),
        ("version".to_string(), DELTA_VERSION.to_string()),
        ("base_text_encoder_hash".to_string(), claims[0].clone()),
        ("text_encoder_hash".to_string(), claims[1].clone()),
        ("spec".to_string(), claims[2].clone()),
        ("sha256".to_string(), digest),
    ]);
    crate::weights::write_safetensors(path, &tensors, Some(meta))
}

/// Loads safetensors `bytes` (module names, any float dtype) into `te`, cast to its dtype; every tensor must fit.
fn apply_tensors(te: &mut CLIPTextModel, bytes: Vec<u8>, path: &std::path::Path) -> Result<()> {
    use burn::store::{FloatCastAdapter, ModuleSnapshot, SafetensorsStore};
    let bad = |m: String| Error::InvalidErasureFile { file: path.to_path_buf(), message: m };
    let dtype = te.token_embeddings().dtype();
    let mut store = SafetensorsStore::from_bytes(Some(bytes)).with_from_adapter(FloatCastAdapter::to(dtype))
        .allow_partial(true).validate(true);
    let result = te.load_from(&mut store).map_err(|e| bad(e.to_string()))?;
    if !result.errors.is_empty() || !result.unused.is_empty() {
        return Err(bad(format!("tensors that do not fit the encoder: {:?} {:?}", result.errors, result.unused)));
    }
    Ok(())
}

/// Whether `path` is a hardened encoder's delta file.
pub fn is_delta(path: &std::path::Path) -> bool {
    path.is_file() && crate::weights::MappedSafetensors::open(path).ok()
        .and_then(|m| m.metadata().and_then(|meta| meta.get("format").cloned()))
        .is_some_and(|f| f == DELTA_FORMAT)
}

/// Applies a delta file to `te` (the encoder it was trained from: refused otherwise), checking its digest and
/// that the result is the encoder it describes. `te` is unchanged on error.
pub fn apply_delta_file(te: &mut CLIPTextModel, path: &std::path::Path) -> Result<()> {
    use crate::erase::matrices::text_encoder_hash_of;
    let bad = |m: String| Error::InvalidErasureFile { file: path.to_path_buf(), message: m };
    let mapped = crate::weights::MappedSafetensors::open(path)?;
    let meta = mapped.metadata().ok_or_else(|| bad("no metadata".into()))?;
    let text = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata has no {k}")));
    if text("format")? != DELTA_FORMAT || text("version")? != DELTA_VERSION {
        return Err(bad(format!("not a version-{DELTA_VERSION} {DELTA_FORMAT} file")));
    }
    let st = mapped.tensors();
    let mut raw = vec![];
    for (name, view) in st.tensors() {
        if !matches!(view.dtype(), safetensors::Dtype::F32 | safetensors::Dtype::F16) {
            return Err(bad(format!("{name} is {:?}, not F32 or F16", view.dtype())));
        }
        raw.push((name, view.shape().to_vec(), view.data().to_vec()));
    }
    let claims = [text("base_text_encoder_hash")?, text("text_encoder_hash")?, text("spec")?];
    if delta_digest(&claims.iter().map(String::as_str).collect::<Vec<_>>(), &raw) != text("sha256")? {
        return Err(bad("sha256 does not match its claims and tensors (altered after it was written)".into()));
    }
    if text_encoder_hash_of(te) != claims[0] {
        return Err(Error::ErasureMismatch { file: path.to_path_buf(),
                                            message: "this delta was made from another text encoder".into() });
    }
    let mut candidate = te.clone();
    apply_tensors(&mut candidate, mapped.bytes().to_vec(), path)?;
    if text_encoder_hash_of(&candidate) != claims[1] {
        return Err(bad("the encoder after applying it is not the one it describes".into()));
    }
    *te = candidate;
    Ok(())
}
