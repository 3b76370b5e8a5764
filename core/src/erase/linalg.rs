//! Dense f64 linear algebra on the host (faer). Matrices act on column vectors: W is d_out × d_in, keys are columns.

use burn::tensor::{Device, Tensor, TensorData};
use faer::linalg::solvers::{DenseSolveCore, Solve};
use faer::{Mat, Side};

use crate::error::{Error, Result};

pub type M = Mat<f64>;

pub fn zeros(r: usize, c: usize) -> M {
    Mat::zeros(r, c)
}

pub fn identity(n: usize) -> M {
    Mat::identity(n, n)
}

/// Columns `cols` side by side (each a `d`-vector).
pub fn from_columns(d: usize, cols: &[Vec<f64>]) -> M {
    Mat::from_fn(d, cols.len(), |i, j| cols[j][i])
}

pub fn hcat(a: &M, b: &M) -> M {
    assert_eq!(a.nrows(), b.nrows());
    Mat::from_fn(a.nrows(), a.ncols() + b.ncols(), |i, j| if j < a.ncols() { a[(i, j)] } else { b[(i, j - a.ncols())] })
}

pub fn transpose(a: &M) -> M {
    a.transpose().to_owned()
}

pub fn frob(a: &M) -> f64 {
    a.norm_l2()
}

/// Solves `A X = B` for symmetric positive-definite `A` (Cholesky). When `A` is not numerically SPD, falls back
/// to the eigen-decomposition pseudo-inverse and says so in the log; a matrix with no usable spectrum is an error.
pub fn spd_solve(a: &M, b: &M, what: &str) -> Result<M> {
    match a.llt(Side::Lower) {
        Ok(llt) => Ok(llt.solve(b)),
        Err(_) => {
            tracing::warn!("{what}: matrix is not positive definite; using the pseudo-inverse");
            Ok(sym_pinv(a, 1e-12, what)? * b)
        }
    }
}

/// Eigen-decomposition of a symmetric matrix: eigenvalues ascending and the eigenvectors as columns.
pub fn sym_eigen(a: &M, what: &str) -> Result<(Vec<f64>, M)> {
    let e = a
        .self_adjoint_eigen(Side::Lower)
        .map_err(|e| Error::Internal(format!("{what}: eigen-decomposition failed: {e:?}")))?;
    let s = e.S().column_vector();
    let vals = (0..a.nrows()).map(|i| s[i]).collect();
    Ok((vals, e.U().to_owned()))
}

/// Pseudo-inverse of a symmetric matrix, dropping eigenvalues below `rel_tol × max|λ|`.
pub fn sym_pinv(a: &M, rel_tol: f64, what: &str) -> Result<M> {
    let (vals, u) = sym_eigen(a, what)?;
    let max = vals.iter().fold(0f64, |m, v| m.max(v.abs()));
    if !(max > 0.0) || !max.is_finite() {
        return Err(Error::Internal(format!("{what}: matrix is zero or not finite")));
    }
    let n = a.nrows();
    let inv: Vec<f64> = vals.iter().map(|&v| if v.abs() > rel_tol * max { 1.0 / v } else { 0.0 }).collect();
    let scaled = Mat::from_fn(n, n, |i, k| u[(i, k)] * inv[k]);
    Ok(scaled * u.transpose())
}

/// Orthonormal basis (columns) of the span of `a`'s columns, keeping directions whose singular value exceeds
/// `rel_tol × σ_max`.
pub fn orth_basis(a: &M, rel_tol: f64, what: &str) -> Result<M> {
    if a.ncols() == 0 {
        return Ok(zeros(a.nrows(), 0));
    }
    let gram = a * a.transpose();
    let (vals, u) = sym_eigen(&gram, what)?;
    let max = vals.iter().fold(0f64, |m, v| m.max(*v));
    // Largest singular value first.
    // Eigenvalues of the Gram are σ²; below ~1e-13 of the largest they are rounding noise.
    let cut = (rel_tol * rel_tol).max(1e-13) * max;
    let keep: Vec<usize> = (0..vals.len()).rev().filter(|&i| vals[i] > cut).collect();
    Ok(Mat::from_fn(a.nrows(), keep.len(), |i, j| u[(i, keep[j])]))
}

/// The first `n` columns of `a` (all of them when it has fewer).
pub fn first_cols(a: &M, n: usize) -> M {
    a.subcols(0, n.min(a.ncols())).to_owned()
}

/// Orthonormal basis of the orthogonal complement of the orthonormal columns `u` in R^d.
pub fn complement(u: &M, d: usize, what: &str) -> Result<M> {
    let p = identity(d) - u * u.transpose();
    let (vals, v) = sym_eigen(&p, what)?;
    let keep: Vec<usize> = (0..d).filter(|&i| vals[i] > 0.5).collect();
    Ok(Mat::from_fn(d, keep.len(), |i, j| v[(i, keep[j])]))
}

