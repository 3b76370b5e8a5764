//! The textual-inversion attack: concept inversion (Pham, Marshall, Cohen, Hegde, "Circumventing Concept Erasure
//! Methods for Text-to-Image Generative Models", ICLR 2024; code NYU-DICE-Lab/circumventing-concept-erasure).
//!
//! Someone who holds the weights learns one new input token ⟨v*⟩ — an embedding v ∈ ℝ^hidden in place of a
//! vocabulary row — against the *erased* model (text encoder and UNet frozen), on images of the concept made by
//! the base model:
//!
//!   v* = argmin_v E_{(x₀, y), t, ε} ‖ε_θ(x_t, t, τ(y[⟨v*⟩ := v])) − ε‖²,
//!
//! y being each target's prompt with the concept replaced by ⟨v*⟩ (Adam, lr 5e-3 as in the paper; a batch of
//! targets per step at one timestep). Prompts that contain ⟨v*⟩ ("an image of a ⟨v*⟩") are then generated with the
//! learned embedding. The embedding is saved as safetensors in AUTOMATIC1111's layout (`emb_params`, `[1, hidden]`)
//! so a finding can be reproduced.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use burn::optim::{AdamConfig, Optimizer};
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::loss::{DenoisingLoss, embed_ids, gradient, leaf, scalar};
use crate::engine::check_cancelled;
use crate::error::{Error, Result};
use crate::load::StableDiffusion;

/// The placeholder that stands for the learned token in prompts.
pub const PLACEHOLDER: &str = "<v*>";

#[derive(Debug, Clone, serde::Serialize)]
pub struct InversionConfig {
    pub steps: usize,
    pub lr: f64,
    /// Targets per step.
    pub batch: usize,
    pub seed: u64,
}

impl Default for InversionConfig {
    fn default() -> Self {
        Self { steps: 300, lr: 5e-3, batch: 4, seed: 0 }
    }
}

impl InversionConfig {
    pub fn validate(&self) -> Result<()> {
        if !(1..=100_000).contains(&self.steps) || !(1..=64).contains(&self.batch) {
            return Err(Error::InvalidRequest("inversion steps must be 1 to 100000 and batch 1 to 64".into()));
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return Err(Error::InvalidRequest(format!("inversion lr must be in (0, 10] (got {})", self.lr)));
        }
        Ok(())
    }
}

/// One training image: its prompt with the concept replaced by [`PLACEHOLDER`], and its latents `[1, c, h, w]`.
pub struct InversionTarget {
    pub prompt: String,
    pub x0: Tensor<4>,
}

/// The token embeddings `[1, max_length, hidden]` of `prompt`, which holds [`PLACEHOLDER`] exactly once, with `v`
/// (`[hidden]`, possibly an autodiff leaf) at the placeholder's position.
pub fn embeds_with(sd: &StableDiffusion, prompt: &str, v: &Tensor<1>) -> Result<Tensor<3>> {
    let parts: Vec<&str> = prompt.split(PLACEHOLDER).collect();
    let [before, after] = parts.as_slice() else {
        return Err(Error::InvalidRequest(format!("the prompt must contain {PLACEHOLDER} exactly once: {prompt:?}")));
    };
    let tok = &sd.tokenizer;
    let mut head = vec![tok.bos];
    head.extend(tok.content_ids(before)?);
    let mut tail = tok.content_ids(after)?;
    if head.len() + 1 + tail.len() + 1 > tok.max_length {
        return Err(Error::InvalidRequest(format!("the prompt is longer than {} tokens: {prompt:?}", tok.max_length)));
    }
    tail.push(tok.eos);
    tail.resize(tok.max_length - head.len() - 1, tok.pad);
    let d = v.dims()[0];
    Ok(Tensor::cat(vec![embed_ids(sd, &head), v.clone().reshape([1, 1, d]), embed_ids(sd, &tail)], 1))
}

/// The conditioning `[1, 77, hidden]` of `prompt` with the learned embedding `v`.
pub fn context_with(sd: &StableDiffusion, prompt: &str, v: &Tensor<1>) -> Result<Tensor<3>> {
    Ok(sd.text_encoder.forward_embeds(embeds_with(sd, prompt, v)?))
}

/// The mean token embedding of `words`: the starting point (the attacker knows which concept was erased).
pub fn init_from(sd: &StableDiffusion, words: &str) -> Result<Tensor<1>> {
    let ids = sd.tokenizer.content_ids(words)?;
    if ids.is_empty() {
        return Err(Error::InvalidRequest(format!("{words:?} has no tokens to start the inversion from")));
    }
    let n = ids.len();
    let ids_t = Tensor::<2, Int>::from_data(TensorData::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), [1, n]),
                                            sd.dev());
    let rows = sd.text_encoder.token_embed(ids_t).reshape([n, sd.text_encoder.hidden_size()]);
    Ok(rows.mean_dim(0).reshape([sd.text_encoder.hidden_size()]))
}

