//! CPU kernels for what burn's `flex` backend has no fast path for (burn 0.22.1).
//!
//! **Attention.** flex's fused `attention` (flash path for long sequences) and its `softmax` call the scalar libm
//! `expf` once per score: on a UNet step at 512² that is ~27 % of the time in `__expf` alone and ~90 % in attention
//! on the tiny model (`perf`, README *Benchmark*). [`attention`] computes the same
//! `softmax(Q Kᵀ · scale) V` a block of query rows at a time: one `gemm` for the scores of the block against every
//! key, stored column-major (the block's query rows are the vector lanes), a softmax across each column's lanes
//! with a vectorised `exp` (AVX-512 where the CPU has it; running maxima and sums held in registers, no horizontal
//! reductions), one `gemm` into the output and each row's `1/Σ` applied to its `d` outputs rather than its `seq`
//! probabilities; blocks run in parallel on rayon. It reads the `[batch, seq, heads·dim]` projections in place
//! (heads are strides, no split or permute copies) and is used only for f32 tensors on the CPU outside autodiff
//! (attacks and `harden` keep burn's differentiable op; wgpu keeps its own kernel).
//!
//! **Dequantization.** A quantized weight (burn `QFloat`, [`crate::quant`]) is dequantized by flex at every use in
//! one single-threaded loop that recomputes each value's block index with a division per dimension (`burn-flex`
//! 0.22.1 `dequantize`): a full-size int8 step took 1.5× the f32 step. [`dequantize`] does the same product
//! `scale × q` row by row, each row's scales a contiguous slice, on rayon; the modules call it through
//! [`crate::nn::Forward`] just before the matmul or conv, so the weight still stays quantized in memory.
//!
//! **Group norm (+ SiLU).** burn-nn's `GroupNorm` is a chain of tensor ops (reshape, mean, subtract, square, mean,
//! add, sqrt, divide, then the affine's multiply and add: ~8 passes over the activation, each into a fresh
//! allocation), and every UNet/VAE resnet follows it with a separate SiLU pass. [`group_norm`] reads each
//! (batch, group) slice twice (mean, then variance about the mean, both summed in f32 lanes and accumulated in f64)
//! and writes it once with the affine and, where the model applies one, the SiLU folded in; groups run on rayon.
//!
//! **Convolution.** flex's k×k convolution converts the whole input to NHWC on one thread, builds im2col tiles,
//! multiplies them into a scratch buffer and then scatters every result value to its NCHW place one at a time
//! (a strided scalar store: ~a third of a small VAE decode at 512² by `perf`, 16 % of a full-size UNet step at
//! 256²). [`conv2d`] builds each tile's columns in NCHW order (row copies, no layout change) in a per-thread buffer
//! it reuses, and lets `gemm` write the product straight into the NCHW output (its row stride is the output plane):
//! planes of ≥ 64×64 in tiles of ~256 positions in parallel, smaller planes (where the weight, up to 1,280 × 11,520
//! values, is the large operand) as one tile per image, or as few as keep the columns within 16 MiB, each product
//! split across the threads (`gemm`'s own threading left a core partly idle there). 1×1 convolutions stay with flex
//! (no im2col there; as fast as this kernel measured).
//!
//! **Linear layers and GEGLU.** flex's `matmul` allocates its output as zeroed bytes and copies it once more to
//! realign it (`FlexTensor::empty`), then adds the bias in another pass: on SD-1.5's `[2, 4096, 320]` projections
//! it ran at ~140 GFLOP/s where `gemm` alone gives ~340 on this CPU. [`linear`] has `gemm` write into a fresh
//! output that holds the bias already; [`geglu`] does diffusers' `GEGLU` (projection, halves, exact gelu, product)
//! a chunk of rows at a time, so the double-width projection is never allocated.
//!
//! **Reading tensors.** burn's `into_data` copies a buffer that another tensor shares (a weight, an activation
//! kept for a residual) twice; the kernels read flex's buffer in place (`flex_f32`).