/// General square solve `A X = B` (LU with partial pivoting).
pub fn lu_solve(a: &M, b: &M) -> M {
    a.partial_piv_lu().solve(b)
}

pub fn lu_inverse(a: &M) -> M {
    a.partial_piv_lu().inverse()
}

/// Minimum-norm least-squares solution operator for `X`'s columns: returns `X (XᵀX)⁺` (d × n), so that
/// `Δ = R · (X (XᵀX)⁺)ᵀ` satisfies `Δ X = R` exactly when X has full column rank.
pub fn right_pinv_factor(x: &M, what: &str) -> Result<M> {
    if x.nrows() < x.ncols() {
        // X(XᵀX)⁺ = (XXᵀ)⁺X: factor the smaller Gram (e.g. 256² instead of 2,700² for a text-encoder edit with
        // many aligned positions). The nonzero eigenvalues, and so the cut-off, are the same.
        let g = x * x.transpose();
        return Ok(sym_pinv(&g, 1e-10, what)? * x);
    }
    let g = x.transpose() * x;
    let gi = sym_pinv(&g, 1e-10, what)?;
    Ok(x * gi)
}

pub fn to_f32(a: &M) -> Vec<f32> {
    let mut v = Vec::with_capacity(a.nrows() * a.ncols());
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            v.push(a[(i, j)] as f32);
        }
    }
    v
}

pub fn from_f32(rows: usize, cols: usize, v: &[f32]) -> M {
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j] as f64)
}

/// Hidden states `[1, s, d]` (the first batch entry of `[b, s, d]`) as a d × s matrix, one column per token.
pub fn from_hidden(t: Tensor<3>) -> Result<M> {
    let [_, s, d] = t.dims();
    let v = crate::tensor::to_f32_vec(t)?;
    Ok(M::from_fn(d, s, |i, j| v[j * d + i] as f64))
}

/// A d × s matrix as hidden states `[1, s, d]` on `device` (f32).
pub fn to_hidden(m: &M, device: &Device) -> Tensor<3> {
    let (d, s) = (m.nrows(), m.ncols());
    let v: Vec<f32> = (0..s).flat_map(|j| (0..d).map(move |i| (j, i))).map(|(j, i)| m[(i, j)] as f32).collect();
    Tensor::<3>::from_data(TensorData::new(v, [1, s, d]), device)
}

/// A burn `Linear` weight, stored d_in × d_out, as W (d_out × d_in).
pub fn from_linear_weight(w: Tensor<2>) -> Result<M> {
    let [d_in, d_out] = crate::kernels::logical_dims(&w);
    let v = crate::tensor::to_f32_vec(w)?;
    Ok(M::from_fn(d_out, d_in, |o, i| v[i * d_out + o] as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spd_solve_solves() {
        let a = Mat::from_fn(3, 3, |i, j| if i == j { 4.0 } else { 1.0 });
        let b = Mat::from_fn(3, 2, |i, j| (i + j) as f64);
        let x = spd_solve(&a, &b, "t").unwrap();
        assert!(frob(&(&a * &x - &b)) < 1e-12);
    }

    #[test]
    fn right_pinv_factor_is_the_same_from_either_gram() {
        // Wide (3 × 5, rank 2: the two paths must also agree on what is "zero") and tall.
        let wide = Mat::from_fn(3, 5, |i, j| ((i + 1) * (j + 2)) as f64 + if i == 2 { j as f64 } else { 0.0 });
        for x in [wide.clone(), wide.transpose().to_owned()] {
            let fast = right_pinv_factor(&x, "t").unwrap();
            let direct = &x * sym_pinv(&(x.transpose() * &x), 1e-10, "t").unwrap();
            assert!(frob(&(&fast - &direct)) < 1e-9 * frob(&direct), "{:e}", frob(&(&fast - &direct)));
            // Δ = R·factorᵀ reproduces R on X's columns when it can (Penrose: X X⁺ X = X).
            assert!(frob(&(&x * fast.transpose() * &x - &x)) < 1e-9 * frob(&x));
        }
    }

    #[test]
    fn hidden_states_round_trip_through_a_matrix() {
        let m = Mat::from_fn(3, 5, |i, j| (10 * i + j) as f64);
        let t = to_hidden(&m, &Device::flex());
        assert_eq!(t.dims(), [1, 5, 3]);
        let back = from_hidden(t).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn complement_is_orthogonal() {
        let a = Mat::from_fn(5, 2, |i, j| (i * 3 + j) as f64 + 1.0);
        let u = orth_basis(&a, 1e-9, "t").unwrap();
        assert_eq!(u.ncols(), 2);
        let c = complement(&u, 5, "t").unwrap();
        assert_eq!(c.ncols(), 3);
        assert!(frob(&(c.transpose() * &u)) < 1e-10);
    }
}
