//! Building blocks shared by the UNet and the VAE, named as in diffusers (`diffusers.models.attention_processor`,
//! `resnet`, `attention`, `transformers.transformer_2d`), so their fields equal the checkpoint keys.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, GroupNorm, GroupNormConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig,
               PaddingConfig2d};
use burn::tensor::activation::{gelu, silu};
use burn::tensor::module::{attention, conv2d as conv2d_op, interpolate};
use burn::tensor::ops::{AttentionModuleOptions, ConvOptions, InterpolateMode, InterpolateOptions};
use burn::tensor::{DType, Device, Tensor};

/// `forward` of a `Linear` or `Conv2d` on unsee's CPU kernels where they apply: a weight stored narrower than the
/// activations — quantized, or f16 in a bundle ([`crate::quant`]) — is widened for this one call
/// ([`crate::kernels::dequantize`]; burn's own path is single-threaded, see there) and dropped after it; f32 on the
/// CPU outside autodiff goes to [`crate::kernels::linear`] and (k×k, k > 1) [`crate::kernels::conv2d`]; everything
/// else to burn's `forward`.
pub trait Forward<T> {
    fn fwd(&self, x: T) -> T;
}

/// The weight `w` in the activations' dtype `to` for one call, or `None` when burn's own `forward` takes it as it
/// is (already in `to`; or quantized where unsee's kernel does not run: burn dequantizes it itself).
fn widened<const D: usize>(w: &Tensor<D>, to: burn::tensor::DType) -> Option<Tensor<D>> {
    let w = match w.dtype() {
        burn::tensor::DType::QFloat(_) => {
            let d = crate::kernels::dequantize(w.clone());
            if matches!(d.dtype(), burn::tensor::DType::QFloat(_)) {
                return None;
            }
            d
        }
        d if d == to => return None,
        _ => crate::kernels::widen_f16(w).unwrap_or_else(|| w.clone()),
    };
    Some(if w.dtype() == to { w } else { w.cast(to) })
}

impl<const D: usize> Forward<Tensor<D>> for Linear {
    /// On the CPU (f32, outside autodiff) [`crate::kernels::linear`]; else burn's.
    fn fwd(&self, x: Tensor<D>) -> Tensor<D> {
        match own_linear(self, &x) {
            Ok((w, bias)) => crate::kernels::linear(x, w, bias),
            Err(None) => self.forward(x),
            Err(Some(w)) => burn::tensor::module::linear(x, w, self.bias.as_ref().map(|b| b.val())),
        }
    }
}

/// The weight (widened where stored narrower) and bias of `l` when unsee's CPU kernels take `x · w + b`; else
/// `Err` with the widened weight for burn's `linear`, or `None` when burn's `forward` takes the layer as it is.
#[allow(clippy::type_complexity)]
fn own_linear<const D: usize>(l: &Linear, x: &Tensor<D>)
    -> Result<(Tensor<2>, Option<Tensor<1>>), Option<Tensor<2>>> {
    let stored = l.weight.val();
    let widened = widened(&stored, x.dtype());
    let bias = l.bias.as_ref().map(|b| b.val());
    let w = widened.as_ref().unwrap_or(&stored);
    let [k, n] = w.dims();
    let ours = crate::kernels::takes_image(x) && crate::kernels::takes_image(w) && x.dims()[D - 1] == k
        && bias.as_ref().is_none_or(|b| crate::kernels::takes_image(b) && b.dims() == [n]);
    if ours { Ok((widened.unwrap_or(stored), bias)) } else { Err(widened) }
}

impl Forward<Tensor<4>> for Conv2d {
    /// k×k convolutions (k > 1) on the CPU (f32, outside autodiff) go to [`crate::kernels::conv2d`]; 1×1 ones and
    /// the rest to burn (flex multiplies 1×1 ones without im2col already, as fast as unsee's gemm measured).
    fn fwd(&self, x: Tensor<4>) -> Tensor<4> {
        let stored = self.weight.val();
        let widened = widened(&stored, x.dtype());
        let converted = widened.is_some();
        let w = widened.unwrap_or(stored);
        if let Some(pad) = own_conv(self, &x, &w) {
            let bias = self.bias.as_ref().map(|b| crate::tensor::to_f32_vec(b.val()));
            match bias {
                Some(Err(_)) => {}
                bias => return crate::kernels::conv2d(x, w, bias.map(|b| b.unwrap_or_default()), self.stride, pad),
            }
        }
        if let Some(y) = conv_summing_in_f32(self, &x, &w) {
            return y;
        }
        if !converted {
            return self.forward(x);
        }
        let mut c = self.clone();
        c.weight = burn::module::Param::from_tensor(w);
        c.forward(x)
    }
}