use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::{Flex, flex::FlexTensor};
use burn::tensor::{DType, Device, Tensor, TensorData};
use rayon::prelude::*;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns these kernels off (burn's own ops are used instead) or back on, for the whole process: the benchmarks
/// measure both in one run, and a kernel can be ruled out when a result is in doubt.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Query rows per task for heads of ≥ 32 dimensions: the block's scores (`128 × 4,096` f32 for a 64² latent, 2 MiB)
/// stay in this CPU's L2, and `gemm` packs each head's keys and values once per 128 rows (measured against 64 and
/// 256: 10–20 % faster on SD-1.5's 40–160-dimension heads, README *Benchmark*).
const ROWS_WIDE: usize = 128;
/// Query rows per task for narrower heads (the tiny test models' 4–8), where the softmax dominates and 64 rows
/// keep its running maxima and sums in vector registers (128 measured 20 % slower on the tiny UNet at 512²).
const ROWS_NARROW: usize = 64;

/// Whether [`attention`] handles these operands: all f32, on the CPU, and none of them in autodiff (in an attack
/// only the keys and values may carry the gradient: the text side is the variable, the latents are not).
pub fn takes(operands: &[&Tensor<3>]) -> bool {
    ENABLED.load(Ordering::Relaxed)
        && operands.iter().all(|x| x.dtype() == DType::F32 && !x.is_autodiff() && x.device() == Device::flex())
}

/// A CPU f32 tensor as flex holds it, contiguous from the start of its own buffer, so that [`values`] reads it in
/// place and `storage_mut` changes it in place (or copies it once when another tensor shares the buffer). burn's
/// `into_data` copies a shared buffer (a module's weight, an activation kept for a residual) twice: flex copies the
/// values out, then cubecl's `Bytes::from_bytes_vec` copies them again to realign (burn-flex 0.22.1,
/// cubecl-environment 0.11.3). Only a view that is not already such a buffer is copied here, once. The caller has
/// checked that the tensor is f32 on the CPU ([`takes`], [`takes_image`]).
fn flex_f32<const D: usize>(t: Tensor<D>) -> FlexTensor {
    let t = t.try_into_primitive::<Flex>().expect("a CPU tensor, checked by the caller");
    let n = t.layout().num_elements();
    if t.layout().contiguous_offsets() == Some((0, n)) && t.bytes().len() == n * 4 { t } else { t.to_contiguous() }
}

/// The values of a tensor made by [`flex_f32`].
fn values(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("contiguous f32, made by `flex_f32`")
}

/// An f32 CPU tensor of `shape` holding `v`.
fn tensor<const D: usize>(v: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_primitive::<Flex>(FlexTensor::from_data(TensorData::new(v, shape)))
}

/// The smallest output (bytes) that [`output`] asks huge pages for: 32 MiB, glibc's largest dynamic mmap threshold,
/// so the buffer is always a mapping of its own there and the advice ends with it (below that, a freed block's
/// address range may be handed out again for unrelated small allocations, which would inherit the advice).
#[cfg_attr(not(any(target_os = "linux", target_os = "android")), allow(dead_code))]
const HUGE_FROM: usize = 32 << 20;

/// A zeroed buffer of `len` values for an output that is about to be written in full. From [`HUGE_FROM`] up the
/// allocator maps fresh pages, which the first writes fault in 4 KiB at a time; where Linux offers transparent huge
/// pages on request (`madvise` mode, as on this machine), the buffer asks for them, so those writes fault 2 MiB at
/// a time. Only advice: the contents and size are unchanged. Measured on the full-size VAE decode bench at 256²
/// (load and four decodes): 710,000 page faults and 8 % of the CPU time in the kernel before; with the advice from
/// 8 MiB 331,000, and 176,000 with [`group_norm`] writing a shared input's result straight into such a buffer too.
fn output(len: usize) -> Vec<f32> {
    let v = vec![0f32; len];
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if len * 4 >= HUGE_FROM {
        const HUGE: usize = 2 << 20;
        let (start, end) = (v.as_ptr() as usize, v.as_ptr() as usize + len * 4);
        let (start, end) = (start.next_multiple_of(HUGE), end / HUGE * HUGE);
        if end > start {
            // SAFETY: advice on whole pages inside this allocation, which it neither frees nor changes.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v
}

/// `softmax(q kᵀ · scale) v` per head, on `[batch, seq, heads·dim]` projections (`q` may have another sequence
/// length than `k`/`v`). Returns `[batch, seq_q, heads·dim]`. The caller checks [`takes`], that no dimension is 0
/// and that `heads` divides the width.
pub fn attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, scale: f32) -> Tensor<3> {
    let [b, sq, c] = q.dims();
    let sk = k.dims()[1];
    let (q, k, v) = (flex_f32(q), flex_f32(k), flex_f32(v));
    let (q, k, v) = (values(&q), values(&k), values(&v));
    let mut out = output(b * sq * c);
    let d = c / heads;
    let block_rows = if d >= 32 { ROWS_WIDE } else { ROWS_NARROW };
    // Tasks: (batch, block of query rows); each writes its own rows of `out` for every head.
    out.par_chunks_mut(sq * c).enumerate()
        .flat_map(|(batch, ob)| ob.par_chunks_mut(block_rows * c).enumerate().map(move |(block, o)| (batch, block, o)))
        .for_each(|(batch, block, o)| {
            let rows = o.len() / c;
            let row0 = batch * sq + block * block_rows;
            // The block's scores, then its probabilities, column-major (`rows` query rows per key), so that the
            // softmax runs across query rows in vector lanes; the head's output likewise (`rows` per column).
            let mut scores = vec![0f32; rows * sk];
            let mut out_h = vec![0f32; rows * d];
            let (mut max, mut sum) = (vec![0f32; rows], vec![0f32; rows]);
            for h in 0..heads {
                let q_ptr = q[row0 * c + h * d..].as_ptr();
                let k_ptr = k[batch * sk * c + h * d..].as_ptr();
                let v_ptr = v[batch * sk * c + h * d..].as_ptr();
                // SAFETY: every pointer/stride pair stays inside its slice: `rows` query rows of `c` values from
                // `row0`, `sk` key/value rows of `c` values from the batch's first row, `d` columns from `h·d`;
                // `scores` is `rows × sk` and `out_h` is `rows × d`, both column-major.
                unsafe {
                    // scores = scale · Q_h Kᵀ_h   (m = rows, n = sk, k = d)
                    gemm::gemm(rows, sk, d, scores.as_mut_ptr(), rows as isize, 1, false,
                               q_ptr, 1, c as isize, k_ptr, c as isize, 1,
                               0.0, scale, false, false, false, gemm::Parallelism::None);
                }
                softmax_columns(&mut scores, &mut max, &mut sum);
                unsafe {
                    // out_h = P V_h   (m = rows, n = d, k = sk), P not yet normalised
                    gemm::gemm(rows, d, sk, out_h.as_mut_ptr(), rows as isize, 1, false,
                               scores.as_ptr(), rows as isize, 1, v_ptr, 1, c as isize,
                               0.0, 1.0, false, false, false, gemm::Parallelism::None);
                }
                // Each row's normalisation on its `d` outputs rather than on its `sk` probabilities.
                for (r, (out, s)) in o.chunks_exact_mut(c).zip(&sum).enumerate() {
                    let inv = 1.0 / s;
                    for (j, x) in out[h * d..(h + 1) * d].iter_mut().enumerate() {
                        *x = out_h[j * rows + r] * inv;
                    }
                }
            }
        });
    tensor(out, [b, sq, c])
}

/// Whether `dtype` is a 4-bit weight as unsee holds it on the CPU: burn `QFloat` `Q4S` whose stored i8 values are
/// the file's bytes, **two 4-bit values each** ([`crate::quant`]: burn's CPU backend keeps one i8 per 4-bit value,
/// twice the memory). Such a tensor's shape is the weight's with the packed axis halved ([`logical_dims`]), and only
/// [`dequantize`] reads it.
pub fn is_packed4(dtype: DType) -> bool {
    matches!(dtype, DType::QFloat(s) if s.value == burn::tensor::quantization::QuantValue::Q4S)
}

/// The packed axis of a [`is_packed4`] tensor of rank `d`: a `Linear`'s `[in/2, out]` (0), a conv's
/// `[out, in/2, kh, kw]` (1).
pub fn packed_axis(d: usize) -> usize {
    if d == 2 { 0 } else { 1 }
}

/// The weight's dimensions: `w.dims()`, with the packed axis doubled for a [`is_packed4`] tensor.
pub fn logical_dims<const D: usize>(w: &Tensor<D>) -> [usize; D] {
    let mut dims = w.dims();
    if is_packed4(w.dtype()) {
        dims[packed_axis(D)] *= 2;
    }
    dims
}

/// The weight `w` as a float tensor whatever its storage: [`dequantize`], then burn's own `dequantize` for a
/// quantized tensor that kernel left (off the CPU, or autodiff).
pub fn dequantize_any<const D: usize>(w: Tensor<D>) -> crate::error::Result<Tensor<D>> {
    let w = dequantize(w);
    if is_packed4(w.dtype()) {
        // Never made: packed weights exist only on the CPU, where training and attacks refuse a bundle.
        return Err(crate::error::Error::Internal("a packed 4-bit weight off the CPU or under autodiff".into()));
    }
    Ok(if matches!(w.dtype(), DType::QFloat(_)) { w.dequantize() } else { w })
}

/// The weight `w` in f32 when it is a block-quantized `QFloat` tensor on the CPU (any rank, blocks over any leading
/// dimensions as long as the trailing dimension's block is 1, which covers every layout [`crate::quant`] loads);
/// anything else is returned as it is, for burn to handle. Same values as burn's `dequantize` (tested). A packed
/// 4-bit weight ([`is_packed4`]) is always unpacked here (even with the kernels off: burn cannot read it), into its
/// [`logical_dims`].
pub fn dequantize<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    let DType::QFloat(scheme) = w.dtype() else { return w };
    let packed = is_packed4(w.dtype());
    if (!packed && !ENABLED.load(Ordering::Relaxed)) || w.is_autodiff() || w.device() != Device::flex() {
        return w;
    }
    let Some(block) = scheme.block_size() else { return w };
    let dims = w.dims();
    // Block extents aligned to the trailing dimensions (burn drops leading 1s).
    let mut b = [1usize; D];
    let bs = block.as_slice();
    if bs.len() > D {
        return w;
    }
    for (i, &v) in bs.iter().enumerate() {
        b[D - bs.len() + i] = v as usize;
    }
    // The row: the trailing dimensions whose block is 1 (their scales are as contiguous as their values).
    let split = (0..D).rev().take_while(|&i| b[i] == 1).last().unwrap_or(D);
    if split == 0 || split == D || (0..split).any(|i| b[i] == 0 || dims[i] % b[i] != 0)
        || (packed && split - 1 != packed_axis(D)) {
        return w;
    }
    let row: usize = dims[split..].iter().product();
    let device = w.device();
    let data = w.into_data();
    let shape = data.shape().clone();
    let q = burn::tensor::quantization::QuantizedBytes { bytes: data.into_bytes(), scheme, shape };
    let (values, scales) = q.into_vec_i8();
    let (scales, global) = (scales.block, scales.global.unwrap_or(1.0));
    let grid: Vec<usize> = (0..split).map(|i| dims[i] / b[i]).collect();
    // A packed row r holds the values of rows 2r (low nibbles) and 2r + 1 (high nibbles): the packed axis is the
    // last one before the row.
    let unpack = if packed { 2 } else { 1 };
    let mut out = output(values.len() * unpack);
    // ~16 K values per task: a conv's row is only kh·kw values, so a fixed row count made ~1.5 M tiny tasks per
    // full-size UNet pass.
    let rows_per_task = (16_384 / row).max(1);
    out.par_chunks_mut(unpack * row * rows_per_task).enumerate().for_each(|(task, o)| {
        for (k, o) in o.chunks_exact_mut(unpack * row).enumerate() {
            let r = task * rows_per_task + k;
            // The row's block coordinates → its row of scales.
            let (mut rest, mut g, mut stride) = (r, 0, 1);
            for i in (0..split).rev() {
                g += (rest % dims[i]) / b[i] * stride;
                stride *= grid[i];
                rest /= dims[i];
            }
            let s = &scales[g * row..(g + 1) * row];
            let v = &values[r * row..(r + 1) * row];
            if packed {
                let (lo, hi) = o.split_at_mut(row);
                for (((lo, hi), &q), &s) in lo.iter_mut().zip(hi).zip(v).zip(s) {
                    *lo = global * s * ((q << 4) >> 4) as f32;
                    *hi = global * s * (q >> 4) as f32;
                }
            } else {
                for ((o, &q), &s) in o.iter_mut().zip(v).zip(s) {
                    *o = global * s * q as f32;
                }
            }
        }
    });
    let mut dims = dims;
    if packed {
        dims[packed_axis(D)] *= 2;
    }
    Tensor::from_data(TensorData::new(out, dims), &device)
}

/// An f16 weight in f32 on the CPU (a bundle keeps its layer weights in f16, [`crate::quant`]): chunks on rayon
/// through `half`'s slice conversion (F16C where the CPU has it), where burn flex's `cast` converts one value at a
/// time on one thread. `None` when it does not apply (not f16, not on flex, autodiff): the caller casts. Same values
/// as burn's cast (tested; f16 → f32 is exact).
pub fn widen_f16<const D: usize>(w: &Tensor<D>) -> Option<Tensor<D>> {
    if !ENABLED.load(Ordering::Relaxed) || w.is_autodiff() || w.device() != Device::flex() || w.dtype() != DType::F16 {
        return None;
    }
    use half::slice::HalfFloatSliceExt;
    let (dims, device) = (w.dims(), w.device());
    let data = w.clone().into_data();
    let v = data.as_slice::<half::f16>().ok()?;
    let mut out = output(v.len());
    out.par_chunks_mut(1 << 16).zip(v.par_chunks(1 << 16)).for_each(|(o, i)| i.convert_to_f32_slice(o));
    Some(Tensor::from_data(TensorData::new(out, dims), &device))
}

/// Nearest-neighbour upsampling by exactly 2 (every `Upsample2D` of the UNet and VAE) of `[b, c, h, w]`: each
/// value written twice into its output row, the row then copied below it; planes on rayon. burn flex's
/// `interpolate` gathers every output value through an index map in a scalar loop. Same values (tested). The
/// caller checks [`takes_image`].
pub fn upsample_nearest_2x(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let x = flex_f32(x);
    let v = values(&x);
    let (oh, ow) = (2 * h, 2 * w);
    let mut out = output(b * c * oh * ow);
    if h * w > 0 {
        out.par_chunks_mut(oh * ow).zip(v.par_chunks(h * w)).for_each(|(o, i)| {
            for (y, row) in i.chunks_exact(w).enumerate() {
                let (top, bottom) = o[2 * y * ow..(2 * y + 2) * ow].split_at_mut(ow);
                for (pair, &value) in top.chunks_exact_mut(2).zip(row) {
                    pair[0] = value;
                    pair[1] = value;
                }
                bottom.copy_from_slice(top);
            }
        });
    }
    tensor(out, [b, c, oh, ow])
}

/// A raw pointer shared by tasks that write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every task writes only its own part of the output (positions or channels, see [`conv2d`]).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

/// The largest column buffer (f32 values) of a small-plane [`conv2d`] tile, and the most a thread keeps between
/// calls: 16 MiB (a memory bound for phones and the low-memory engine; large planes use ~256-position tiles).
const SCRATCH_MAX: usize = 1 << 22;

thread_local! {
    /// [`conv2d`]'s im2col columns, one buffer per thread, kept up to [`SCRATCH_MAX`].
    static SCRATCH: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `conv2d` (groups 1, dilation 1) of `x: [b, c_in, h, w]` by `weight: [c_out, c_in, kh, kw]` (PyTorch layout) with
/// `stride` and padding `[[top, bottom], [left, right]]`, plus `bias`. Per tile of whole output rows: the columns
/// `[c_in·kh·kw, positions]` (row copies for stride 1, zeros in the padding), `gemm` into the output with the plane
/// as its row stride, then the bias. The caller checks [`takes_image`] for both tensors, the shapes, and that the
/// padded input covers the kernel.
///
/// Planes of ≥ 64×64 outputs: tiles of ~256 positions, in parallel, one single-threaded `gemm` each. Smaller planes
/// (a latent's lower levels): as few tiles as keep the columns within [`SCRATCH_MAX`], one after another, each
/// product split across the threads along its larger side — positions, or output channels when the weight is the
/// larger operand — so that only the smaller operand is packed again by every part. Against `gemm`'s own threading
/// on one tile (before), measured: 2,560 → 1,280 channels on 8×8 21 → 12 ms, 640 → 640 on 32×32 30 → 23 ms.
pub fn conv2d(x: Tensor<4>, weight: Tensor<4>, bias: Option<Vec<f32>>, stride: [usize; 2], pad: [[usize; 2]; 2])
    -> Tensor<4> {
    let [b, ci, h, w] = x.dims();
    let [co, _, kh, kw] = weight.dims();
    let oh = (h + pad[0][0] + pad[0][1] - kh) / stride[0] + 1;
    let ow = (w + pad[1][0] + pad[1][1] - kw) / stride[1] + 1;
    let (x, weight) = (flex_f32(x), flex_f32(weight));
    let (xv, wv) = (values(&x), values(&weight));
    let (k, plane) = (ci * kh * kw, oh * ow);
    let geom = Im2col { h, w, kh, kw, ow, stride, pad };
    let mut out = output(b * co * plane);
    let dst = SharedMut(out.as_mut_ptr());
    // SAFETY (for the callers below, which pass `c` within 0..co and `j` within 0..n): `wv` is co × k and the
    // columns k × n, both row-major; each call writes its own channels × positions of its batch's output block,
    // which no other call writes.
    let product = |dst: SharedMut, bi: usize, p0: usize, cols: &[f32], n: usize, c: std::ops::Range<usize>,
                   j: std::ops::Range<usize>| unsafe {
        gemm::gemm(c.len(), j.len(), k, dst.0.add(bi * co * plane + c.start * plane + p0 + j.start), 1,
                   plane as isize, false, wv.as_ptr().add(c.start * k), 1, k as isize, cols.as_ptr().add(j.start),
                   1, n as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        if let Some(bias) = &bias {
            for ch in c {
                let row = std::slice::from_raw_parts_mut(dst.0.add(bi * co * plane + ch * plane + p0 + j.start),
                                                         j.len());
                row.iter_mut().for_each(|v| *v += bias[ch]);
            }
        }
    };
    if plane >= 64 * 64 {
        let rows = (256 / ow).max(1);
        let tiles = oh.div_ceil(rows);
        (0..b * tiles).into_par_iter().for_each(|t| {
            let (bi, y0) = (t / tiles, t % tiles * rows);
            let y1 = (y0 + rows).min(oh);
            let n = (y1 - y0) * ow;
            with_scratch(k * n, |cols| {
                let xb = &xv[bi * ci * h * w..(bi + 1) * ci * h * w];
                cols.chunks_mut(kh * kw * n).enumerate().for_each(|(c, part)| geom.channel(part, xb, c, y0, y1));
                product(dst, bi, y0 * ow, cols, n, 0..co, 0..n);
            });
        });
    } else {
        let threads = rayon::current_num_threads();
        let most = (SCRATCH_MAX / (k * ow).max(1)).clamp(1, oh.max(1));
        let rows = oh.div_ceil(oh.div_ceil(most)).max(1);
        for bi in 0..b {
            let xb = &xv[bi * ci * h * w..(bi + 1) * ci * h * w];
            for y0 in (0..oh).step_by(rows) {
                let y1 = (y0 + rows).min(oh);
                let n = (y1 - y0) * ow;
                with_scratch(k * n, |cols| {
                    cols.par_chunks_mut(kh * kw * n).enumerate()
                        .for_each(|(c, part)| geom.channel(part, xb, c, y0, y1));
                    let cols = &*cols;
                    // Parts aligned to 16 positions (a vector) or 8 channels.
                    let (along_n, len, align) = if n >= co { (true, n, 16) } else { (false, co, 8) };
                    let step = len.div_ceil(threads).next_multiple_of(align).max(align);
                    (0..len.div_ceil(step)).into_par_iter().for_each(|i| {
                        let r = i * step..((i + 1) * step).min(len);
                        if along_n {
                            product(dst, bi, y0 * ow, cols, n, 0..co, r);
                        } else {
                            product(dst, bi, y0 * ow, cols, n, r, 0..n);
                        }
                    });
                });
            }
        }
    }
    tensor(out, [b, co, oh, ow])
}

/// Runs `f` on this thread's column buffer of `len` values (kept between calls up to [`SCRATCH_MAX`]; taken out, so
/// a nested call on the same thread only allocates its own). `f` writes every value it reads.
fn with_scratch(len: usize, f: impl FnOnce(&mut [f32])) {
    let mut scratch = SCRATCH.take();
    if scratch.len() < len {
        scratch = vec![0f32; len];
    }
    f(&mut scratch[..len]);
    if scratch.len() <= SCRATCH_MAX {
        SCRATCH.set(scratch);
    }
}

/// A [`conv2d`]'s geometry, for writing its im2col columns.
#[derive(Clone, Copy)]
struct Im2col {
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    ow: usize,
    stride: [usize; 2],
    pad: [[usize; 2]; 2],
}

impl Im2col {
    /// The `kh·kw` column rows of input channel `c` for output rows `y0..y1` (`part`: `kh·kw` rows of
    /// `(y1 − y0)·ow` values; every value written, zeros in the padding), from one image `xb: [c_in, h, w]`.
    fn channel(&self, part: &mut [f32], xb: &[f32], c: usize, y0: usize, y1: usize) {
        let Self { h, w, kh, kw, ow, stride: [sh, sw], pad: [[pt, _], [pl, _]] } = *self;
        let n = (y1 - y0) * ow;
        for ki in 0..kh {
            for kj in 0..kw {
                let r = &mut part[(ki * kw + kj) * n..][..n];
                for (dy, oy) in (y0..y1).enumerate() {
                    let iy = (oy * sh + ki) as isize - pt as isize;
                    let dst_row = &mut r[dy * ow..(dy + 1) * ow];
                    if iy < 0 || iy >= h as isize {
                        dst_row.fill(0.0);
                        continue;
                    }
                    let src = &xb[(c * h + iy as usize) * w..][..w];
                    if sw == 1 {
                        // ix = ox + kj − pl inside [0, w)
                        let lo = pl.saturating_sub(kj).min(ow);
                        let hi = (w + pl).saturating_sub(kj).min(ow).max(lo);
                        // (empty when the padding is wider than the row: then no index is formed)
                        dst_row[..lo].fill(0.0);
                        if hi > lo {
                            dst_row[lo..hi].copy_from_slice(&src[lo + kj - pl..hi + kj - pl]);
                        }
                        dst_row[hi..].fill(0.0);
                    } else {
                        for (ox, d) in dst_row.iter_mut().enumerate() {
                            let ix = (ox * sw + kj) as isize - pl as isize;
                            *d = if ix >= 0 && ix < w as isize { src[ix as usize] } else { 0.0 };
                        }
                    }
                }
            }
        }
    }
}

/// `x · w + bias` over the last axis of `x` (`w`: `[in, out]`, burn's `Linear` layout): one `gemm` straight into
/// the output, the bias written first and accumulated into (no separate pass). burn flex's `matmul` allocates its
/// output zeroed as bytes and then copies it to realign it (`FlexTensor::empty`), two passes over an output as
/// large as a GEGLU's `[2, 4096, 2560]`, and adds the bias in a third. The caller checks [`takes_image`] for every
/// operand and that `x`'s last axis is `w`'s first.
pub fn linear<const D: usize>(x: Tensor<D>, w: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    let mut dims = x.dims();
    let [k, n] = w.dims();
    let m = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = n;
    let (x, w, bias) = (flex_f32(x), flex_f32(w), bias.map(flex_f32));
    let mut out = output(m * n);
    product_plus_bias(&mut out, values(&x), values(&w), bias.as_ref().map(values), k, n);
    tensor(out, dims)
}

/// `out = x · w + bias` for row-major `x` (rows × k), `w` (k × n) and `out` (rows × n, `rows` from its length):
/// the bias written into every row first, then `gemm` accumulating into it (on its own threads above 192³ products,
/// as flex decides for its matmuls). Shared by [`linear`] and [`geglu`].
fn product_plus_bias(out: &mut [f32], x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize, n: usize) {
    let rows = out.len() / n.max(1);
    assert!(x.len() >= rows * k && w.len() == k * n && bias.is_none_or(|b| b.len() == n), "operand sizes");
    if let Some(b) = bias {
        out.par_chunks_mut(n.max(1)).for_each(|row| row.copy_from_slice(b));
    }
    let parallelism =
        if rows * n * k >= 192 * 192 * 192 { gemm::Parallelism::Rayon(0) } else { gemm::Parallelism::None };
    // SAFETY: the sizes were checked above; all three are row-major and contiguous.
    unsafe {
        gemm::gemm(rows, n, k, out.as_mut_ptr(), 1, n as isize, bias.is_some(), x.as_ptr(), 1, k as isize,
                   w.as_ptr(), 1, n as isize, 1.0, 1.0, false, false, false, parallelism);
    }
}

/// diffusers' `GEGLU`: `h · gelu(g)` where `[h, g]` = `x · w + bias` split in halves along the last axis (`w`:
/// `[in, 2·d]`), gelu exact (`erf`, burn flex's own `erf_f32`, so the values are burn's). The projection is made a
/// chunk of rows at a time into one scratch buffer and gated from there, so the `2·d`-wide product (84 MB for
/// SD-1.5's first level at 512²) is never allocated; burn's path allocates it, two views, the gelu and the product.
/// The caller checks [`takes_image`] for every operand, that `x`'s last axis is `w`'s first and that `w`'s second
/// is even and not 0.
pub fn geglu<const D: usize>(x: Tensor<D>, w: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<D> {
    use burn::backend::flex::ops::unary::erf_f32;
    let mut dims = x.dims();
    let [k, n2] = w.dims();
    let d = n2 / 2;
    let m = dims[..D - 1].iter().product::<usize>();
    dims[D - 1] = d;
    let (x, w, bias) = (flex_f32(x), flex_f32(w), bias.map(flex_f32));
    let (xv, wv) = (values(&x), values(&w));
    let mut out = output(m * d);
    // ~1 M values (4 MiB) of projection per chunk.
    let chunk = ((1 << 20) / n2).clamp(1, m.max(1));
    let mut scratch = vec![0f32; chunk * n2];
    for r0 in (0..m).step_by(chunk) {
        let rows = chunk.min(m - r0);
        let s = &mut scratch[..rows * n2];
        product_plus_bias(s, &xv[r0 * k..], wv, bias.as_ref().map(values), k, n2);
        out[r0 * d..(r0 + rows) * d].par_chunks_mut(d).zip(s.par_chunks(n2)).for_each(|(o, hg)| {
            let (h, g) = hg.split_at(d);
            for ((o, h), g) in o.iter_mut().zip(h).zip(g) {
                // burn flex's gelu, term for term
                *o = h * (0.5 * g * (1.0 + erf_f32(g / std::f32::consts::SQRT_2)));
            }
        });
    }
    tensor(out, dims)
}

/// Whether the kernels on image-shaped or any other CPU tensors ([`group_norm`], [`upsample_nearest_2x`],
/// [`conv2d`], [`linear`], [`geglu`]) handle `x`: f32 on the CPU outside autodiff.
pub fn takes_image<const D: usize>(x: &Tensor<D>) -> bool {
    ENABLED.load(Ordering::Relaxed) && x.dtype() == DType::F32 && !x.is_autodiff() && x.device() == Device::flex()
}

/// `GroupNorm` over `[batch, channels, h, w]` (biased variance, `eps` inside the square root, as torch and burn),
/// then `y · γ + β` per channel and, when `silu`, `y · sigmoid(y)`. The caller checks [`takes_image`] and that
/// `groups` divides the channels and `gamma`/`beta` (if any) have one value per channel.
pub fn group_norm(x: Tensor<4>, groups: usize, gamma: Option<Vec<f32>>, beta: Option<Vec<f32>>, eps: f64,
                  silu: bool) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let x = flex_f32(x);
    let (cg, hw) = (c / groups, h * w);
    if cg * hw == 0 {
        return Tensor::from_primitive::<Flex>(x);
    }
    let norm = |i: usize, chunk: &mut [f32]| {
        let n = chunk.len() as f64;
        let mean = sum_f64(chunk, |x| x) / n;
        let m = mean as f32;
        let var = sum_f64(chunk, |x| (x - m) * (x - m)) / n;
        let rstd = 1.0 / (var + eps).sqrt();
        let group = i % groups;
        for (k, ch) in chunk.chunks_exact_mut(hw).enumerate() {
            let cc = group * cg + k;
            let g = gamma.as_ref().map_or(1.0, |g| g[cc] as f64);
            let b = beta.as_ref().map_or(0.0, |b| b[cc]);
            affine(ch, m, (g * rstd) as f32, b, silu);
        }
    };
    if x.is_unique() {
        // In place when no other tensor holds `x`.
        let mut x = x;
        x.storage_mut::<f32>().par_chunks_mut(cg * hw).enumerate().for_each(|(i, chunk)| norm(i, chunk));
        Tensor::from_primitive::<Flex>(x)
    } else {
        // Else (a resnet's input, which its shortcut still holds) into a new buffer, a group at a time: copied
        // there and normalised while it is in cache.
        let mut out = output(b * c * hw);
        out.par_chunks_mut(cg * hw).zip(values(&x).par_chunks(cg * hw)).enumerate().for_each(|(i, (d, s))| {
            d.copy_from_slice(s);
            norm(i, d)
        });
        tensor(out, [b, c, h, w])
    }
}

/// `Σ f(x)` over a slice: f32 sums of 8 lanes over blocks of 1,024 values (vectorised), the blocks added in f64.
fn sum_f64(xs: &[f32], f: impl Fn(f32) -> f32 + Copy) -> f64 {
    xs.chunks(1024).map(|block| {
        let mut acc = [0f32; 8];
        let chunks = block.chunks_exact(8);
        let tail = chunks.remainder();
        for c in chunks {
            for j in 0..8 {
                acc[j] += f(c[j]);
            }
        }
        acc.iter().map(|a| *a as f64).sum::<f64>() + tail.iter().map(|x| f(*x) as f64).sum::<f64>()
    }).sum()
}

/// `x ← (x − m)·a + b` (centred first: `a` is up to 1/√ε), then `x ← x · sigmoid(x)` when `silu`, vectorised like
/// [`softmax_columns`].
fn affine(xs: &mut [f32], m: f32, a: f32, b: f32, silu: bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { affine_avx512(xs, m, a, b, silu) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { affine_avx2(xs, m, a, b, silu) };
        }
    }
    affine_portable(xs, m, a, b, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn affine_avx512(xs: &mut [f32], m: f32, a: f32, b: f32, silu: bool) {
    affine_portable(xs, m, a, b, silu)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn affine_avx2(xs: &mut [f32], m: f32, a: f32, b: f32, silu: bool) {
    affine_portable(xs, m, a, b, silu)
}

#[inline(always)]
fn affine_portable(xs: &mut [f32], m: f32, a: f32, b: f32, silu: bool) {
    if silu {
        for x in xs.iter_mut() {
            let y = (*x - m) * a + b;
            // sigmoid(y) from e^{-|y|} ∈ (0, 1], so [`exp`] only sees arguments ≤ 0.
            let e = exp(-y.abs());
            let s = 1.0 / (1.0 + e);
            *x = y * if y >= 0.0 { s } else { e * s };
        }
    } else {
        for x in xs.iter_mut() {
            *x = (*x - m) * a + b;
        }
    }
}

/// Softmax numerators of a block of scores stored column-major (`max.len()` query rows per key, each key a
/// column), in place: `p = e^(x − max_row)`; `sum` receives each row's total, by which the caller divides (the
/// attention divides its `d` outputs per row rather than the `sk` probabilities). The rows are the vector lanes,
/// so no horizontal reduction is needed. A row with a NaN score, or with only −∞ scores, gets a NaN sum (NaN −
/// anything, and −∞ − −∞, are NaN), as burn's softmax gives NaN there. [`exp`] is vectorised by the compiler for
/// the widest vector unit the CPU has (AVX-512, else AVX2 + FMA).
fn softmax_columns(scores: &mut [f32], max: &mut [f32], sum: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { softmax_columns_avx512(scores, max, sum) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the features were just detected.
            return unsafe { softmax_columns_avx2(scores, max, sum) };
        }
    }
    softmax_columns_portable(scores, max, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn softmax_columns_avx512(scores: &mut [f32], max: &mut [f32], sum: &mut [f32]) {
    softmax_columns_portable(scores, max, sum)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn softmax_columns_avx2(scores: &mut [f32], max: &mut [f32], sum: &mut [f32]) {
    softmax_columns_portable(scores, max, sum)
}

#[inline(always)]
fn softmax_columns_portable(scores: &mut [f32], max: &mut [f32], sum: &mut [f32]) {
    type Narrow<'a> = &'a mut [f32; ROWS_NARROW];
    type Wide<'a> = &'a mut [f32; ROWS_WIDE];
    if let (Ok(max), Ok(sum)) = (Narrow::try_from(&mut *max), Narrow::try_from(&mut *sum)) {
        return softmax_columns_fixed(scores, max, sum);
    }
    if let (Ok(max), Ok(sum)) = (Wide::try_from(&mut *max), Wide::try_from(&mut *sum)) {
        return softmax_columns_fixed(scores, max, sum);
    }
    let rows = max.len();
    max.fill(f32::NEG_INFINITY);
    for col in scores.chunks_exact(rows) {
        for (m, x) in max.iter_mut().zip(col) {
            // Not `f32::max`: a NaN score must not be dropped here (it reaches the sum either way).
            *m = if *x > *m { *x } else { *m };
        }
    }
    sum.fill(0.0);
    for col in scores.chunks_exact_mut(rows) {
        for ((x, m), s) in col.iter_mut().zip(&*max).zip(sum.iter_mut()) {
            let e = exp(*x - m);
            *x = e;
            *s += e;
        }
    }
}

/// [`softmax_columns_portable`] for a full block of `W` rows: the running maxima and sums are fixed-size arrays
/// the compiler keeps in vector registers (the general loop loads and stores them at every key).
#[inline(always)]
fn softmax_columns_fixed<const W: usize>(scores: &mut [f32], max: &mut [f32; W], sum: &mut [f32; W]) {
    let mut m = [f32::NEG_INFINITY; W];
    for col in scores.chunks_exact(W) {
        for j in 0..W {
            m[j] = if col[j] > m[j] { col[j] } else { m[j] };
        }
    }
    let mut s = [0f32; W];
    for col in scores.chunks_exact_mut(W) {
        for j in 0..W {
            let e = exp(col[j] - m[j]);
            col[j] = e;
            s[j] += e;
        }
    }
    (*max, *sum) = (m, s);
}

/// `eˣ` for `x ≤ 0` (softmax arguments) with ~1 ulp error, branch-free so that loops over it vectorise:
/// `x = n·ln 2 + r` with `|r| ≤ ln 2 / 2`, `eʳ` by Cephes' degree-6 polynomial, `2ⁿ` built in the exponent bits.
/// Below −87.3 (where `eˣ` leaves the normal range) the result is 0.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa bits.
    const SHIFTER: f32 = 12_582_912.0;
    let xc = if x < -87.3 { -87.3 } else { x }; // NaN stays NaN (f32::max would drop it)
    let t = xc * LOG2E + SHIFTER;
    let n = t - SHIFTER;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 5.000_000_1e-1);
    let er = (p * r).mul_add(r, r) + 1.0;
    let bits = (t.to_bits() as i32).wrapping_sub(SHIFTER.to_bits() as i32).wrapping_add(127) << 23;
    let y = er * f32::from_bits(bits as u32);
    if x < -87.3 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm_on_the_softmax_range() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_37;
        }
        assert!(worst < 2.5e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert!(exp(f32::NAN).is_nan());
    }

    /// The column softmax (the path this CPU takes and the portable one) gives each row's numerators and sum as
    /// an f64 reference does, for blocks of any height and width; a row with a NaN score or only −∞ scores gets a
    /// NaN sum, and leaves the other rows alone.
    #[test]
    fn softmax_columns_match_a_reference() {
        for (rows, keys) in [(1usize, 1usize), (7, 5), (16, 77), (17, 100), (ROWS_NARROW, 4096), (ROWS_WIDE, 1000),
                             (3, 300)] {
            let x: Vec<f32> = (0..rows * keys).map(|i| (i as f32 * 0.73).sin() * 30.0 - 5.0).collect();
            let (mut a, mut b) = (x.clone(), x.clone());
            let (mut ma, mut sa, mut mb, mut sb) = (vec![0.0; rows], vec![0.0; rows], vec![0.0; rows], vec![0.0; rows]);
            softmax_columns(&mut a, &mut ma, &mut sa);
            softmax_columns_portable(&mut b, &mut mb, &mut sb);
            for r in 0..rows {
                let row = |v: &[f32]| (0..keys).map(|j| v[j * rows + r]).collect::<Vec<f32>>();
                let max = row(&x).into_iter().fold(f32::NEG_INFINITY, f32::max);
                let want: Vec<f64> = row(&x).iter().map(|v| ((v - max) as f64).exp()).collect();
                let total: f64 = want.iter().sum();
                assert!((sa[r] as f64 - total).abs() < 1e-5 * total && (sa[r] - sb[r]).abs() <= 1e-6 * sb[r],
                        "{rows}×{keys} row {r}: sum {} / {} vs {total}", sa[r], sb[r]);
                for ((p, q), w) in row(&a).iter().zip(row(&b)).zip(&want) {
                    assert!((p - q).abs() <= 1e-7 && (*p as f64 - w).abs() < 1e-6, "{p} {q} {w}");
                }
            }
        }
        // rows 0 and 2 of 3 are poisoned; row 1 stays finite.
        let mut x = vec![f32::NEG_INFINITY, 0.5, 0.0, f32::NEG_INFINITY, 1.0, f32::NAN];
        let (mut m, mut s) = (vec![0.0; 3], vec![0.0; 3]);
        softmax_columns(&mut x, &mut m, &mut s);
        assert!(s[0].is_nan() && s[2].is_nan(), "{s:?}");
        assert!((s[1] - (1.0 + (-0.5f32).exp())).abs() < 1e-6, "{s:?}");
    }

    #[test]
    fn widen_f16_matches_burns_cast() {
        let dev = Device::flex();
        let v: Vec<half::f16> = (0..70_001).map(|i| half::f16::from_f32(((i * 7919) % 2001) as f32 * 0.37 - 370.0))
            .chain([half::f16::MIN_POSITIVE_SUBNORMAL, half::f16::MAX, -half::f16::MAX, half::f16::NEG_ZERO])
            .collect();
        let n = v.len();
        let w = Tensor::<2>::from_data(TensorData::new(v, [n / 5, 5]), &dev).cast(DType::F16);
        assert_eq!(w.dtype(), DType::F16);
        let mine = super::widen_f16(&w).expect("an f16 tensor on flex");
        let burns = w.clone().cast(DType::F32);
        assert_eq!(mine.dtype(), DType::F32);
        let (a, b) = (mine.into_data().try_to_vec::<f32>().unwrap(), burns.into_data().try_to_vec::<f32>().unwrap());
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(super::widen_f16(&w.cast(DType::F32)).is_none());
    }

    /// Against burn's own dequantization, for the two layouts [`crate::quant`] loads (a `Linear`'s `[in, out]`
    /// weight with blocks `[32, 1]`, a conv's `[out, in, kh, kw]` with `[1, 32, 1, 1]`) and int8/int4 values.
    #[test]
    fn dequantize_matches_burns() {
        use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
        let dev = Device::flex();
        for qmax in [127usize, 7] {
            let scheme = QuantScheme::default().with_value(QuantValue::Q8S).with_store(QuantStore::Native);
            let q = |n: usize| {
                (0..n).map(|i| (((i * 37 + 11) % (2 * qmax + 1)) as i32 - qmax as i32) as i8).collect::<Vec<_>>()
            };
            let s = |n: usize| (0..n).map(|i| 0.01 + (i % 13) as f32 * 0.003).collect::<Vec<f32>>();
            let lin = Tensor::<2>::from_data(
                TensorData::quantized(q(96 * 40), [96, 40], scheme.per_block([32, 1], ScaleDtype::F32), &s(3 * 40),
                                      None), &dev);
            let conv = Tensor::<4>::from_data(
                TensorData::quantized(q(5 * 64 * 9), [5, 64, 3, 3], scheme.per_block([1, 32, 1, 1], ScaleDtype::F32),
                                      &s(5 * 2 * 9), None), &dev);
            let lin_want = crate::tensor::to_f32_vec(lin.clone().dequantize()).unwrap();
            let got = crate::tensor::to_f32_vec(dequantize(lin.clone())).unwrap();
            assert_eq!(got, lin_want);
            assert!(got.iter().any(|v| *v != 0.0));
            let conv_want = crate::tensor::to_f32_vec(conv.clone().dequantize()).unwrap();
            let got = crate::tensor::to_f32_vec(dequantize(conv.clone())).unwrap();
            assert_eq!(got, conv_want);
            if qmax == 7 {
                // The same 4-bit values packed two per stored i8 along the input axis (`Q4S`, blocks of 16 bytes):
                // unpacked into the weight's shape, the same values.
                let nib = |v: i8| v as u8 & 0x0f;
                let ql = q(96 * 40);
                let packed: Vec<i8> = (0..48 * 40).map(|k| {
                    let (p, o) = (k / 40, k % 40);
                    (nib(ql[2 * p * 40 + o]) | nib(ql[(2 * p + 1) * 40 + o]) << 4) as i8
                }).collect();
                let p4 = scheme.with_value(QuantValue::Q4S);
                let lin4 = Tensor::<2>::from_data(
                    TensorData::quantized(packed, [48, 40], p4.per_block([16, 1], ScaleDtype::F32), &s(3 * 40), None),
                    &dev);
                assert!(is_packed4(lin4.dtype()) && logical_dims(&lin4) == [96, 40]);
                let got = dequantize(lin4);
                assert_eq!(got.dims(), [96, 40]);
                assert_eq!(crate::tensor::to_f32_vec(got).unwrap(), lin_want);
                let qc = q(5 * 64 * 9);
                let packed: Vec<i8> = (0..5 * 32 * 9).map(|k| {
                    let (o, p, r) = (k / (32 * 9), k / 9 % 32, k % 9);
                    (nib(qc[(o * 64 + 2 * p) * 9 + r]) | nib(qc[(o * 64 + 2 * p + 1) * 9 + r]) << 4) as i8
                }).collect();
                let conv4 = Tensor::<4>::from_data(
                    TensorData::quantized(packed, [5, 32, 3, 3], p4.per_block([1, 16, 1, 1], ScaleDtype::F32),
                                          &s(5 * 2 * 9), None), &dev);
                // Through `to_f32_vec` too (what reading a weight back uses).
                assert_eq!(crate::tensor::to_f32_vec(conv4).unwrap(), conv_want);
            }
        }
        // Not quantized: returned unchanged.
        let f = Tensor::<2>::from_data(TensorData::new(vec![1f32, 2.0, 3.0, 4.0], [2, 2]), &dev);
        assert_eq!(crate::tensor::to_f32_vec(dequantize(f)).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    }

    /// Against burn-nn's `GroupNorm` (+ burn's `silu`): several group sizes, affine or not, values far from 0
    /// (the mean matters), both signs through the SiLU.
    #[test]
    fn group_norm_matches_burns() {
        use burn::nn::GroupNormConfig;
        let dev = Device::flex();
        for (b, c, h, w, groups, affine) in [(2, 64, 9, 7, 32, true), (1, 12, 5, 5, 3, false), (1, 8, 1, 1, 8, true)] {
            let n = b * c * h * w;
            let x = Tensor::<4>::from_data(
                TensorData::new((0..n).map(|i| 3.0 + (i as f32 * 0.37).sin() * 2.5).collect::<Vec<_>>(), [b, c, h, w]),
                &dev);
            let mut gn = GroupNormConfig::new(groups, c).with_epsilon(1e-6).with_affine(affine).init(&dev);
            if affine {
                let v = |f: f32| Tensor::<1>::from_data(
                    TensorData::new((0..c).map(|i| (i as f32 * f).cos()).collect::<Vec<_>>(), [c]), &dev);
                gn.gamma = Some(burn::module::Param::from_tensor(v(0.7)));
                gn.beta = Some(burn::module::Param::from_tensor(v(1.3)));
            }
            let vec = |t: &Option<burn::module::Param<Tensor<1>>>| {
                t.as_ref().map(|p| crate::tensor::to_f32_vec(p.val()).unwrap())
            };
            assert!(takes_image(&x));
            for silu in [false, true] {
                let want = gn.forward(x.clone());
                let want = if silu { burn::tensor::activation::silu(want) } else { want };
                // Shared (into a new buffer, the input left as it was) and unique (in place).
                let before = x.to_data();
                let shared = group_norm(x.clone(), groups, vec(&gn.gamma), vec(&gn.beta), 1e-6, silu);
                x.to_data().assert_eq(&before, true);
                let unique = Tensor::<4>::from_data(before, &dev);
                let unique = group_norm(unique, groups, vec(&gn.gamma), vec(&gn.beta), 1e-6, silu);
                for got in [shared, unique] {
                    let diff = (got - want.clone()).abs().max().into_scalar::<f32>();
                    assert!(diff < 2e-5, "{b} {c} {h} {w} {groups} {affine} {silu}: max difference {diff}");
                }
            }
        }
    }

    #[test]
    fn upsample_matches_burns_nearest() {
        use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
        let dev = Device::flex();
        for [b, c, h, w] in [[2, 3, 5, 7], [1, 1, 1, 1], [1, 4, 8, 3]] {
            let n = b * c * h * w;
            let x = Tensor::<4>::from_data(
                TensorData::new((0..n).map(|i| (i as f32 * 0.31).sin()).collect::<Vec<_>>(), [b, c, h, w]), &dev);
            let mut opts = InterpolateOptions::new(InterpolateMode::Nearest);
            opts.output_size = Some([2 * h, 2 * w]);
            let want = crate::tensor::to_f32_vec(burn::tensor::module::interpolate(x.clone(), opts)).unwrap();
            let got = upsample_nearest_2x(x);
            assert_eq!(got.dims(), [b, c, 2 * h, 2 * w]);
            assert_eq!(crate::tensor::to_f32_vec(got).unwrap(), want);
        }
    }

    /// Output buffers: the requested length, all zeros, below and above the huge-page size (where the `madvise`
    /// path runs on Linux) and at unaligned lengths.
    #[test]
    fn outputs_are_zeroed() {
        for len in [0, 5, 3 << 20, (3 << 20) + 7, 5 << 20] {
            let v = output(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|x| *x == 0.0));
        }
    }

    /// Against burn's `conv2d`: 3×3 with padding 1 (the resnets), stride 2 with asymmetric padding (diffusers'
    /// `Downsample2D` pads (0, 1, 0, 1)), a wide input, bias or not, batch 2; small planes (one tile per image, or
    /// two when the columns would exceed `SCRATCH_MAX`; split along positions or, with more channels than
    /// positions, along channels) and planes of ≥ 64×64 (tiles of rows).
    #[test]
    fn conv2d_matches_burns() {
        use burn::tensor::ops::ConvOptions;
        let dev = Device::flex();
        let t = |shape: [usize; 4], f: f32| {
            let n = shape.iter().product::<usize>();
            Tensor::<4>::from_data(TensorData::new((0..n).map(|i| (i as f32 * f).sin()).collect::<Vec<_>>(), shape),
                                   &dev)
        };
        for (x, co, k, stride, pad, bias) in [
            ([2, 5, 9, 11], 7, 3, [1, 1], [[1, 1], [1, 1]], true),
            ([1, 4, 8, 8], 6, 3, [2, 2], [[0, 1], [0, 1]], true),
            ([1, 3, 3, 300], 4, 3, [1, 1], [[1, 1], [1, 1]], false),
            ([1, 2, 6, 5], 3, 2, [1, 1], [[0, 0], [0, 0]], true),
            // Planes of ≥ 64×64 outputs, tiled by rows (several tiles per image, a short last tile), unpadded then
            // padded: the per-thread column buffer then holds the previous call's values where padding goes.
            ([2, 3, 70, 66], 4, 3, [1, 1], [[0, 0], [0, 0]], false),
            ([2, 3, 70, 66], 4, 3, [1, 1], [[1, 1], [1, 1]], true),
            ([1, 2, 141, 130], 3, 3, [2, 2], [[0, 1], [0, 1]], true),
            // A small plane whose columns exceed SCRATCH_MAX: two tiles.
            ([1, 300, 40, 50], 2, 3, [1, 1], [[1, 1], [1, 1]], true),
            // More output channels than positions: the product split along the channels, a short last part.
            ([2, 3, 5, 4], 37, 3, [1, 1], [[1, 1], [1, 1]], true),
            ([1, 6, 4, 4], 50, 3, [2, 2], [[1, 1], [1, 1]], false),
            // One output position; a left padding wider than the input row (no copy at all in some rows).
            ([2, 3, 3, 3], 5, 3, [1, 1], [[0, 0], [0, 0]], true),
            ([1, 2, 3, 1], 2, 3, [1, 1], [[1, 1], [5, 0]], true),
        ] {
            let xt = t(x, 0.37);
            let wt = t([co, x[1], k, k], 0.71);
            let bt = bias.then(|| t([1, 1, 1, co], 0.13).reshape([co]));
            let opts = ConvOptions::new_with_padding(stride, [(pad[0][0], pad[0][1]), (pad[1][0], pad[1][1])],
                                                     [1, 1], 1);
            let want = burn::tensor::module::conv2d(xt.clone(), wt.clone(), bt.clone(), opts);
            let bias = bt.map(|b| crate::tensor::to_f32_vec(b).unwrap());
            // On this machine's threads, and in pools of 1 and 3 (no split; uneven parts) whatever the machine.
            let got = conv2d(xt.clone(), wt.clone(), bias.clone(), stride, pad);
            let pooled = [1, 3].map(|threads| {
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
                    .install(|| conv2d(xt.clone(), wt.clone(), bias.clone(), stride, pad))
            });
            for got in [got].into_iter().chain(pooled) {
                assert_eq!(got.dims(), want.dims(), "{x:?} {stride:?} {pad:?}");
                let diff = (got - want.clone()).abs().max().into_scalar::<f32>();
                assert!(diff < 1e-4, "{x:?} {stride:?} {pad:?}: max difference {diff}");
            }
        }
    }

    /// Against burn's `linear`: with and without a bias, rank 2 and 3, small (one thread) and above the size
    /// where `gemm` runs on rayon.
    #[test]
    fn linear_matches_burns() {
        let dev = Device::flex();
        let v = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin()).collect::<Vec<_>>();
        for (rows, k, n, bias) in [(5usize, 3usize, 4usize, true), (7, 9, 2, false), (300, 200, 190, true)] {
            let w = Tensor::<2>::from_data(TensorData::new(v(k * n, 0.71), [k, n]), &dev);
            let b = bias.then(|| Tensor::<1>::from_data(TensorData::new(v(n, 0.13), [n]), &dev));
            let x2 = Tensor::<2>::from_data(TensorData::new(v(rows * k, 0.37), [rows, k]), &dev);
            let want = burn::tensor::module::linear(x2.clone(), w.clone(), b.clone());
            let diff = (linear(x2, w.clone(), b.clone()) - want).abs().max().into_scalar::<f32>();
            assert!(diff < 1e-4, "{rows}×{k}·{k}×{n}: max difference {diff}");
            let x3 = Tensor::<3>::from_data(TensorData::new(v(2 * rows * k, 0.37), [2, rows, k]), &dev);
            let want = burn::tensor::module::linear(x3.clone(), w.clone(), b.clone());
            let got = linear(x3, w, b);
            assert_eq!(got.dims(), [2, rows, n]);
            let diff = (got - want).abs().max().into_scalar::<f32>();
            assert!(diff < 1e-4, "2×{rows}×{k}·{k}×{n}: max difference {diff}");
        }
    }

    /// Against burn's `linear` + `gelu` on the halves (diffusers' GEGLU): bias or not, one chunk or several.
    #[test]
    fn geglu_matches_burns() {
        let dev = Device::flex();
        let v = |n: usize, f: f32| (0..n).map(|i| (i as f32 * f).sin() * 2.0).collect::<Vec<_>>();
        for (rows, k, d, bias) in [(5usize, 3usize, 4usize, true), (700, 16, 1000, false), (300, 40, 64, true)] {
            let w = Tensor::<2>::from_data(TensorData::new(v(k * 2 * d, 0.71), [k, 2 * d]), &dev);
            let b = bias.then(|| Tensor::<1>::from_data(TensorData::new(v(2 * d, 0.13), [2 * d]), &dev));
            let x = Tensor::<3>::from_data(TensorData::new(v(2 * rows * k, 0.37), [2, rows, k]), &dev);
            let h = burn::tensor::module::linear(x.clone(), w.clone(), b.clone());
            let want = h.clone().narrow(2, 0, d) * burn::tensor::activation::gelu(h.narrow(2, d, d));
            let got = geglu(x, w, b);
            assert_eq!(got.dims(), [2, rows, d]);
            let diff = (got - want).abs().max().into_scalar::<f32>();
            assert!(diff < 1e-4, "{rows}×{k}·{k}×{}: max difference {diff}", 2 * d);
        }
    }

    /// Against burn's own attention on the same inputs: self- and cross-attention, several heads, a sequence
    /// length that is not a multiple of the block size.
    #[test]
    fn attention_matches_burns() {
        let dev = Device::flex();
        let t = |shape: [usize; 3], f: f32| {
            let n = shape.iter().product::<usize>();
            Tensor::<3>::from_data(TensorData::new((0..n).map(|i| (i as f32 * f).sin() * 2.0).collect::<Vec<_>>(),
                                                   shape), &dev)
        };
        for (b, sq, sk, heads, d) in [(2, 150, 150, 3, 8), (1, 70, 77, 2, 16), (2, 300, 5, 1, 4),
                                      (2, 300, 260, 2, 40)] {
            let (q, k, v) = (t([b, sq, heads * d], 0.37), t([b, sk, heads * d], 0.71), t([b, sk, heads * d], 0.13));
            assert!(takes(&[&q, &k, &v]));
            assert!(!takes(&[&q, &k.clone().autodiff(), &v]), "a key in autodiff goes to burn's op");
            let scale = 1.0 / (d as f32).sqrt();
            let split = |x: Tensor<3>, s: usize| x.reshape([b, s, heads, d]).swap_dims(1, 2);
            let want = burn::tensor::module::attention(
                split(q.clone(), sq), split(k.clone(), sk), split(v.clone(), sk), None, None,
                burn::tensor::ops::AttentionModuleOptions { scale: Some(scale as f64), softcap: None,
                                                            is_causal: false })
                .swap_dims(1, 2).reshape([b, sq, heads * d]);
            let got = attention(q, k, v, heads, scale);
            let diff = (got - want).abs().max().into_scalar::<f32>();
            assert!(diff < 1e-5, "{b} {sq} {sk} {heads} {d}: max difference {diff}");
        }
    }
}
