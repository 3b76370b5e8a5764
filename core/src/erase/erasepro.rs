//! ErasePro on the UNet's cross-attention (cited in [`super`]): min ‖W − W₀‖_F s.t. W K_E = W₀ K_G (and W U = W₀ U
//! for the pinned keys U), i.e. ΔW = W₀(K_G − K_E)·(Z⁺)ᵀ restricted to K_E's columns, with Z = [K_E U].

use super::context::UnetEdit;
use super::linalg::{self, hcat};
use super::matrices::{Component, Delta};
use crate::error::Result;

/// The zero-residual edit of every targeted projection, with its per-matrix residual ‖ΔW K_E − W₀(K_G − K_E)‖ /
/// ‖W₀(K_G − K_E)‖.
pub fn erasepro(cx: &UnetEdit) -> Result<(Vec<Delta>, Vec<(String, f64)>)> {
    let (ke, kg) = (&cx.ke, &cx.kg);
    let z = match &cx.pin {
        Some(u) => hcat(ke, u),
        None => ke.clone(),
    };
    let full = linalg::right_pinv_factor(&z, "erasepro constraints")?;
    let x = full.subcols(0, ke.ncols()).to_owned();
    let diff = kg - ke;
    let mut residuals = vec![];
    let deltas = cx.names.iter().zip(&cx.w0).map(|(n, w)| {
        let r = w * &diff;
        let dw = &r * x.transpose();
        let res = linalg::frob(&(&dw * ke - &r)) / linalg::frob(&r).max(1e-30);
        residuals.push((n.clone(), res));
        Delta { component: Component::Unet, name: n.clone(), r, x: x.clone() }
    }).collect();
    Ok((deltas, residuals))
}