/// `conv`'s padding as `(top, left, bottom, right)`. Every conv unsee builds has explicit padding ([`conv2d`]);
/// `None` for `Same`, which only burn's `forward` resolves.
fn explicit_padding(conv: &Conv2d) -> Option<(usize, usize, usize, usize)> {
    match conv.padding {
        PaddingConfig2d::Explicit(t, l, b, r) => Some((t, l, b, r)),
        PaddingConfig2d::Valid => Some((0, 0, 0, 0)),
        PaddingConfig2d::Same => None,
    }
}

/// The padding `[[top, bottom], [left, right]]` when [`crate::kernels::conv2d`] takes this convolution.
fn own_conv(conv: &Conv2d, x: &Tensor<4>, w: &Tensor<4>) -> Option<[[usize; 2]; 2]> {
    let [_, ci, h, wd] = x.dims();
    let [_, wci, kh, kw] = w.dims();
    let (t, l, b, r) = explicit_padding(conv)?;
    let fits = kh * kw > 1 && conv.stride[0] > 0 && conv.stride[1] > 0 && h + t + b >= kh && wd + l + r >= kw;
    (fits && conv.groups == 1 && conv.dilation == [1, 1] && wci == ci && crate::kernels::takes_image(x)
        && crate::kernels::takes_image(w))
        .then_some([[t, b], [l, r]])
}

/// The most bytes one f32 band of [`conv_summing_in_f32`] or [`norm_on_gpu`] takes (its input or its output), and
/// of one chunk of attention scores ([`multi_head_attention`]): a quarter of the 128 MiB that every WebGPU device
/// binds at least, so the f32 copies fit wherever the f16 tensors do.
const F32_BAND_BYTES: usize = 32 << 20;

/// A tensor on a GPU outside autodiff, where unsee works around burn 0.22's wgpu kernels ([`conv_summing_in_f32`]
/// for half precision, [`norm_on_gpu`], [`multi_head_attention`]'s chunks).
fn on_gpu<const D: usize>(x: &Tensor<D>) -> bool {
    x.device() != Device::flex() && !x.is_autodiff()
}

/// A half-precision convolution on a GPU with its sums in f32. burn's direct convolution — what wgpu devices without
/// cooperative-matrix units run (lavapipe, most phones) — keeps its running sum in the tensor's element type
/// (cubek-convolution 0.3.1, `kernels/forward/direct.rs`); over SD's K = 4,608–11,520 products that lost 2–3 % of
/// the largest output on lavapipe (`parity_wgpu`'s `full_size_layers_on_wgpu_match_the_cpu`). Here the input is
/// widened to f32 one band of output rows at a time — with the rows its window reaches above and below, and the
/// padding only where a band meets the border — convolved by burn in f32 and narrowed back, so that no f32 copy
/// exceeds [`F32_BAND_BYTES`] even where the f16 activation fills a binding (256 channels at 512² in the VAE's
/// decoder). `None` where it does not apply (f32, the CPU, autodiff — see [`on_gpu`] —, `Same` padding, a padding
/// as tall as the window, an empty tensor): burn's `forward` takes those.
fn conv_summing_in_f32(conv: &Conv2d, x: &Tensor<4>, w: &Tensor<4>) -> Option<Tensor<4>> {
    let dtype = x.dtype();
    if !on_gpu(x) || !matches!(dtype, DType::F16 | DType::BF16) {
        return None;
    }
    let (t, l, b, r) = explicit_padding(conv)?;
    let ([n, ci, h, wd], [co, _, kh, kw]) = (x.dims(), w.dims());
    let ([sh, sw], [dh, dw]) = (conv.stride, conv.dilation);
    let (reach_h, reach_w) = ((kh.max(1) - 1) * dh + 1, (kw.max(1) - 1) * dw + 1);
    // Past these, burn's own checks report the shape; a padding as tall as the window would make all-padding bands.
    if [n, ci, h, wd, co, kh, kw, sh, sw].contains(&0) || h + t + b < reach_h || wd + l + r < reach_w
        || t >= reach_h || b >= reach_h {
        return None;
    }
    let (ho, wo) = ((h + t + b - reach_h) / sh + 1, (wd + l + r - reach_w) / sw + 1);
    let row_bytes = 4 * n * (ci * sh * (wd + l + r)).max(co * wo);
    let rows = (F32_BAND_BYTES / row_bytes).clamp(1, ho);
    let (w, bias) = (w.clone().cast(DType::F32), conv.bias.as_ref().map(|b| b.val().cast(DType::F32)));
    let mut bands = (0..ho).step_by(rows).map(|o0| {
        let o1 = (o0 + rows).min(ho);
        // Input rows of output rows o0..o1, counted from the top of the unpadded input (negative: padding).
        let (y0, y1) = ((o0 * sh) as isize - t as isize, ((o1 - 1) * sh + reach_h) as isize - t as isize);
        let (a, z) = (y0.max(0) as usize, y1.min(h as isize) as usize);
        let pad = [((a as isize - y0) as usize, (y1 - z as isize) as usize), (l, r)];
        let band = x.clone().slice([0..n, 0..ci, a..z, 0..wd]).cast(DType::F32);
        conv2d_op(band, w.clone(), bias.clone(), ConvOptions::new_with_padding([sh, sw], pad, [dh, dw], conv.groups))
            .cast(dtype)
    }).collect::<Vec<_>>();
    Some(if bands.len() == 1 { bands.remove(0) } else { Tensor::cat(bands, 2) })
}