/// The learned embedding and the mean loss of the last tenth of the steps.
pub struct Inverted {
    pub embedding: Tensor<1>,
    pub loss: f32,
    pub seconds: f64,
}

/// Learns ⟨v*⟩ against `sd` from `init`.
pub fn invert(sd: &StableDiffusion, targets: &[InversionTarget], init: Tensor<1>, cfg: &InversionConfig,
              progress: &mut dyn FnMut(usize, usize), cancelled: &dyn Fn() -> bool) -> Result<Inverted> {
    cfg.validate()?;
    if targets.is_empty() {
        return Err(Error::InvalidRequest("textual inversion needs at least one target image".into()));
    }
    let start = Instant::now();
    let objective = DenoisingLoss::new(sd)?;
    let adam = AdamConfig::new().with_epsilon(1e-8).build();
    let mut state = None;
    let mut v = init.detach();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let tail_from = cfg.steps - (cfg.steps / 10).max(1);
    let (mut tail_sum, mut tail_n) = (0.0f64, 0usize);
    for tgt in targets {
        embeds_with(sd, &tgt.prompt, &v)?; // every prompt checked before any work
    }
    for step in 0..cfg.steps {
        check_cancelled(cancelled)?;
        let batch: Vec<&InversionTarget> = (0..cfg.batch.min(targets.len()))
            .map(|_| &targets[rng.random_range(0..targets.len())])
            .collect();
        let var = leaf(v.clone());
        let embeds = batch.iter().map(|t| embeds_with(sd, &t.prompt, &var)).collect::<Result<Vec<_>>>()?;
        let x0 = Tensor::cat(batch.iter().map(|t| t.x0.clone()).collect(), 0);
        let t = objective.random_timestep(&mut rng);
        let noised = objective.noise(&x0, t, &mut rng)?;
        let loss = objective.loss(&noised, &objective.context(Tensor::cat(embeds, 0)));
        let g = gradient(&loss, &var)?;
        let l = scalar(loss)?;
        if step >= tail_from {
            tail_sum += l as f64;
            tail_n += 1;
        }
        let (next, s) = adam.step(cfg.lr, v, g, state);
        state = s;
        v = next;
        progress(step + 1, cfg.steps);
    }
    let check = crate::tensor::to_f32_vec(v.clone())?;
    if check.iter().any(|x| !x.is_finite()) {
        return Err(Error::NonFiniteOutput("textual inversion (embedding)".into()));
    }
    Ok(Inverted { embedding: v, loss: (tail_sum / tail_n.max(1) as f64) as f32, seconds: start.elapsed().as_secs_f64() })
}

/// Writes `v` as an AUTOMATIC1111-style embedding (`emb_params` `[1, hidden]`, f32), atomically.
pub fn save_embedding(v: &Tensor<1>, path: &Path) -> Result<()> {
    let data = crate::tensor::to_f32_vec(v.clone())?;
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, data.len()], &bytes)
        .map_err(|e| Error::Internal(format!("embedding tensor: {e}")))?;
    let meta = HashMap::from([
        ("format".to_string(), "pt".to_string()),
        ("unsee.placeholder".to_string(), PLACEHOLDER.to_string()),
        ("unsee.attack".to_string(), "concept inversion".to_string()),
    ]);
    let out = safetensors::serialize([("emb_params", view)], Some(meta))
        .map_err(|e| Error::Internal(format!("serialising the embedding: {e}")))?;
    crate::weights::write_atomic(path, &out)
}

/// Reads an embedding written by [`save_embedding`] (`emb_params`, f32 `[1, hidden]`), checked against the model's
/// width (dtype, shape and NaN/Inf are refused by [`crate::weights::read_f32_tensor`]).
pub fn load_embedding(sd: &StableDiffusion, path: &Path) -> Result<Tensor<1>> {
    let (shape, v) = crate::weights::read_f32_tensor(path, "emb_params", 2)?;
    let d = sd.text_encoder.hidden_size();
    if shape != [1, d] {
        return Err(Error::InvalidRequest(format!(
            "{}: emb_params is {shape:?}; this model's text encoder needs [1, {d}] (one token of its width)",
            path.display()
        )));
    }
    Ok(Tensor::<1>::from_data(TensorData::new(v, [d]), sd.dev()).cast(sd.text_encoder.token_embeddings().dtype()))
}
