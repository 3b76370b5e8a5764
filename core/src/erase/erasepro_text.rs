//! `erasepro-text`: ErasePro's zero-residual edit (cited in [`super`]) applied progressively to the text encoder.
//!
//! Layer by layer, `mlp.fc2` is changed (minimum norm) so that the concept prompts' layer outputs equal the
//! replacement prompts' outputs in the original encoder at the aligned positions, with the features recomputed
//! through the already-edited layers. `fc2` is the last linear map before each layer's residual sum, so its edit
//! sets the layer output directly, and it is the widest input (intermediate size), which leaves the most room for
//! zero residual.

use std::collections::BTreeMap;
use std::time::Instant;

use super::context::fit_pin;
use super::keys::align;
use super::linalg::{self, M, from_columns, hcat};
use super::matrices::{Component, Delta, apply_delta, hash_matrix, read_weight};
use super::spec::Spec;
use crate::error::Result;
use crate::load::StableDiffusion;
use crate::tensor::token_ids;
use crate::tokenizer::Tokens;

/// What the progressive edit computed (applied by [`super::erase`]).
pub struct TextEdit {
    pub deltas: Vec<Delta>,
    pub base_hashes: BTreeMap<String, String>,
    pub residuals: Vec<(String, f64)>,
    pub warnings: Vec<String>,
    pub encode_s: f64,
}

/// The features entering `mlp.fc2` of layer `l` for `ids`, through `sd`'s (possibly already edited) layers
/// 0..l: `(mid, act)` as d × s matrices (see `ClipEncoderLayer::forward_parts`).
fn layer_inputs(sd: &StableDiffusion, l: usize, ids: &[u32]) -> Result<(M, M)> {
    let layers = &sd.text_encoder.text_model.encoder.layers;
    let mut x = sd.text_encoder.embed(token_ids(ids, sd.dev()));
    for layer in &layers[..l] {
        x = layer.forward(x);
    }
    let (mid, act) = layers[l].forward_parts(x);
    Ok((linalg::from_hidden(mid)?, linalg::from_hidden(act)?))
}

/// Computes the edit of every layer of `sd`'s text encoder (which `sd` itself keeps unedited).
pub fn erasepro_text(sd: &StableDiffusion, spec: &Spec) -> Result<TextEdit> {
    let t0 = Instant::now();
    let mut work = sd.clone(); // cheap: tensors are shared until edited
    let n_layers = sd.text_encoder.text_model.encoder.layers.len();
    // Pairs of (concept prompt, replacement prompt) and their aligned positions from the first differing token.
    let mut pairs: Vec<(Tokens, Tokens, Vec<(usize, usize)>)> = vec![];
    for item in &spec.erase {
        for t in &spec.templates {
            let c = sd.tokenizer.encode(&Spec::fill(t, &item.concept))?;
            let r = sd.tokenizer.encode(Spec::fill(t, &item.replace_with).trim())?;
            let prefix = c.ids.iter().zip(&r.ids).take_while(|(a, b)| a == b).count();
            let map: Vec<(usize, usize)> = align(&c, &r).into_iter().filter(|(p, _)| *p >= prefix).collect();
            pairs.push((c, r, map));
        }
    }
    let null = sd.tokenizer.encode("")?;
    // Original per-layer outputs of the replacement prompts (hidden_states[l + 1]).
    let mut original: Vec<Vec<M>> = vec![];
    for (_, r, _) in &pairs {
        let mut outs = vec![];
        sd.text_encoder.forward_traced(token_ids(&r.ids, sd.dev()), &mut |k, t| {
            if k > 0 {
                outs.push(t.clone());
            }
        });
        original.push(outs.into_iter().map(linalg::from_hidden).collect::<Result<_>>()?);
    }
    let mut base_hashes = BTreeMap::new();
    for l in 0..n_layers {
        let name = format!("text_model.encoder.layers.{l}.mlp.fc2");
        let w = read_weight(&sd.text_encoder.text_model.encoder.layers[l].mlp.fc2)?;
        base_hashes.insert(format!("text_encoder.{name}"), hash_matrix(&w));
    }
    let encode_s = t0.elapsed().as_secs_f64();

    let mut deltas = vec![];
    let mut residuals = vec![];
    let mut warnings = vec![];
    for l in 0..n_layers {
        let fc2 = &work.text_encoder.text_model.encoder.layers[l].mlp.fc2;
        let w = read_weight(fc2)?;
        let bias: Vec<f64> = match &fc2.bias {
            Some(b) => crate::tensor::to_f32_vec(b.val())?.into_iter().map(f64::from).collect(),
            None => vec![0.0; w.nrows()],
        };
        let (mut a_cols, mut t_cols) = (vec![], vec![]);
        for (i, (c, _, map)) in pairs.iter().enumerate() {
            let (mid, act) = layer_inputs(&work, l, &c.ids)?;
            for &(p, q) in map {
                a_cols.push(act.col(p).iter().copied().collect::<Vec<f64>>());
                t_cols.push((0..w.nrows()).map(|o| original[i][l][(o, q)] - mid[(o, p)] - bias[o]).collect::<Vec<f64>>());
            }
        }
        let a = from_columns(w.ncols(), &a_cols);
        let target = from_columns(w.nrows(), &t_cols);
        let r = &target - &w * &a;
        let z = if spec.pin_unconditional {
            // Pinned exactly: the null prompt (all positions), so the unconditional branch keeps its encoding.
            // (Pinning the replacement prompts too conflicts with the constraints themselves: a concept prompt's
            // padding positions must move while the replacement's nearly identical ones must not.)
            // Also pinned: the concept prompts' own positions before the concept (their template prefix), which
            // must keep their encoding for the whole context to equal the replacement's.
            let (_, act_null) = layer_inputs(&work, l, &null.ids)?;
            let mut pinned = act_null;
            for (c, _, map) in &pairs {
                let prefix = map.first().map(|m| m.0).unwrap_or(0);
                if prefix > 1 {
                    let (_, act_c) = layer_inputs(&work, l, &c.ids[..prefix])?;
                    pinned = hcat(&pinned, &act_c);
                }
            }
            let u = fit_pin(linalg::orth_basis(&pinned, 1e-7, "null-text activations")?, a.nrows(), a.ncols(),
                            &format!("layer {l} null-text and prefix activations"), &mut warnings);
            hcat(&a, &u)
        } else {
            a.clone()
        };
        let x = linalg::right_pinv_factor(&z, "erasepro-text constraints")?.subcols(0, a.ncols()).to_owned();
        let name = format!("text_model.encoder.layers.{l}.mlp.fc2");
        let delta = Delta { component: Component::TextEncoder, name: name.clone(), r, x }.compact();
        let res = linalg::frob(&(&delta.dense() * &a - (&target - &w * &a))) / linalg::frob(&target).max(1e-30);
        residuals.push((name, res));
        apply_delta(&mut work, &delta)?;
        deltas.push(delta);
    }
    Ok(TextEdit { deltas, base_hashes, residuals, warnings, encode_s })
}
