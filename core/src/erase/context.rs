//! What every cross-attention edit starts from ([`UnetEdit`]): the targeted projections W₀ and their hashes, the
//! (concept, guide) key pairs, the preservation Gram and the pinned null-text keys; and how a pinned basis is fitted
//! into a narrow model ([`fit_pin`]).

use std::collections::BTreeMap;
use std::time::Instant;

use super::gram::preservation_gram;
use super::keys::{Keys, erase_pairs};
use super::linalg::{self, M};
use super::matrices::{Component, cross_attention_names, hash_matrix, read_matrix};
use super::spec::{Method, Spec};
use crate::error::{Error, Result};
use crate::load::StableDiffusion;

/// The shared context of a cross-attention edit (UCE, TIME, RECE, SPEED, ErasePro).
pub struct UnetEdit<'a> {
    pub spec: &'a Spec,
    pub keys: Keys<'a>,
    /// Hash of the text encoder the keys come from (the key of the disk cache).
    pub te_hash: String,
    /// The targeted projections (`…attn2.to_k|to_v`) and their base weights W₀ (d_out × d).
    pub names: Vec<String>,
    pub w0: Vec<M>,
    /// Key width (the text encoder's hidden size).
    pub d: usize,
    /// Concept keys K_E and guide keys K_G (d × n, column-paired).
    pub ke: M,
    pub kg: M,
    /// Preservation Gram G (d × d).
    pub gram: M,
    /// Orthonormal basis of keys ΔW must leave unchanged (`pin_unconditional`).
    pub pin: Option<M>,
    pub base_hashes: BTreeMap<String, String>,
    pub warnings: Vec<String>,
    pub encode_s: f64,
}

impl<'a> UnetEdit<'a> {
    /// Reads the projections `spec.targets` names and encodes every prompt the edit needs.
    pub fn prepare(sd: &'a StableDiffusion, spec: &'a Spec, te_hash: &str) -> Result<Self> {
        let t0 = Instant::now();
        let names = cross_attention_names(&sd.unet, &spec.targets);
        if names.is_empty() {
            return Err(Error::InvalidModel { path: "unet".into(), message: "the UNet has no cross-attention".into() });
        }
        let w0 = names.iter().map(|n| read_matrix(sd, Component::Unet, n)).collect::<Result<Vec<M>>>()?;
        let d = w0[0].ncols();
        let base_hashes = names.iter().zip(&w0).map(|(n, w)| (format!("unet.{n}"), hash_matrix(w))).collect();
        let mut keys = Keys::new(sd);
        let (ke, kg) = erase_pairs(&mut keys, spec, d)?;
        let (gram, _) = preservation_gram(&mut keys, spec, te_hash, d)?;
        let mut warnings = vec![];
        let pin = if spec.pin_unconditional {
            // Zero-residual edits need a free dimension per edited key; ridge edits only need some room.
            let n_edit = if spec.method == Method::Erasepro { ke.ncols() } else { 1 };
            Some(fit_pin(keys.null_text_basis()?, d, n_edit, "pin_unconditional", &mut warnings))
        } else {
            None
        };
        Ok(Self { spec, keys, te_hash: te_hash.to_string(), names, w0, d, ke, kg, gram, pin, base_hashes, warnings,
                  encode_s: t0.elapsed().as_secs_f64() })
    }
}

/// Fits a pinned basis (orthonormal, strongest direction first) into a `d`-dimensional space that must keep
/// `n_edit` free dimensions for the edit. On a narrow model (d close to 77) the null-text keys can span almost the
/// whole space; then only their strongest directions are pinned, and a warning says so.
pub fn fit_pin(u: M, d: usize, n_edit: usize, what: &str, warnings: &mut Vec<String>) -> M {
    let room = d.saturating_sub(n_edit.max(1));
    if u.ncols() <= room {
        return u;
    }
    let msg = format!(
        "{what}: the pinned keys span {} of {d} dimensions and the edit needs {n_edit}; only the {room} strongest \
         directions are pinned, so the pin is approximate on this model (it is exact when the width exceeds the \
         pinned rank plus the edited keys, e.g. on SD-1.x's 768)",
        u.ncols()
    );
    tracing::warn!("{msg}");
    warnings.push(msg);
    linalg::first_cols(&u, room)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_pin_keeps_room_for_the_edit() {
        let u = linalg::identity(6);
        let mut warnings = vec![];
        // Enough room: unchanged, no warning.
        assert_eq!(fit_pin(linalg::first_cols(&u, 3), 6, 2, "t", &mut warnings).ncols(), 3);
        assert!(warnings.is_empty());
        // Too many pinned directions: the strongest (first) ones that leave n_edit free, with a warning.
        let fitted = fit_pin(u.clone(), 6, 2, "t", &mut warnings);
        assert_eq!(fitted.ncols(), 4);
        assert_eq!(fitted, linalg::first_cols(&u, 4));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("approximate"), "{}", warnings[0]);
        // n_edit = 0 still keeps one free dimension.
        assert_eq!(fit_pin(u, 6, 0, "t", &mut warnings).ncols(), 5);
    }
}