/// `GroupNorm` over `[b, c, h, w]`, then SiLU when `silu_after` (the order every resnet and `conv_norm_out` uses):
/// unsee's CPU kernel ([`crate::kernels::group_norm`]) for f32 on the CPU outside autodiff, [`norm_on_gpu`] on a
/// GPU, burn's ops otherwise.
pub fn norm(gn: &GroupNorm, x: Tensor<4>, silu_after: bool) -> Tensor<4> {
    let c = x.dims()[1];
    if crate::kernels::takes_image(&x) && gn.num_groups > 0 && c == gn.num_channels && c % gn.num_groups == 0 {
        let vec = |p: &Option<burn::module::Param<Tensor<1>>>| {
            p.as_ref().and_then(|p| crate::tensor::to_f32_vec(p.val()).ok())
        };
        let (gamma, beta) = if gn.affine { (vec(&gn.gamma), vec(&gn.beta)) } else { (None, None) };
        let fits = |v: &Option<Vec<f32>>| v.as_ref().map_or(!gn.affine, |v| v.len() == c);
        if fits(&gamma) && fits(&beta) {
            return crate::kernels::group_norm(x, gn.num_groups, gamma, beta, gn.epsilon, silu_after);
        }
    }
    if let Some(y) = norm_on_gpu(gn, &x, silu_after) {
        return y;
    }
    let y = gn.forward(x);
    if silu_after { silu(y) } else { y }
}

