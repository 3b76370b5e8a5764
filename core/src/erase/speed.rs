//! SPEED (cited in [`super`]): the ridge edit restricted to the null space of the preserved keys (after IPF
//! filtering and DPA augmentation) and of the null-text keys (IEC), so those keys are left exactly unchanged.

use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::context::{UnetEdit, fit_pin};
use super::gram::{last_token_keys, preserve_prompts};
use super::linalg::{self, M, from_columns, hcat, identity};
use super::matrices::{Component, Delta};
use super::ridge::ridge_factor;
use crate::error::Result;

/// SPEED's null-space edit for each matrix: ΔW = R·Xᵀ with R = W(C* − C₁)/n and X from the ridge system
/// αI + C₁C₁ᵀ/n restricted to the complement of span(preserved keys with eigenvalue ≥ τ, null-text keys).
pub fn speed(cx: &mut UnetEdit) -> Result<Vec<Delta>> {
    let spec = cx.spec;
    let (c1, cs, d) = (&cx.ke, &cx.kg, cx.d);
    let n = c1.ncols() as f64;
    let s_tt = (c1 * c1.transpose()) * (1.0 / n);
    // IPF's influence of a key k on layer W is ‖E k‖ with E = W·P, P = (C* − C₁)C₁ᵀ(I + C₁C₁ᵀ/n)⁻¹/n: P is shared
    // by every layer.
    let p = (cs - c1) * (1.0 / n) * c1.transpose() * linalg::lu_inverse(&(identity(d) + &s_tt));
    // Retain keys: last subject tokens of preserve prompts that do not mention an erased concept (IPF, step 1),
    // from the same cached key matrix as the preservation Gram (not encoded again).
    let words: Vec<String> = spec.erase.iter().map(|e| e.concept.to_lowercase()).collect();
    let all = last_token_keys(&mut cx.keys, &preserve_prompts(spec), &cx.te_hash, d)?;
    let nt = spec.templates.len();
    let retain_cols: Vec<usize> = spec
        .preserve
        .iter()
        .enumerate()
        .filter(|(_, p)| !words.iter().any(|w| p.to_lowercase().contains(w)))
        .flat_map(|(i, _)| i * nt..(i + 1) * nt)
        .collect();
    let retain = M::from_fn(d, retain_cols.len(), |i, j| all[(i, retain_cols[j])]);
    // IEC: [SOT] of "" and 3 k-means centroids of its tokens 1..76; with pin_unconditional, all 77 null-text keys.
    let iec = match &cx.pin {
        Some(u) => u.clone(),
        None => {
            let (h, _) = cx.keys.hidden("", None)?;
            let mut cols = vec![h.col(0).iter().copied().collect::<Vec<f64>>()];
            cols.extend(kmeans(&(1..h.ncols()).map(|j| h.col(j).iter().copied().collect()).collect::<Vec<_>>(), 3));
            from_columns(d, &cols)
        }
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut out = vec![];
    for (name, w) in cx.names.iter().zip(&cx.w0) {
        let e = w * &p;
        // The columns of `ks` whose influence ‖E k‖ is above their mean.
        let above_mean = |ks: M| -> M {
            if ks.ncols() == 0 {
                return ks;
            }
            let ek = &e * &ks;
            let norms: Vec<f64> = (0..ks.ncols()).map(|j| ek.col(j).norm_l2()).collect();
            let mean = norms.iter().sum::<f64>() / norms.len() as f64;
            let keep: Vec<usize> = (0..ks.ncols()).filter(|&j| norms[j] > mean).collect();
            M::from_fn(d, keep.len(), |i, j| ks[(i, keep[j])])
        };
        let mut kept = if spec.filter { above_mean(retain.clone()) } else { retain.clone() };
        // DPA: perturb kept keys along W's smallest right-singular direction, keep the influential ones.
        if spec.augment > 0 && kept.ncols() > 0 {
            let (_, vecs) = linalg::sym_eigen(&(w.transpose() * w), "WᵀW")?;
            let mut eps: Vec<f64> = Vec::with_capacity(kept.ncols() * spec.augment);
            for _ in 0..kept.ncols() * spec.augment {
                eps.push(StandardNormal.sample(&mut rng));
            }
            let aug = M::from_fn(d, eps.len(), |i, j| kept[(i, j / spec.augment)] + eps[j] * vecs[(i, 0)]);
            kept = hcat(&kept, &above_mean(aug));
        }
        let mut pinned = iec.clone();
        if kept.ncols() > 0 {
            let sigma0 = (&kept * kept.transpose()) * (1.0 / kept.ncols() as f64);
            let (vals, vecs) = linalg::sym_eigen(&sigma0, "retain covariance")?;
            let big: Vec<usize> = (0..d).filter(|&i| vals[i] >= spec.null_threshold).collect();
            let u = M::from_fn(d, big.len(), |i, j| vecs[(i, big[j])]);
            pinned = hcat(&u, &iec);
        }
        let basis = linalg::orth_basis(&pinned, 1e-9, "SPEED constraints")?;
        let basis = fit_pin(basis, d, 1, &format!("SPEED {name}"), &mut cx.warnings);
        let m = identity(d) * spec.retain_scale + &s_tt;
        let x = ridge_factor(&m, &(c1 * (1.0 / n)), Some(&basis))?;
        out.push(Delta { component: Component::Unet, name: name.clone(), r: w * (cs - c1), x });
    }
    Ok(out)
}

/// Deterministic k-means (Lloyd, evenly spaced initial centres, 25 iterations). Returns at most `k` centres
/// (fewer when there are fewer points; none for no points).
fn kmeans(points: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    let k = k.min(points.len());
    if k == 0 {
        return vec![];
    }
    let mut centres: Vec<Vec<f64>> = (0..k).map(|i| points[i * points.len() / k].clone()).collect();
    for _ in 0..25 {
        let mut sums = vec![vec![0.0; points[0].len()]; k];
        let mut counts = vec![0usize; k];
        for p in points {
            let c = (0..k)
                .min_by(|&a, &b| dist2(p, &centres[a]).total_cmp(&dist2(p, &centres[b])))
                .unwrap_or(0);
            counts[c] += 1;
            for (s, x) in sums[c].iter_mut().zip(p) {
                *s += x;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                centres[c] = sums[c].iter().map(|s| s / counts[c] as f64).collect();
            }
        }
    }
    centres
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kmeans_finds_separated_clusters() {
        // Three tight clusters around (0, 0), (10, 0) and (0, 10), one after the other.
        let mut points = vec![];
        for i in 0..9 {
            let jitter = (i % 3) as f64 * 0.1;
            let centre = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]][i / 3];
            points.push(vec![centre[0] + jitter, centre[1] - jitter]);
        }
        let mut centres = kmeans(&points, 3);
        centres.sort_by(|a, b| (a[0] + 2.0 * a[1]).total_cmp(&(b[0] + 2.0 * b[1])));
        for (c, want) in centres.iter().zip([[0.1, -0.1], [10.1, -0.1], [0.1, 9.9]]) {
            assert!(dist2(c, &want) < 1e-18, "{c:?} vs {want:?}");
        }
        // Fewer points than clusters, and none.
        assert_eq!(kmeans(&points[..2], 3).len(), 2);
        assert!(kmeans(&[], 3).is_empty());
    }
}
