//! The ridge family: UCE, TIME and RECE (cited in [`super`]).
//!
//! UCE/TIME: ΔW = W₀(K_G − K_E)·S·(M⁻¹K_E)ᵀ with M = λI + K_E S K_Eᵀ + s_p G; TIME differs only in its keys (all
//! 77 positions, aligned) and λ. RECE adds rounds: C′ = (λ_reg I + Σ W′ᵀW′)⁻¹(Σ W′ᵀW₀)C is erased towards " " by a
//! ridge edit anchored at the current W′.

use super::context::UnetEdit;
use super::linalg::{self, M, hcat, identity, zeros};
use super::matrices::{Component, Delta};
use crate::error::{Error, Result};

/// X-factor of the (optionally constrained) ridge solve: M⁻¹K, or N(NᵀMN)⁻¹NᵀK when ΔW must vanish on span(pin).
pub fn ridge_factor(m: &M, k: &M, pin: Option<&M>) -> Result<M> {
    match pin {
        None => linalg::spd_solve(m, k, "ridge system"),
        Some(u) if u.ncols() == 0 => linalg::spd_solve(m, k, "ridge system"),
        Some(u) => {
            let n = linalg::complement(u, m.nrows(), "pinned keys")?;
            if n.ncols() == 0 {
                return Err(Error::InvalidRequest(
                    "the pinned keys span the whole key space: nothing is left to edit".into(),
                ));
            }
            let small = n.transpose() * m * &n;
            let y = linalg::spd_solve(&small, &(n.transpose() * k), "constrained ridge system")?;
            Ok(&n * y)
        }
    }
}

/// UCE and TIME: one ridge edit of every targeted projection.
pub fn uce(cx: &UnetEdit) -> Result<Vec<Delta>> {
    let (spec, d) = (cx.spec, cx.d);
    let s = spec.erase_scale;
    let m = identity(d) * spec.lambda + (&cx.ke * cx.ke.transpose()) * s + &cx.gram * spec.preserve_scale;
    let x = ridge_factor(&m, &cx.ke, cx.pin.as_ref())?;
    let diff = (&cx.kg - &cx.ke) * s;
    Ok(cx.names.iter().zip(&cx.w0).map(|(n, w)| Delta {
        component: Component::Unet,
        name: n.clone(),
        r: w * &diff,
        x: x.clone(),
    }).collect())
}

/// RECE: the UCE edit, then `spec.rounds` rounds of erasing the closed-form adversarial embedding.
pub fn rece(cx: &mut UnetEdit) -> Result<Vec<Delta>> {
    let mut deltas = uce(cx)?;
    let extras = rece_rounds(cx, &deltas)?;
    for (delta, extra) in deltas.iter_mut().zip(extras) {
        if extra.0.ncols() > 0 {
            delta.r = hcat(&delta.r, &extra.0);
            delta.x = hcat(&delta.x, &extra.1);
        }
    }
    Ok(deltas)
}

/// RECE's rounds after the first edit. Returns, per matrix, the extra (R, X) columns of all rounds.
fn rece_rounds(cx: &mut UnetEdit, first: &[Delta]) -> Result<Vec<(M, M)>> {
    let (spec, d) = (cx.spec, cx.d);
    let mut current: Vec<M> = cx.w0.iter().zip(first).map(|(w, dl)| w + dl.dense()).collect();
    let mut extra: Vec<(M, M)> = cx.names.iter().map(|_| (zeros(0, 0), zeros(0, 0))).collect();
    if spec.rounds == 0 {
        return Ok(extra);
    }
    let (guide, _) = cx.keys.hidden(" ", None)?;
    for round in 0..spec.rounds {
        // C′ = (λ_reg I + Σ W′ᵀW′)⁻¹ (Σ W′ᵀW₀) C for each concept's full 77-token embedding.
        let mut a = identity(d) * spec.lambda_reg;
        let mut b = zeros(d, d);
        for (wc, w) in current.iter().zip(&cx.w0) {
            a += wc.transpose() * wc;
            b += wc.transpose() * w;
        }
        let mut ke_cols = vec![];
        let mut kg_cols = vec![];
        for item in &spec.erase {
            let (c, _) = cx.keys.hidden(&item.concept, None)?;
            let adv = linalg::spd_solve(&a, &(&b * &c), "RECE embedding")?;
            for j in 0..adv.ncols() {
                ke_cols.push(adv.col(j).iter().copied().collect::<Vec<f64>>());
                kg_cols.push(guide.col(j).iter().copied().collect::<Vec<f64>>());
            }
        }
        let ke = linalg::from_columns(d, &ke_cols);
        let kg = linalg::from_columns(d, &kg_cols);
        // UCE step anchored at the current weights: λ = 0.1, preserve " " (and the spec's preserve set) at 0.1.
        let mut gram = &guide * guide.transpose();
        for p in &spec.preserve {
            let (h, _) = cx.keys.hidden(p, None)?;
            gram += &h * h.transpose();
        }
        let m = identity(d) * 0.1 + &ke * ke.transpose() * spec.erase_scale + gram * spec.preserve_scale;
        let x = ridge_factor(&m, &ke, cx.pin.as_ref())?;
        let diff = (&kg - &ke) * spec.erase_scale;
        for (i, wc) in current.iter_mut().enumerate() {
            let r = &*wc * &diff;
            *wc += &r * x.transpose();
            let (er, ex) = &extra[i];
            extra[i] = if er.ncols() == 0 { (r, x.clone()) } else { (hcat(er, &r), hcat(ex, &x)) };
        }
        tracing::info!("RECE round {}: adversarial embedding erased", round + 1);
    }
    Ok(extra)
}