/// [`norm`] on a GPU (any float dtype), with its statistics in f32 and its means taken in stages. Two faults of
/// burn 0.22 on wgpu, measured on lavapipe (2026-11-27): `mean_dim` over rows × length past ~500,000 values is wrong
/// even in f32 (8 rows of 65,536: off by 3.6e-3; 8 or 32 rows of 262,144: whole rows 0 instead of 3), which put the
/// group norm of 128 channels at 256² (32 groups of 262,144 values) up to 458 off for outputs of a few units; and f16
/// sums. So the input is widened to f32 a band of whole groups at a time (at most [`F32_BAND_BYTES`] each), its
/// mean and biased variance taken by [`staged_mean`], `eps` inside the square root as torch does, and narrowed back.
/// `None` on the CPU and under autodiff (see [`on_gpu`]), and for groups that do not divide the channels (burn's
/// `forward` reports those).
fn norm_on_gpu(gn: &GroupNorm, x: &Tensor<4>, silu_after: bool) -> Option<Tensor<4>> {
    let ([n, c, h, w], groups, dtype) = (x.dims(), gn.num_groups, x.dtype());
    if !on_gpu(x) || groups == 0 || c != gn.num_channels || c % groups != 0 || n * c * h * w == 0 {
        return None;
    }
    let per_group = c / groups;
    let per_band = (F32_BAND_BYTES / (4 * n * per_group * h * w)).clamp(1, groups);
    let param = |p: &Option<burn::module::Param<Tensor<1>>>| {
        p.as_ref().filter(|_| gn.affine).map(|p| p.val().cast(DType::F32))
    };
    let (gamma, beta) = (param(&gn.gamma), param(&gn.beta));
    let mut bands = (0..groups).step_by(per_band).map(|g0| {
        let (c0, cc) = (g0 * per_group, per_band.min(groups - g0) * per_group);
        let xs = x.clone().narrow(1, c0, cc).cast(DType::F32).reshape([n, cc / per_group, per_group * h * w]);
        let centred = xs.clone() - staged_mean(xs);
        let var = staged_mean(centred.clone().square());
        let mut y = (centred / var.add_scalar(gn.epsilon).sqrt()).reshape([n, cc, h, w]);
        let per_channel = |p: &Tensor<1>| p.clone().narrow(0, c0, cc).reshape([1, cc, 1, 1]);
        if let Some(g) = &gamma {
            y = y * per_channel(g);
        }
        if let Some(b) = &beta {
            y = y + per_channel(b);
        }
        if silu_after { silu(y) } else { y }.cast(dtype)
    }).collect::<Vec<_>>();
    Some(if bands.len() == 1 { bands.remove(0) } else { Tensor::cat(bands, 1) })
}

/// The mean over the last axis of `[a, b, len]` (`[a, b, 1]`), taken as means of equal chunks of at most 1,024
/// values (the largest divisor of `len` up to 1,024), then means of those, and so on: burn's `mean_dim` on wgpu is
/// right at that length (see [`norm_on_gpu`]). A `len` with no divisor between 2 and 1,024 below itself (a prime
/// above 1,024) is reduced by `mean_dim` at once.
fn staged_mean(x: Tensor<3>) -> Tensor<3> {
    let [a, b, len] = x.dims();
    let chunk = (2..=len.min(1024)).rev().find(|d| len % d == 0).unwrap_or(len);
    if chunk == len {
        return x.mean_dim(2);
    }
    staged_mean(x.reshape([a * b, len / chunk, chunk]).mean_dim(2).reshape([a, b, len / chunk]))
}

pub fn linear(d_in: usize, d_out: usize, bias: bool, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out).with_bias(bias).init(device)
}

pub fn conv2d(c_in: usize, c_out: usize, kernel: usize, stride: usize, padding: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
        .init(device)
}

pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels).with_epsilon(eps).init(device)
}

pub fn layer_norm(dim: usize, eps: f64, device: &Device) -> LayerNorm {
    LayerNormConfig::new(dim).with_epsilon(eps).init(device)
}

/// Scaled dot-product attention over `[batch, seq, heads*dim]` projections.
pub fn multi_head_attention(q: Tensor<3>, k: Tensor<3>, v: Tensor<3>, heads: usize, causal: bool) -> Tensor<3> {
    let [b, sq, c] = q.dims();
    let sk = k.dims()[1];
    let d = c / heads;
    if !causal && heads > 0 && b * sq * sk * c > 0 && c % heads == 0 && crate::kernels::takes(&[&q, &k, &v]) {
        return crate::kernels::attention(q, k, v, heads, 1.0 / (d as f32).sqrt());
    }
    let split = |x: Tensor<3>, s: usize| x.reshape([b, s, heads, d]).swap_dims(1, 2);
    let options = AttentionModuleOptions { scale: Some(1.0 / (d as f64).sqrt()), softcap: None, is_causal: causal };
    // On a GPU, queries in chunks whose scores stay within a band (see [`F32_BAND_BYTES`]): burn 0.22 on wgpu
    // materialises the whole `[b, heads, queries, keys]` score matrix where it has no fused kernel — on lavapipe the
    // UNet's 8 heads over 4,096 positions at 512² asked for one 512 MiB buffer and failed. Each query's softmax is
    // its own, so chunks change nothing (a causal mask would, and only the text encoder's 77 tokens use one).
    let rows = match on_gpu(&q) && !causal && sq > 0 {
        true => (F32_BAND_BYTES / (4 * b * heads * sk).max(1)).clamp(1, sq),
        false => sq,
    };
    let (k, v) = (split(k, sk), split(v, sk));
    let mut parts = (0..sq.max(1)).step_by(rows.max(1)).map(|s0| {
        let n = rows.min(sq - s0);
        let q = if n == sq { q.clone() } else { q.clone().narrow(1, s0, n) };
        attention(split(q, n), k.clone(), v.clone(), None, None, options).swap_dims(1, 2).reshape([b, n, c])
    }).collect::<Vec<_>>();
    if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(parts, 1) }
}

