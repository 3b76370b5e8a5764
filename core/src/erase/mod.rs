//! Closed-form concept erasure on the device.
//!
//! Conventions: a projection W is d_out × d_in and acts on column vectors (keys are text-encoder hidden states,
//! one column per token). Every method ends in a low-rank update ΔW = R·Xᵀ, stored as the factors (R, X).
//!
//! Methods (each cited once; formulas as in `../shared/reference/erasure-methods.md`):
//! - **UCE** — Gandikota et al., *Unified Concept Editing in Diffusion Models*, WACV 2024 (arXiv 2308.14761):
//!   min_W Σ_E s_e‖W k_e − W₀ k_g‖² + s_p Σ_P ‖W k_p − W₀ k_p‖² + λ‖W − W₀‖², whose solution is
//!   ΔW = W₀(K_G − K_E)·S·(M⁻¹K_E)ᵀ with M = λI + K_E S K_Eᵀ + s_p G (G = Σ_P k kᵀ, the preservation Gram).
//! - **TIME** — Orgad, Kawar, Belinkov, *Editing Implicit Assumptions in Text-to-Image Diffusion Models*, ICCV 2023
//!   (arXiv 2303.08084): the same ridge edit over all 77 source tokens aligned to the destination prompt, λ = 0.1.
//! - **RECE** — Gong et al., *Reliable and Efficient Concept Erasure*, ECCV 2024 (arXiv 2407.12383): after a UCE
//!   edit, C′ = (λ_reg I + Σ_l W′ₗᵀW′ₗ)⁻¹(Σ_l W′ₗᵀWₗ)C is the embedding that best regenerates the concept in the
//!   edited model; erase it towards " " with a ridge edit anchored at W′, and repeat.
//! - **SPEED** — Li et al., *Scalable, Precise, and Efficient Concept Erasure*, ICLR 2026 (arXiv 2503.07392):
//!   the ridge edit restricted to the null space of the preserved keys (after IPF filtering and DPA augmentation)
//!   and of the null-text keys (IEC), so those keys are left exactly unchanged.
//! - **ErasePro** — Chen et al., *Zero-Residual Concept Erasure via Progressive Alignment*, arXiv 2508.04472:
//!   min ‖W − W₀‖_F s.t. W X = W₀ Y, i.e. ΔW = W₀(Y − X)(XᵀX)⁻¹Xᵀ; `erasepro-text` applies it progressively to
//!   the text encoder's layers.
//! - **All-but-One** — Hong, Lee, Woo, AAAI 2024 (arXiv 2312.12807): the user-chosen replacement (`replace_with`).
//!
//! Hard constraints (`pin_unconditional`, SPEED's null space) are imposed exactly: the update is searched in the
//! orthogonal complement N of the pinned keys, ΔW = R·(N(NᵀMN)⁻¹NᵀK)ᵀ, so ΔW·k = 0 for every pinned k.

pub mod attack;
pub mod audit;
pub mod context;
pub mod erasepro;
pub mod erasepro_text;
pub mod file;
pub mod gram;
pub mod harden;
pub mod keys;
pub mod linalg;
pub mod matrices;
pub mod ridge;
pub mod spec;
pub mod speed;

use std::collections::BTreeMap;
use std::time::Instant;

use crate::error::Result;
use crate::load::StableDiffusion;
pub use context::fit_pin;
pub use keys::{Keys, align};
pub use matrices::{Component, Delta, apply_delta, cross_attention_names, hash_matrix, linear_mut, read_matrix,
                   read_weight, text_encoder_hash};
use spec::{Method, Spec};

/// Timings of an edit, for `--json` and the benchmark.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EditTimings {
    pub encode_s: f64,
    pub solve_s: f64,
    pub apply_s: f64,
}

/// The result of `erase`: the deltas plus what they were computed from.
#[derive(Debug, Clone)]
pub struct Edit {
    pub spec: Spec,
    pub deltas: Vec<Delta>,
    /// Hash of each edited matrix before the edit.
    pub base_hashes: BTreeMap<String, String>,
    /// Hash of the text encoder the keys were computed with.
    pub text_encoder_hash: String,
    pub timings: EditTimings,
    /// Per-layer residual ‖WX − T‖/‖T‖ of zero-residual solves (`erasepro`, `erasepro-text`).
    pub residuals: Vec<(String, f64)>,
    /// Things the user should know (e.g. a pin that had to be truncated on a narrow model).
    pub warnings: Vec<String>,
}

/// What a method computed, before it is applied.
struct Solved {
    deltas: Vec<Delta>,
    base_hashes: BTreeMap<String, String>,
    residuals: Vec<(String, f64)>,
    warnings: Vec<String>,
    encode_s: f64,
}

type Residuals = Vec<(String, f64)>;

/// Prepares the shared context of a cross-attention edit and runs one method's solve on it.
fn unet_edit(sd: &StableDiffusion, spec: &Spec, te_hash: &str,
             solve: impl FnOnce(&mut context::UnetEdit) -> Result<(Vec<Delta>, Residuals)>) -> Result<Solved> {
    let mut cx = context::UnetEdit::prepare(sd, spec, te_hash)?;
    let (deltas, residuals) = solve(&mut cx)?;
    Ok(Solved { deltas, base_hashes: cx.base_hashes, residuals, warnings: cx.warnings, encode_s: cx.encode_s })
}

/// Computes the edit described by `spec` on `sd` (whose weights are the base) and applies it to `sd`. On error
/// `sd` is unchanged.
pub fn erase(sd: &mut StableDiffusion, spec: &Spec) -> Result<Edit> {
    spec.validate()?;
    let t0 = Instant::now();
    let te_hash = text_encoder_hash(sd);
    let solved = match spec.method {
        Method::Uce | Method::Time => unet_edit(sd, spec, &te_hash, |cx| Ok((ridge::uce(cx)?, vec![])))?,
        Method::Rece => unet_edit(sd, spec, &te_hash, |cx| Ok((ridge::rece(cx)?, vec![])))?,
        Method::Speed => unet_edit(sd, spec, &te_hash, |cx| Ok((speed::speed(cx)?, vec![])))?,
        Method::Erasepro => unet_edit(sd, spec, &te_hash, |cx| erasepro::erasepro(cx))?,
        Method::EraseproText => {
            let e = erasepro_text::erasepro_text(sd, spec)?;
            Solved { deltas: e.deltas, base_hashes: e.base_hashes, residuals: e.residuals, warnings: e.warnings,
                     encode_s: e.encode_s }
        }
    };
    let deltas: Vec<Delta> = solved.deltas.into_iter().map(Delta::compact).collect();
    let solve_s = (t0.elapsed().as_secs_f64() - solved.encode_s).max(0.0);

    let t1 = Instant::now();
    let mut edited = sd.clone();
    for delta in &deltas {
        apply_delta(&mut edited, delta)?;
    }
    let _ = edited.dev().sync();
    *sd = edited;
    Ok(Edit {
        spec: spec.clone(),
        deltas,
        base_hashes: solved.base_hashes,
        text_encoder_hash: te_hash,
        timings: EditTimings { encode_s: solved.encode_s, solve_s, apply_s: t1.elapsed().as_secs_f64() },
        residuals: solved.residuals,
        warnings: solved.warnings,
    })
}
