//! The embedding attack (white box): RECE's closed-form adversarial embedding (the paper is cited in
//! [`crate::erase`]). Given the base cross-attention projections W₀ₗ and the edited ones W′ₗ, the text embedding
//! that best reproduces, through the edited model, the keys and values the base model gives the concept prompt c is
//!
//!   c′ = argmin_e Σₗ ‖W′ₗ e − W₀ₗ c‖² + λ‖e‖² = (λI + Σₗ W′ₗᵀW′ₗ)⁻¹ (Σₗ W′ₗᵀW₀ₗ) c,
//!
//! applied to every one of the 77 token columns of the prompt's hidden states. The model is then conditioned on
//! c′ directly ([`crate::pipeline::Inputs::context`]). An edit that only rotates the concept's keys away
//! (a small ‖ΔW‖) is undone by it; an edit whose erased directions are absent from W′'s row space is not. It
//! only attacks UNet edits: a text-encoder edit (`erasepro-text`) leaves the projections unchanged, so the
//! attack degenerates to "use the original text encoder": [`EmbeddingAttack::new`] returns `None` for it.

use burn::tensor::Tensor;

use crate::erase::linalg::{self, M, identity, zeros};
use crate::erase::matrices::{Component, cross_attention_names, read_matrix};
use crate::error::{Error, Result};
use crate::load::StableDiffusion;

/// λ of the embedding attack: the `lambda_reg` default of the `rece` method (RECE's published value).
pub const EMBEDDING_ATTACK_LAMBDA: f64 = 0.1;

/// The cross-attention key/value projections (d_out × d_in, f64) of a model, in UNet order.
fn projections(sd: &StableDiffusion) -> Result<Vec<M>> {
    let names = cross_attention_names(&sd.unet, &["to_k".to_string(), "to_v".to_string()]);
    names.iter().map(|n| read_matrix(sd, Component::Unet, n)).collect()
}

/// The embedding attack against one edited model: the d × d operator c ↦ c′, computed once from both models'
/// projections and then applied to any number of prompts.
pub struct EmbeddingAttack {
    /// (λI + Σ W′ᵀW′)⁻¹ Σ W′ᵀW₀
    op: M,
}

impl EmbeddingAttack {
    /// `None` when the two models' UNet projections are identical (nothing to attack: the edit is not in the
    /// UNet); an error when they differ in shape.
    pub fn new(base: &StableDiffusion, edited: &StableDiffusion, lambda: f64) -> Result<Option<Self>> {
        let (w0, w1) = (projections(base)?, projections(edited)?);
        if w0.is_empty() || w0.len() != w1.len() || w0.iter().zip(&w1).any(|(a, b)| a.nrows() != b.nrows() || a.ncols() != b.ncols()) {
            return Err(Error::InvalidRequest(
                "the edited model's cross-attention differs in shape from the base's".into(),
            ));
        }
        if w0.iter().zip(&w1).all(|(a, b)| linalg::frob(&(a - b)) == 0.0) {
            return Ok(None);
        }
        let d = w0[0].ncols();
        let mut a = identity(d) * lambda;
        let mut b = zeros(d, d);
        for (wb, we) in w0.iter().zip(&w1) {
            a += we.transpose() * we;
            b += we.transpose() * wb;
        }
        Ok(Some(Self { op: linalg::spd_solve(&a, &b, "embedding attack")? }))
    }

    /// The adversarial conditioning `[1, 77, hidden]` for `prompt`: c′ = op · c for every token column, with c the
    /// hidden states of `prompt` from `edited`'s text encoder (the same as the base's for UNet edits).
    pub fn context(&self, edited: &StableDiffusion, prompt: &str) -> Result<Tensor<3>> {
        let (c, _) = edited.encode_prompt(prompt)?;
        let d = c.dims()[2];
        if d != self.op.nrows() {
            return Err(Error::InvalidRequest(format!(
                "the attack was built for width {}, the model's text encoder has {d}", self.op.nrows()
            )));
        }
        let adv = &self.op * &linalg::from_hidden(c)?;
        Ok(linalg::to_hidden(&adv, edited.dev()))
    }
}

/// [`EmbeddingAttack::new`] then [`EmbeddingAttack::context`], for one prompt; refuses a model without a UNet edit.
pub fn adversarial_context(base: &StableDiffusion, edited: &StableDiffusion, prompt: &str, lambda: f64)
    -> Result<Tensor<3>> {
    EmbeddingAttack::new(base, edited, lambda)?
        .ok_or_else(|| {
            Error::InvalidRequest(
                "the embedding attack needs a UNet edit; this model's cross-attention equals the base's".into(),
            )
        })?
        .context(edited, prompt)
}