/// `diffusers.models.attention_processor.Attention`: self- or cross-attention with `to_q/to_k/to_v/to_out.0`
/// (and, in the VAE, its own `group_norm` and a residual connection).
#[derive(Module, Debug)]
pub struct Attention {
    pub group_norm: Option<GroupNorm>,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    /// `to_out` is `[Linear, Dropout]` in diffusers; only index 0 has weights.
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

impl Attention {
    pub fn new(query_dim: usize, context_dim: usize, heads: usize, dim_head: usize, qkv_bias: bool,
               group_norm: Option<GroupNorm>, device: &Device) -> Self {
        let inner = heads * dim_head;
        Self {
            group_norm,
            to_q: linear(query_dim, inner, qkv_bias, device),
            to_k: linear(context_dim, inner, qkv_bias, device),
            to_v: linear(context_dim, inner, qkv_bias, device),
            to_out: vec![linear(inner, query_dim, true, device)],
            heads,
        }
    }

    /// `x`: `[b, s, c]`; `context`: `[b, s_ctx, c_ctx]` for cross-attention, `None` for self-attention.
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.fwd(x);
        let k = self.to_k.fwd(context.clone());
        let v = self.to_v.fwd(context);
        self.to_out[0].fwd(multi_head_attention(q, k, v, self.heads, false))
    }

    /// The VAE's spatial self-attention over `[b, c, h, w]`, with its group norm and residual.
    pub fn forward_spatial(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = match &self.group_norm {
            Some(n) => norm(n, x, false),
            None => x,
        };
        let x = x.reshape([b, c, h * w]).swap_dims(1, 2);
        let x = self.forward(x, None);
        x.swap_dims(1, 2).reshape([b, c, h, w]) + residual
    }
}

/// `diffusers.models.resnet.ResnetBlock2D` (time-scale-shift "default", output scale 1).
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn new(c_in: usize, c_out: usize, temb: Option<usize>, groups: usize, eps: f64, device: &Device) -> Self {
        Self {
            norm1: group_norm(groups, c_in, eps, device),
            conv1: conv2d(c_in, c_out, 3, 1, 1, device),
            time_emb_proj: temb.map(|t| linear(t, c_out, true, device)),
            norm2: group_norm(groups, c_out, eps, device),
            conv2: conv2d(c_out, c_out, 3, 1, 1, device),
            conv_shortcut: (c_in != c_out).then(|| conv2d(c_in, c_out, 1, 1, 0, device)),
        }
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let h = self.conv1.fwd(norm(&self.norm1, x.clone(), true));
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.fwd(silu(t.clone()));
                let [b, c] = t.dims();
                h + t.reshape([b, c, 1, 1])
            }
            _ => h,
        };
        let h = self.conv2.fwd(norm(&self.norm2, h, true));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.fwd(x),
            None => x,
        };
        shortcut + h
    }
}

/// `diffusers.models.downsampling.Downsample2D` with a strided 3×3 convolution. The VAE uses padding 0 after an
/// asymmetric (0, 1, 0, 1) pad; the UNet uses padding 1.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
    pub asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, device: &Device) -> Self {
        Self { conv: conv2d(channels, channels, 3, 2, padding, device), asymmetric_pad: padding == 0 }
    }
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.asymmetric_pad { x.pad([(0, 1), (0, 1)], burn::tensor::ops::PadMode::Constant(0.0)) } else { x };
        self.conv.fwd(x)
    }
}

/// `diffusers.models.upsampling.Upsample2D`: nearest-neighbour ×2 (or to the skip connection's size), then a 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, device: &Device) -> Self {
        Self { conv: conv2d(channels, channels, 3, 1, 1, device) }
    }
    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        if size == [h * 2, w * 2] && crate::kernels::takes_image(&x) {
            return self.conv.fwd(crate::kernels::upsample_nearest_2x(x));
        }
        let mut opts = InterpolateOptions::new(InterpolateMode::Nearest);
        opts.output_size = Some(size);
        self.conv.fwd(interpolate(x, opts))
    }
}

/// `diffusers.models.activations.GEGLU`.
#[derive(Module, Debug)]
pub struct GEGLU {
    pub proj: Linear,
}

impl GEGLU {
    /// On the CPU (f32, outside autodiff) [`crate::kernels::geglu`]: the projection and the gating in one pass;
    /// else burn's ops.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        if let Ok((w, bias)) = own_linear(&self.proj, &x) {
            if w.dims()[1] % 2 == 0 && w.dims()[1] > 0 {
                return crate::kernels::geglu(x, w, bias);
            }
        }
        let h = self.proj.fwd(x);
        let d = h.dims()[2] / 2;
        let hidden = h.clone().narrow(2, 0, d);
        let gate = h.narrow(2, d, d);
        hidden * gelu(gate)
    }
}

/// `diffusers.models.attention.FeedForward`: `net = [GEGLU, Dropout, Linear]`, so that keys read `ff.net.0.proj`
/// and `ff.net.2`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub net: (GEGLU, Dropout, Linear),
}

impl FeedForward {
    pub fn new(dim: usize, device: &Device) -> Self {
        let inner = dim * 4;
        Self {
            net: (GEGLU { proj: linear(dim, inner * 2, true, device) }, DropoutConfig::new(0.0).init(),
                  linear(inner, dim, true, device)),
        }
    }
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.net.2.fwd(self.net.0.forward(x))
    }
}

/// `diffusers.models.attention.BasicTransformerBlock` (SD-1.x: self-attention, cross-attention, GEGLU).
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(dim: usize, heads: usize, dim_head: usize, context_dim: usize, device: &Device) -> Self {
        Self {
            norm1: layer_norm(dim, 1e-5, device),
            attn1: Attention::new(dim, dim, heads, dim_head, false, None, device),
            norm2: layer_norm(dim, 1e-5, device),
            attn2: Attention::new(dim, context_dim, heads, dim_head, false, None, device),
            norm3: layer_norm(dim, 1e-5, device),
            ff: FeedForward::new(dim, device),
        }
    }
    pub fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self.attn2.forward(self.norm2.forward(x.clone()), Some(context.clone())) + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

/// `proj_in`/`proj_out` of a `Transformer2DModel`: 1×1 convolutions (SD-1.x) or linear layers
/// (`use_linear_projection`, SD-2.x). An enum module: the variant is chosen from the config, the key stays the same.
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// `diffusers.models.transformers.transformer_2d.Transformer2DModel` (continuous input).
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

impl Transformer2DModel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(channels: usize, heads: usize, context_dim: usize, layers: usize, groups: usize, linear_proj: bool,
               device: &Device) -> Self {
        let proj = || {
            if linear_proj {
                Projection::Linear(linear(channels, channels, true, device))
            } else {
                Projection::Conv(conv2d(channels, channels, 1, 1, 0, device))
            }
        };
        Self {
            norm: group_norm(groups, channels, 1e-6, device),
            proj_in: proj(),
            transformer_blocks: (0..layers)
                .map(|_| BasicTransformerBlock::new(channels, heads, channels / heads, context_dim, device))
                .collect(),
            proj_out: proj(),
        }
    }

    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = norm(&self.norm, x, false);
        let to_seq = |x: Tensor<4>| x.reshape([b, c, h * w]).swap_dims(1, 2);
        let mut x = match &self.proj_in {
            Projection::Conv(conv) => to_seq(conv.fwd(x)),
            Projection::Linear(lin) => lin.fwd(to_seq(x)),
        };
        for block in &self.transformer_blocks {
            x = block.forward(x, context);
        }
        let to_img = |x: Tensor<3>| x.swap_dims(1, 2).reshape([b, c, h, w]);
        let x = match &self.proj_out {
            Projection::Conv(conv) => conv.fwd(to_img(x)),
            Projection::Linear(lin) => to_img(lin.fwd(x)),
        };
        x + residual
    }
}
