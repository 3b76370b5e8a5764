//! Weight-only quantization of a model's components, and the reader that loads a component file while hashing
//! every byte it uses.
//!
//! # What is quantized (the rule)
//! - **Quantized**: the weight of every `Linear` (rank 2, `[out, in]`) and `Conv2d` (rank 4, `[out, in, kh, kw]`)
//!   whose input-channel count is a multiple of 32: symmetric int8 (±127) with one scale per output channel (for a
//!   conv, per output channel and kernel position), or int4 (±7) with one scale per block of 32 consecutive input
//!   channels (for a conv, at each kernel position).
//! - **Never quantized** (f16, "exact"): the UNet's cross-attention `attn2.to_k` / `attn2.to_v`. These are the
//!   matrices the closed-form erasures (UCE, TIME, RECE, SPEED, ErasePro) edit: keeping them in floating point
//!   keeps an erasure baked into a bundle the computed one (to f16 rounding), and keeps erasure files applicable
//!   to a quantized model (their base hashes are taken over f16-rounded values, so an f16 copy hashes the same).
//!   In SD-1.5 they are 2.2 % of the UNet's values.
//! - **f16**: everything else: norms, biases, the token and position embeddings, convolutions whose input
//!   channels are not a multiple of 32 (the UNet's and VAE's 4-channel `conv_in`/`conv_out`… ).
//!
//! # File format (`unsee-quantized`, version 2)
//! A safetensors file with the component's diffusers key names, and `__metadata__`
//! `{"format": "unsee-quantized", "version": "2", "quant": "int8"|"int4"|"f16", "block": "32",
//! "scales": "channel"|"block-u8"}` (no `scales` in an f16 file). A quantized weight `K` of PyTorch shape
//! `[out, in, …]` is stored as:
//! - `K`: int8 → dtype `I8`, the same shape; int4 → dtype `U8`, shape `[out, in/2, …]`: input channels `2c`
//!   (low nibble) and `2c+1` (high nibble) in one byte, each a 4-bit two's-complement value in −7..=7;
//! - int8 (`"scales": "channel"`): `K.qscale`, `F16` `[out, 1, …]`: one scale per output channel (and kernel
//!   position); the weight is `scale × q`;
//! - int4 (`"scales": "block-u8"`): `K.qscale`, `U8` `[out, in/32, …]`, and `K.qscale_row`, `F16` `[out, 1, …]`:
//!   the scale of a block of 32 input channels is `row × qscale / 255` (computed in f32; the row scale is the
//!   row's largest block scale, each block's rounded up to the next 1/255 of it), the weight `scale × q`.
//!
//! Version 1 (still read, no longer written) had `"scales"` absent and `K.qscale` `F16` `[out, in/32, …]` for both
//! (`"block"` storage, [`Scales::Block`]), 1/16 byte of scale per value; per-channel int8 and u8 block scales for
//! int4 cut that to almost nothing and to 1/32 (README *Measurements*: the bundle sizes); every version is read by
//! the same code.
//! Any safetensors reader can load it (e.g. Python, int4: `s = row.float() * qscale.float() / 255`,
//! `w = q.float() * s.repeat_interleave(32, 1)`). burn's own quantized storage (`.bpk`) was not used because its
//! reader cannot hash what it reads, and the safetensors writer of burn-store refuses quantized tensors.
//!
//! # In memory
//! Quantized weights stay quantized: they become burn `QFloat` tensors, dequantized per layer at use
//! ([`crate::nn::Forward`] → [`crate::kernels::dequantize`]). int8: `Q8S`, one i8 per value, blocks along the input
//! axis (a per-channel scale repeated over blocks as long as burn's `u8` block size allows), f32 scales. int4:
//! burn's CPU backend (`flex`) keeps one i8 per 4-bit value (twice the file), so unsee hands it the file's bytes
//! instead, two values per stored i8, as `Q4S` tensors whose input axis is halved (blocks of 16 bytes = 32
//! values): `Q4S` marks that packing ([`crate::kernels::is_packed4`]), only unsee's kernel reads such a tensor
//! ([`crate::kernels::dequantize`], [`crate::kernels::logical_dims`]), and burn-store's applier, which would refuse
//! the halved shape, is bypassed for them by a module mapper that checks the shape itself. On a GPU the weights
//! are widened at load instead ([`load_component`]'s `widen_quantized`). The f16 weights of `Linear`s and `Conv2d`s
//! ([`is_layer_weight`]: all of them in an f16 file, the "exact" and small ones in an int8/int4 file) stay f16 too
//! and are widened per call by [`crate::nn::Forward`]; norms, biases and embeddings are widened to the device's
//! precision at load.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::Path;

use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{ApplyError, ModuleAdapter, ModuleContext, ModuleSnapshot, PyTorchToBurnAdapter};
use burn::tensor::quantization::{QuantScheme, QuantStore, QuantValue, ScaleDtype};
use burn::tensor::{DType, TensorData};
use half::f16;
use safetensors::Dtype;
use sha2::Digest;

use crate::error::{Error, Result};
use crate::weights::{OwnedTensor, Precision};

/// Input channels per block.
pub const BLOCK: usize = 32;
pub const FORMAT: &str = "unsee-quantized";
/// The version written; version 1 files (every scale an f16 per block: [`Scales::Block`]) are still read.
pub const VERSION: &str = "2";
pub const SCALE_SUFFIX: &str = ".qscale";
/// The per-row f16 scale of [`Scales::BlockU8`].
pub const ROW_SCALE_SUFFIX: &str = ".qscale_row";
/// A component file's safetensors header may not exceed this (SD-1.5's UNet header is ~100 KB).
const MAX_HEADER: u64 = 64 * 1024 * 1024;

/// How a bundle stores its weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    F16,
    Int8,
    Int4,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::F16 => "f16",
            Quant::Int8 => "int8",
            Quant::Int4 => "int4",
        }
    }
    /// How this quantization's scales are written ([`Scales`]).
    pub fn scales(self) -> Scales {
        match self {
            Quant::Int4 => Scales::BlockU8,
            _ => Scales::Channel,
        }
    }
    /// Largest quantized magnitude.
    fn qmax(self) -> f32 {
        match self {
            Quant::Int4 => 7.0,
            _ => 127.0,
        }
    }
}

impl std::str::FromStr for Quant {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f16" | "fp16" => Ok(Quant::F16),
            "int8" | "q8" => Ok(Quant::Int8),
            "int4" | "q4" => Ok(Quant::Int4),
            _ => Err(format!("unknown quantization {s:?} (int8, int4 or f16)")),
        }
    }
}

/// How a quantized weight's scales are stored (`__metadata__` `"scales"`; see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scales {
    /// One f16 scale per block of 32 input channels: `K.qscale` F16 `[out, in/32, …]` (version 1; no longer
    /// written).
    Block,
    /// One f16 scale per output channel (and kernel position): `K.qscale` F16 `[out, 1, …]` (int8).
    Channel,
    /// One scale per block of 32 input channels, stored as a u8 fraction of its row's: `K.qscale` U8
    /// `[out, in/32, …]` and `K.qscale_row` F16 `[out, 1, …]`; scale = row × qscale / 255 (int4).
    BlockU8,
}

impl Scales {
    pub fn name(self) -> &'static str {
        match self {
            Scales::Block => "block",
            Scales::Channel => "channel",
            Scales::BlockU8 => "block-u8",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [Scales::Block, Scales::Channel, Scales::BlockU8].into_iter().find(|x| x.name() == s)
    }
}

/// How one tensor is stored (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Quantized,
    /// Never quantized because erasures edit it (stored in f16 like [`Storage::F16`]).
    Exact,
    F16,
}

/// The rule: `name` is a diffusers key, `shape` its PyTorch shape.
pub fn storage(name: &str, shape: &[usize]) -> Storage {
    if name.ends_with("attn2.to_k.weight") || name.ends_with("attn2.to_v.weight") {
        return Storage::Exact;
    }
    if is_layer_weight(name, shape) && shape[1] % BLOCK == 0 && shape[0] > 0 {
        Storage::Quantized
    } else {
        Storage::F16
    }
}

/// Whether `name` (a diffusers key, PyTorch shape `shape`) is the weight of a `Linear` or `Conv2d`: what the
/// modules multiply through [`crate::nn::Forward`], which widens a weight stored in f16 for the call.
pub fn is_layer_weight(name: &str, shape: &[usize]) -> bool {
    name.ends_with(".weight") && !name.contains("embeddings.") && !name.contains("norm") && matches!(shape.len(), 2 | 4)
}

/// Sizes of what [`quantize_module`] wrote.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Counts {
    pub quantized: usize,
    pub exact: usize,
    pub f16: usize,
}

/// The parameters of `module` (PyTorch layout and names) in `quant`'s storage, ready for
/// [`crate::weights::write_safetensors`] with [`metadata`].
pub fn quantize_module<M: ModuleSnapshot>(module: &M, quant: Quant) -> Result<(Vec<OwnedTensor>, Counts)> {
    quantize_module_as(module, quant, quant.scales())
}

/// [`quantize_module`] with the scales stored as `kind` ([`Scales::Block`]: a version-1 file, with
/// [`metadata_as`]).
pub(crate) fn quantize_module_as<M: ModuleSnapshot>(module: &M, quant: Quant, kind: Scales)
    -> Result<(Vec<OwnedTensor>, Counts)> {
    let mut out = vec![];
    let mut counts = Counts::default();
    for t in module.collect(None, Some(Box::new(burn::store::BurnToPyTorchAdapter)), true) {
        let name = t.name.clone();
        let data = burn::store::bridge::into_data(t).map_err(|e| Error::Internal(format!("{name}: {e:?}")))?;
        let shape = data.shape().to_vec();
        let values = data.convert::<f32>().try_into_vec::<f32>().map_err(|e| Error::Internal(format!("{name}: {e:?}")))?;
        if values.iter().any(|x| !x.is_finite()) {
            return Err(Error::NonFiniteWeights { component: name.clone(), count: 1, names: name });
        }
        match (storage(&name, &shape), quant) {
            (Storage::Quantized, Quant::Int8 | Quant::Int4) => {
                let (q, _, stored) = quantize(&values, &shape, quant, kind);
                let mut q_shape = shape.clone();
                if quant == Quant::Int4 {
                    q_shape[1] /= 2;
                }
                let (dtype, bytes) = match quant {
                    Quant::Int4 => (Dtype::U8, pack_int4(&q, &shape)),
                    _ => (Dtype::I8, q.iter().map(|&v| v as u8).collect()),
                };
                counts.quantized += values.len();
                for (suffix, dtype, shape, bytes) in stored {
                    out.push(OwnedTensor { name: format!("{name}{suffix}"), dtype, shape, bytes });
                }
                out.push(OwnedTensor { name, dtype, shape: q_shape, bytes });
            }
            (storage, _) => {
                if storage == Storage::Exact {
                    counts.exact += values.len();
                } else {
                    counts.f16 += values.len();
                }
                out.push(OwnedTensor { name, dtype: Dtype::F16, shape,
                                       bytes: values.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect() });
            }
        }
    }
    Ok((out, counts))
}

/// The `__metadata__` of a component file in `quant`'s storage.
pub fn metadata(quant: Quant) -> HashMap<String, String> {
    metadata_as(quant, quant.scales())
}

/// The `__metadata__` of a file written by [`quantize_module_as`] (version 1 for [`Scales::Block`]).
pub(crate) fn metadata_as(quant: Quant, kind: Scales) -> HashMap<String, String> {
    let v1 = kind == Scales::Block;
    [
        ("format".to_string(), FORMAT.to_string()),
        ("version".to_string(), if v1 { "1" } else { VERSION }.to_string()),
        ("quant".to_string(), quant.name().to_string()),
        ("block".to_string(), BLOCK.to_string()),
    ].into_iter().chain((quant != Quant::F16 && !v1).then(|| ("scales".to_string(), kind.name().to_string())))
        .collect()
}

/// Index of value `(o, i, rest)` in a row-major `[out, in, rest…]` tensor.
fn layout(shape: &[usize]) -> (usize, usize, usize) {
    (shape[0], shape[1], shape[2..].iter().product::<usize>())
}

/// The scale of a block stored as the u8 fraction `s` of its row's scale `row` ([`Scales::BlockU8`]): the one
/// expression the writer quantizes with and the reader dequantizes with.
fn u8_scale(row: f16, s: u8) -> f32 {
    row.to_f32() * s as f32 / 255.0
}

/// A stored scale tensor: (name suffix, dtype, shape, bytes).
pub type ScaleTensor = (&'static str, Dtype, Vec<usize>, Vec<u8>);

/// Symmetric quantization along axis 1 of `[out, in, rest…]`, blocks of 32 input channels, with `scales`' storage
/// ([`Scales`]): the values; the f32 scale of every block (`[out, in/32, rest]`), exactly what a reader
/// reconstructs from the stored scales, which are what the values were computed with; and the stored scale tensors.
pub fn quantize(values: &[f32], shape: &[usize], quant: Quant, scales: Scales) -> (Vec<i8>, Vec<f32>, Vec<ScaleTensor>) {
    let (o, i, r) = layout(shape);
    let nb = i / BLOCK;
    let qmax = quant.qmax();
    let idx = |oo: usize, c: usize, rr: usize| (oo * i + c) * r + rr;
    // The largest magnitude of every block, [out, in/32, rest].
    let mut peak = vec![0f32; o * nb * r];
    for oo in 0..o {
        for c in 0..i {
            for rr in 0..r {
                let p = &mut peak[(oo * nb + c / BLOCK) * r + rr];
                *p = p.max(values[idx(oo, c, rr)].abs());
            }
        }
    }
    // …and of every row (output channel, kernel position), [out, 1, rest].
    let mut row_peak = vec![0f32; o * r];
    for oo in 0..o {
        for b in 0..nb {
            for rr in 0..r {
                let p = &mut row_peak[oo * r + rr];
                *p = p.max(peak[(oo * nb + b) * r + rr]);
            }
        }
    }
    let f16_bytes = |v: &[f16]| v.iter().flat_map(|s| s.to_le_bytes()).collect::<Vec<u8>>();
    let (block_scale, stored): (Vec<f32>, Vec<ScaleTensor>) = match scales {
        Scales::Block => {
            let s: Vec<f16> = peak.iter().map(|p| f16::from_f32(p / qmax)).collect();
            (s.iter().map(|s| s.to_f32()).collect(), vec![(SCALE_SUFFIX, Dtype::F16, vec![o, nb, r], f16_bytes(&s))])
        }
        Scales::Channel => {
            let s: Vec<f16> = row_peak.iter().map(|p| f16::from_f32(p / qmax)).collect();
            let per_block = (0..o * nb * r).map(|k| s[(k / (nb * r)) * r + k % r].to_f32()).collect();
            (per_block, vec![(SCALE_SUFFIX, Dtype::F16, vec![o, 1, r], f16_bytes(&s))])
        }
        Scales::BlockU8 => {
            let row: Vec<f16> = row_peak.iter().map(|p| f16::from_f32(p / qmax)).collect();
            // Rounded up, so a block's scale is at least its own peak / qmax (up to the row's f16 rounding).
            let u: Vec<u8> = (0..o * nb * r).map(|k| {
                let rs = row[(k / (nb * r)) * r + k % r].to_f32();
                if rs > 0.0 { (255.0 * (peak[k] / qmax) / rs).ceil().clamp(0.0, 255.0) as u8 } else { 0 }
            }).collect();
            let per_block = (0..o * nb * r).map(|k| u8_scale(row[(k / (nb * r)) * r + k % r], u[k])).collect();
            (per_block, vec![(SCALE_SUFFIX, Dtype::U8, vec![o, nb, r], u),
                             (ROW_SCALE_SUFFIX, Dtype::F16, vec![o, 1, r], f16_bytes(&row))])
        }
    };
    let mut q = vec![0i8; values.len()];
    for oo in 0..o {
        for c in 0..i {
            for rr in 0..r {
                let s = block_scale[(oo * nb + c / BLOCK) * r + rr];
                if s > 0.0 {
                    q[idx(oo, c, rr)] = (values[idx(oo, c, rr)] / s).round().clamp(-qmax, qmax) as i8;
                }
            }
        }
    }
    // Stored shapes in the weight's rank: [out, in/32 or 1, kh, kw].
    let stored = stored.into_iter().map(|(suffix, dtype, s, bytes)| {
        let mut full = vec![s[0], s[1]];
        full.extend_from_slice(&shape[2..]);
        (suffix, dtype, full, bytes)
    }).collect();
    (q, block_scale, stored)
}

/// Packs int4 values in −7..=7 two per byte along axis 1 (channel 2c low nibble, 2c+1 high).
fn pack_int4(q: &[i8], shape: &[usize]) -> Vec<u8> {
    let (o, i, r) = layout(shape);
    let mut out = vec![0u8; q.len() / 2];
    for oo in 0..o {
        for c in 0..i / 2 {
            for rr in 0..r {
                let lo = q[(oo * i + 2 * c) * r + rr] as u8 & 0x0f;
                let hi = q[(oo * i + 2 * c + 1) * r + rr] as u8 & 0x0f;
                out[(oo * (i / 2) + c) * r + rr] = lo | (hi << 4);
            }
        }
    }
    out
}

/// The inverse of [`pack_int4`]; a nibble of 8 (−8) is refused by the caller's range check.
fn unpack_int4(packed: &[u8], shape: &[usize]) -> Vec<i8> {
    let (o, i, r) = layout(shape);
    let mut q = vec![0i8; o * i * r];
    let nib = |v: u8| ((v << 4) as i8) >> 4;
    for oo in 0..o {
        for c in 0..i / 2 {
            for rr in 0..r {
                let b = packed[(oo * (i / 2) + c) * r + rr];
                q[(oo * i + 2 * c) * r + rr] = nib(b & 0x0f);
                q[(oo * i + 2 * c + 1) * r + rr] = nib(b >> 4);
            }
        }
    }
    q
}

/// What a file is expected to be (from a bundle's manifest).
#[derive(Debug, Clone)]
pub struct Expected {
    pub sha256: String,
    pub size: u64,
}

/// One tensor entry of a safetensors header.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

fn dtype_of(s: &str) -> Option<(Dtype, u64)> {
    Some(match s {
        "F32" => (Dtype::F32, 4),
        "F16" => (Dtype::F16, 2),
        "BF16" => (Dtype::BF16, 2),
        "I8" => (Dtype::I8, 1),
        "U8" => (Dtype::U8, 1),
        _ => return None,
    })
}

/// Streams `path`: header, then every tensor in file order (each handed to `on_tensor` as soon as it is read, so
/// only one raw tensor is held at a time), hashing each byte read; `on_meta` sees the metadata before any tensor.
/// Returns the file's SHA-256, after comparing it with `expect`. Every offset and size is checked against the
/// file's real length before anything is allocated.
fn read_all(path: &Path, expect: Option<&Expected>,
            on_meta: &mut dyn FnMut(&HashMap<String, String>) -> Result<()>,
            on_tensor: &mut dyn FnMut(Entry, Vec<u8>) -> Result<()>) -> Result<Option<String>> {
    let corrupt = |m: String| Error::CorruptWeights { file: path.to_path_buf(), message: m };
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if let Some(e) = expect && e.size != size {
        return Err(Error::Bundle { file: path.to_path_buf(),
                                   message: format!("is {size} bytes, the manifest says {}", e.size) });
    }
    // Hashed only when checked against a manifest: a plain model folder is not, and 3.4 GB of SHA-256 is seconds.
    let mut hasher = expect.map(|_| sha2::Sha256::new());
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| corrupt("shorter than a safetensors header".into()))?;
    if let Some(h) = &mut hasher {
        h.update(len);
    }
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER || n > size - 8 {
        return Err(corrupt(format!("header length {n} exceeds the file or {MAX_HEADER} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    if let Some(h) = &mut hasher {
        h.update(&header);
    }
    let json: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header: {e}")))?;
    let mut meta = HashMap::new();
    let mut entries = vec![];
    for (name, v) in json {
        if name == "__metadata__" {
            meta = serde_json::from_value(v).map_err(|e| corrupt(format!("__metadata__: {e}")))?;
            continue;
        }
        let bad = |m: &str| corrupt(format!("tensor {name}: {m}"));
        let dtype = v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no dtype"))?;
        let (dtype, width) = dtype_of(dtype).ok_or_else(|| bad(&format!("unsupported dtype {dtype}")))?;
        let shape: Vec<usize> = v.get("shape").and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("no shape"))?;
        let offsets: [u64; 2] = v.get("data_offsets").and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("no data_offsets"))?;
        let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64)).ok_or_else(|| bad("shape overflows"))?;
        if shape.len() > 8 || offsets[1] < offsets[0] || numel.checked_mul(width) != Some(offsets[1] - offsets[0]) {
            return Err(bad(&format!("shape {shape:?} does not match its {} bytes", offsets[1].wrapping_sub(offsets[0]))));
        }
        entries.push(Entry { name, dtype, shape, start: offsets[0], end: offsets[1] });
    }
    entries.sort_by_key(|e| (e.start, e.end));
    let mut at = 0u64;
    for e in &entries {
        if e.start != at {
            return Err(corrupt(format!("tensor {} starts at {} instead of {at} (gap or overlap)", e.name, e.start)));
        }
        at = e.end;
    }
    if 8 + n + at != size {
        return Err(corrupt(format!("the tensors end at byte {} but the file has {size}", 8 + n + at)));
    }
    on_meta(&meta)?;
    for e in entries {
        let mut bytes = vec![0u8; (e.end - e.start) as usize];
        file.read_exact(&mut bytes).map_err(|err| Error::io(path, err))?;
        if let Some(h) = &mut hasher {
            h.update(&bytes);
        }
        on_tensor(e, bytes)?;
    }
    let digest = hasher.map(|h| format!("{:x}", h.finalize()));
    if let Some(e) = expect && Some(&e.sha256) != digest.as_ref() {
        return Err(Error::Bundle { file: path.to_path_buf(),
                                   message: "its SHA-256 does not match the manifest (altered or swapped)".into() });
    }
    Ok(digest)
}

/// Float bytes of `dtype` as `precision`; `None` if any value is NaN or Inf.
fn float_data(dtype: Dtype, bytes: &[u8], shape: Vec<usize>, precision: Precision, keep_f16: bool)
    -> Option<TensorData> {
    if keep_f16 && dtype == Dtype::F16 {
        let values: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
        return values.iter().all(|v| v.is_finite()).then(|| TensorData::new(values, shape));
    }
    let values: Vec<f32> = match dtype {
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return None;
    }
    Some(match precision {
        Precision::F32 => TensorData::new(values, shape),
        Precision::F16 => TensorData::new(values.into_iter().map(f16::from_f32).collect::<Vec<_>>(), shape),
    })
}

/// Which tensor of a quantized weight `K` an entry is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Values,
    Scale,
    Row,
}

/// The tensors of one quantized weight `K`: `K`, `K.qscale`, `K.qscale_row`.
#[derive(Default)]
struct Parts {
    values: Option<(Entry, Vec<u8>)>,
    scale: Option<(Entry, Vec<u8>)>,
    row: Option<(Entry, Vec<u8>)>,
}

/// Lets quantized tensors (already in burn's layout) through, and converts the others from PyTorch's.
#[derive(Clone)]
struct Adapter;

impl ModuleAdapter for Adapter {
    fn adapt(&self, tensor: PackTensor, ctx: ModuleContext<'_>) -> PackTensor {
        if matches!(tensor.dtype, DType::QFloat(_)) { tensor } else { PyTorchToBurnAdapter.adapt(tensor, ctx) }
    }
    fn get_alternative_param_name(&self, param_name: &str, container_type: &str) -> Option<String> {
        PyTorchToBurnAdapter.get_alternative_param_name(param_name, container_type)
    }
    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Puts packed 4-bit weights ([`crate::kernels::is_packed4`]) into their parameters, by path: burn-store's applier
/// refuses them, their shape being the parameter's with the packed axis halved. The checks are its own: the
/// parameter exists (else the weight is reported unused by [`check_applied`](crate::weights::check_applied)) and
/// has the weight's shape.
struct PutPacked {
    tensors: HashMap<String, TensorData>,
    path: Vec<String>,
    applied: Vec<String>,
    errors: Vec<ApplyError>,
}

impl burn::module::ModuleMapper for PutPacked {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }
    fn exit_module(&mut self, _name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
    }
    fn map_float<const D: usize>(&mut self, param: burn::module::Param<burn::tensor::Tensor<D>>)
        -> burn::module::Param<burn::tensor::Tensor<D>> {
        let path = self.path.join(".");
        let Some(data) = self.tensors.remove(&path) else { return param };
        let want = param.lazy_shape().to_vec();
        let mut found = data.shape().to_vec();
        if found.len() == D {
            found[crate::kernels::packed_axis(D)] *= 2;
        }
        if found != want {
            self.errors.push(ApplyError::ShapeMismatch { path, expected: want.into(), found: found.into() });
            return param;
        }
        let tensor = burn::tensor::Tensor::from_data(data, &param.lazy_device());
        self.applied.push(path);
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Bytes of converted tensors handed to the module at a time.
const APPLY_CHUNK: usize = 128 * 1024 * 1024;

/// [`ApplyResult`](burn::store::ApplyResult)s of several chunks, merged: a parameter is missing only if no chunk
/// applied it (or failed on it).
#[derive(Default)]
struct Applied {
    applied: std::collections::HashSet<String>,
    errors: Vec<ApplyError>,
    unused: Vec<String>,
    missing: Option<Vec<(String, String)>>,
}

impl Applied {
    fn add(&mut self, r: burn::store::ApplyResult) {
        self.applied.extend(r.applied);
        self.unused.extend(r.unused);
        self.missing = Some(r.missing);
        self.errors.extend(r.errors);
    }

    fn finish(self) -> burn::store::ApplyResult {
        let failed: std::collections::HashSet<String> = self.errors.iter().map(|e| match e {
            ApplyError::ShapeMismatch { path, .. } | ApplyError::DTypeMismatch { path, .. }
            | ApplyError::AdapterError { path, .. } | ApplyError::LoadError { path, .. } => path.clone(),
        }).collect();
        let missing = self.missing.unwrap_or_default().into_iter()
            .filter(|(p, _)| !self.applied.contains(p) && !failed.contains(p)).collect();
        burn::store::ApplyResult { applied: self.applied.into_iter().collect(), skipped: vec![], missing,
                                   unused: self.unused, errors: self.errors }
    }
}

/// What [`load_component`] read.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file's SHA-256, when it was checked against a manifest.
    pub sha256: Option<String>,
    /// `None` for a plain (unquantized) safetensors file.
    pub quant: Option<Quant>,
}

/// Reads `path` once (a plain or an `unsee-quantized` safetensors file) into `module`, 128 MiB at a time, and
/// checks it against `expect` (size first; SHA-256 of exactly the bytes that became weights at the end). `module`
/// must be a fresh one that the caller drops on any error: after an error it may hold part of the file.
/// Quantized tensors must be where the rule puts them, with a well-formed scale tensor. `widen_quantized`: quantized
/// weights become floating-point tensors of `precision` (`q × scale`, what the CPU computes per call) instead of
/// burn `QFloat` ones — for GPU devices, where burn's quantized tensors cannot hold this format (see
/// [`quantized_pack`]).
pub fn load_component<M: ModuleSnapshot>(module: &mut M, component: &str, path: &Path, precision: Precision,
                                         expect: Option<&Expected>, widen_quantized: bool) -> Result<Loaded> {
    load_in_chunks(module, component, path, precision, expect, APPLY_CHUNK, widen_quantized)
}

fn load_in_chunks<M: ModuleSnapshot>(module: &mut M, component: &str, path: &Path, precision: Precision,
                                     expect: Option<&Expected>, chunk: usize, widen_quantized: bool)
    -> Result<Loaded> {
    let widen = widen_quantized.then_some(precision);
    let corrupt = |m: String| Error::CorruptWeights { file: path.to_path_buf(), message: m };
    // A quantized weight's tensors (values, scales, row scales) until all of them are read.
    let mut pending: HashMap<String, Parts> = HashMap::new();
    let mut packs: Vec<PackTensor> = Vec::new();
    // Packed 4-bit weights, put in place by [`PutPacked`].
    let mut packed4: HashMap<String, TensorData> = HashMap::new();
    let mut packed_bytes = 0usize;
    // Tensors are handed to the module in chunks as they are read, so the component is held once (in the module)
    // plus one chunk, not twice. The module is the caller's fresh one: on any error (a digest mismatch found at
    // the end included) it is dropped, never used.
    let mut applied = Applied::default();
    let mut flush = |packs: &mut Vec<PackTensor>, packed4: &mut HashMap<String, TensorData>, module: &mut M| {
        if !packs.is_empty() {
            applied.add(module.apply(std::mem::take(packs), None, Some(Box::new(Adapter)), true));
        }
        if !packed4.is_empty() {
            let mut put = PutPacked { tensors: std::mem::take(packed4), path: vec![], applied: vec![], errors: vec![] };
            *module = module.clone().map(&mut put);
            applied.applied.extend(put.applied);
            applied.errors.extend(put.errors);
            applied.unused.extend(put.tensors.into_keys());
        }
    };
    let component_prefix = |name: &str| if component == "text_encoder" && !name.starts_with("text_model.") {
        format!("text_model.{name}")
    } else {
        name.to_string()
    };
    // The metadata (read before the first tensor) says whether and how the file is quantized.
    let quant_cell = std::cell::Cell::new(None::<Quant>);
    let kind_cell = std::cell::Cell::new(Scales::Block);
    let mut on_meta = |meta: &HashMap<String, String>| -> Result<()> {
        if meta.get("format").map(String::as_str) == Some(FORMAT) {
            let version = meta.get("version").map(String::as_str);
            if !matches!(version, Some("1" | VERSION)) || meta.get("block").map(String::as_str) != Some("32") {
                return Err(corrupt(format!("not a version-1 or -{VERSION} {FORMAT} file with blocks of {BLOCK}")));
            }
            let quant = meta.get("quant").and_then(|q| q.parse::<Quant>().ok())
                .ok_or_else(|| corrupt("metadata names no known quantization".into()))?;
            let kind = match (version, meta.get("scales")) {
                (Some("1"), None) => Scales::Block,
                (Some("1"), Some(_)) => return Err(corrupt("a version-1 file names no scale storage".into())),
                (_, Some(k)) => Scales::parse(k).ok_or_else(|| corrupt(format!("unknown scale storage {k:?}")))?,
                (_, None) if quant == Quant::F16 => Scales::Block,
                (_, None) => return Err(corrupt("metadata names no scale storage".into())),
            };
            quant_cell.set(Some(quant));
            kind_cell.set(kind);
        }
        Ok(())
    };
    let mut on_tensor = |e: Entry, bytes: Vec<u8>| -> Result<()> {
        if packed_bytes >= chunk {
            flush(&mut packs, &mut packed4, module);
            packed_bytes = 0;
        }
        let (quant, kind) = (quant_cell.get(), kind_cell.get());
        // A quantized weight `K` comes as `K`, `K.qscale` and (u8 block scales) `K.qscale_row`, in any order.
        let part = if let Some(base) = e.name.strip_suffix(ROW_SCALE_SUFFIX) {
            Some((base.to_string(), Part::Row))
        } else if let Some(base) = e.name.strip_suffix(SCALE_SUFFIX) {
            Some((base.to_string(), Part::Scale))
        } else if matches!(e.dtype, Dtype::I8 | Dtype::U8) {
            Some((e.name.clone(), Part::Values))
        } else {
            None
        };
        if let Some((base, part)) = part {
            if quant.is_none() {
                return Err(corrupt(format!("{}: quantized data or scales outside a {FORMAT} file", e.name)));
            }
            if part == Part::Row && kind != Scales::BlockU8 {
                return Err(corrupt(format!("{}: row scales in a file whose scales are {:?}", e.name, kind.name())));
            }
            let parts = pending.entry(base.clone()).or_default();
            match part {
                Part::Values => parts.values = Some((e, bytes)),
                Part::Scale => parts.scale = Some((e, bytes)),
                Part::Row => parts.row = Some((e, bytes)),
            }
            let complete = parts.values.is_some() && parts.scale.is_some()
                && (kind != Scales::BlockU8 || parts.row.is_some());
            if complete && let Some(Parts { values: Some((entry, values)), scale: Some(scale), row }) =
                pending.remove(&base) {
                packed_bytes += values.len();
                let name = component_prefix(&base);
                let data = quantized_pack(entry, values, scale, row, quant, kind, path, widen)?;
                if crate::kernels::is_packed4(data.dtype()) {
                    packed4.insert(name, data);
                } else {
                    packs.push(burn::store::bridge::from_data(data, name, None));
                }
            }
            return Ok(());
        }
        let name = component_prefix(&e.name);
        // A bundle's f16 layer weights stay f16 in memory (half the bytes of f32) and are widened per call.
        let keep_f16 = quant.is_some() && is_layer_weight(&e.name, &e.shape);
        let data = float_data(e.dtype, &bytes, e.shape, precision, keep_f16)
            .ok_or_else(|| Error::NonFiniteWeights { component: component.to_string(), count: 1, names: name.clone() })?;
        packed_bytes += data.as_bytes().len();
        packs.push(burn::store::bridge::from_data(data, name, None));
        Ok(())
    };
    let sha256 = read_all(path, expect, &mut on_meta, &mut on_tensor)?;
    let quant = quant_cell.get();
    if let Some(name) = pending.keys().next() {
        return Err(corrupt(format!("{name}: quantized values without their {SCALE_SUFFIX} (or \
                                    {ROW_SCALE_SUFFIX}) tensor, or the reverse")));
    }
    flush(&mut packs, &mut packed4, module);
    let result = applied.finish();
    crate::weights::check_applied(component, path, &result)?;
    Ok(Loaded { sha256, quant })
}

/// A quantized weight's data as a burn `QFloat` tensor in burn's layout (a `Linear`'s weight transposed to `[in, out]`), or
/// with `widen`, as a floating-point tensor of that precision in the file's layout (`q × scale`, computed in f32 as
/// the CPU's per-call dequantization does).
///
/// Why GPUs get the widened form (burn 0.22.1, wgpu; probed on lavapipe): `QuantStore::Native` (one i8 per value)
/// fails to compile (WGSL has no `i8`: "no definition in scope for identifier: `i8`"), and with
/// `QuantStore::PackedU32` burn's GPU kernels read a block as 32 consecutive elements of the stored tensor, while
/// this format's blocks run along the input axis, which burn's `[in, out]` `Linear` layout (and a k×k convolution's
/// `[out, in, k, k]`) does not keep contiguous: every value is read with another block's scale.
#[allow(clippy::too_many_arguments)]
fn quantized_pack(e: Entry, bytes: Vec<u8>, scale: (Entry, Vec<u8>), row: Option<(Entry, Vec<u8>)>,
                  quant: Option<Quant>, kind: Scales, path: &Path, widen: Option<Precision>) -> Result<TensorData> {
    let corrupt = |m: String| Error::CorruptWeights { file: path.to_path_buf(), message: format!("{}: {m}", e.name) };
    let quant = quant.filter(|q| *q != Quant::F16).ok_or_else(|| corrupt("integer weights in an f16 file".into()))?;
    if !matches!(e.shape.len(), 2 | 4) {
        return Err(corrupt(format!("shape {:?} is not rank 2 or 4", e.shape)));
    }
    // The weight's PyTorch shape, from its stored values (int4: two per byte along axis 1).
    let mut shape = e.shape.clone();
    let want = match quant {
        Quant::Int4 => {
            shape[1] = shape[1].checked_mul(2).ok_or_else(|| corrupt("shape overflows".into()))?;
            Dtype::U8
        }
        _ => Dtype::I8,
    };
    if e.dtype != want {
        return Err(corrupt(format!("{:?} values in an {} file", e.dtype, quant.name())));
    }
    if storage(&e.name, &shape) != Storage::Quantized {
        return Err(corrupt("this tensor is never quantized (norms, biases, embeddings, cross-attention keys and \
                            values stay in floating point, and quantized ones have a multiple of 32 input channels)"
            .into()));
    }
    let (o, i, r) = layout(&shape);
    let nb = i / BLOCK;
    let with_extent = |extent: usize| {
        let mut s = shape.clone();
        s[1] = extent;
        s
    };
    let f16s = |b: &[u8]| -> Vec<f16> { b.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect() };
    let bad_scale = |t: &Entry, dtype: Dtype, shape: &[usize]| corrupt(format!(
        "{} is {:?} {:?}; {} scales of this weight are {dtype:?} {shape:?}", t.name, t.dtype, t.shape, kind.name()));
    let (s_entry, s_bytes) = scale;
    let s_want = (if kind == Scales::BlockU8 { Dtype::U8 } else { Dtype::F16 },
                  with_extent(if kind == Scales::Channel { 1 } else { nb }));
    if s_entry.dtype != s_want.0 || s_entry.shape != s_want.1 {
        return Err(bad_scale(&s_entry, s_want.0, &s_want.1));
    }
    // Every block's f32 scale, [out, in/32, rest], from whichever storage.
    let row_of = |k: usize| (k / (nb * r)) * r + k % r;
    let scales: Vec<f32> = match kind {
        Scales::Block => f16s(&s_bytes).iter().map(|s| s.to_f32()).collect(),
        Scales::Channel => {
            let c = f16s(&s_bytes);
            (0..o * nb * r).map(|k| c[row_of(k)].to_f32()).collect()
        }
        Scales::BlockU8 => {
            let Some((r_entry, r_bytes)) = row else {
                return Err(corrupt(format!("no {ROW_SCALE_SUFFIX} tensor")));
            };
            if r_entry.dtype != Dtype::F16 || r_entry.shape != with_extent(1) {
                return Err(bad_scale(&r_entry, Dtype::F16, &with_extent(1)));
            }
            let rows = f16s(&r_bytes);
            (0..o * nb * r).map(|k| u8_scale(rows[row_of(k)], s_bytes[k])).collect()
        }
    };
    if scales.iter().any(|s| !s.is_finite() || *s < 0.0) {
        return Err(corrupt("scales must be finite and ≥ 0".into()));
    }
    // −8 (a nibble of 8) and −128 are outside the symmetric ranges.
    let out_of_range = match quant {
        Quant::Int4 => bytes.iter().any(|&b| b & 0x0f == 8 || b >> 4 == 8),
        _ => bytes.iter().any(|&b| b == 0x80),
    };
    if out_of_range {
        return Err(corrupt(format!("values outside ±{}", quant.qmax())));
    }
    if let Some(precision) = widen {
        let q: Vec<i8> = match quant {
            Quant::Int4 => unpack_int4(&bytes, &shape),
            _ => bytes.into_iter().map(|b| b as i8).collect(),
        };
        let values = q.iter().enumerate().map(|(idx, &v)| {
            let (oo, ii, rr) = (idx / (i * r), idx / r % i, idx % r);
            v as f32 * scales[(oo * nb + ii / BLOCK) * r + rr]
        });
        let data = match precision {
            Precision::F32 => TensorData::new(values.collect::<Vec<f32>>(), shape),
            Precision::F16 => TensorData::new(values.map(f16::from_f32).collect::<Vec<f16>>(), shape),
        };
        return Ok(data);
    }
    // burn QFloat, in the file's bytes: int8 one value per i8; int4 **two values per i8** (`Q4S` is unsee's mark
    // for that, [`crate::kernels::is_packed4`]: burn's CPU backend would otherwise hold one i8 per 4-bit value), its
    // shape the weight's with the input axis halved, blocks of 16 bytes = 32 values. A per-channel int8 scale is
    // the same for every block of its row, so its blocks are made as long as burn allows (a `u8`: the largest
    // multiple of 32 up to 224 that divides the input channels), a fifth to a sixth of the scales in memory.
    let (value, merge, block) = match quant {
        Quant::Int4 => (QuantValue::Q4S, 1, BLOCK / 2),
        _ => {
            let m = if kind == Scales::Channel { (1..=255 / BLOCK).rev().find(|m| nb % m == 0).unwrap_or(1) } else { 1 };
            (QuantValue::Q8S, m, BLOCK * m)
        }
    };
    let nbm = nb / merge;
    let scales: Vec<f32> = (0..o * nbm * r).map(|k| scales[((k / (nbm * r)) * nb + (k / r % nbm) * merge) * r + k % r])
        .collect();
    let values: Vec<i8> = bytes.into_iter().map(|b| b as i8).collect();
    let scheme = QuantScheme::default().with_value(value).with_store(QuantStore::Native);
    let data = if shape.len() == 2 {
        // burn's Linear holds [in, out]: transpose the stored values [out, in'] (in' = in, or in/2 packed) and the
        // scales [out, nbm] → [nbm, out].
        let ip = values.len() / o;
        let mut t = vec![0i8; values.len()];
        for oo in 0..o {
            for ii in 0..ip {
                t[ii * o + oo] = values[oo * ip + ii];
            }
        }
        let mut st = vec![0f32; scales.len()];
        for oo in 0..o {
            for b in 0..nbm {
                st[b * o + oo] = scales[oo * nbm + b];
            }
        }
        TensorData::quantized(t, [ip, o], scheme.per_block([block as u8, 1], ScaleDtype::F32), &st, None)
    } else {
        TensorData::quantized(values, e.shape.clone(), scheme.per_block([1, block as u8, 1, 1], ScaleDtype::F32),
                              &scales, None)
    };
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        assert_eq!(storage("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", &[320, 768]),
                   Storage::Exact);
        assert_eq!(storage("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight", &[320, 320]),
                   Storage::Quantized);
        assert_eq!(storage("down_blocks.0.resnets.0.conv1.weight", &[320, 320, 3, 3]), Storage::Quantized);
        assert_eq!(storage("conv_in.weight", &[320, 4, 3, 3]), Storage::F16);
        assert_eq!(storage("down_blocks.0.resnets.0.norm1.weight", &[320]), Storage::F16);
        assert_eq!(storage("text_model.embeddings.token_embedding.weight", &[49408, 768]), Storage::F16);
        assert_eq!(storage("down_blocks.0.resnets.0.conv1.bias", &[320]), Storage::F16);
    }

    /// The tiny model's VAE config, the CPU device and a randomly initialised VAE.
    fn tiny_vae() -> (crate::vae::VaeConfig, burn::tensor::Device, crate::vae::AutoencoderKL) {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny-sd");
        let cfg: crate::vae::VaeConfig = crate::model::read_config(&root, "vae", "config.json").unwrap();
        let dev = burn::tensor::Device::flex();
        let vae = crate::vae::AutoencoderKL::new(&cfg, &dev).unwrap();
        (cfg, dev, vae)
    }

    /// Loading in chunks of one tensor gives the same module as loading in one chunk, for int8 and int4 files of a
    /// (randomly initialised) tiny VAE, and a missing tensor is still reported once.
    #[test]
    fn chunked_loading_is_the_same_load() {
        let (cfg, dev, vae) = tiny_vae();
        let dir = std::env::temp_dir().join(format!("unsee-quant-chunks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let values = |m: &crate::vae::AutoencoderKL| -> Vec<f32> {
            m.collect(None, None, true).into_iter().flat_map(|t| {
                let d = burn::store::bridge::into_data(t).unwrap();
                let v = if matches!(d.dtype(), DType::QFloat(_)) {
                    let shape = d.shape().to_vec();
                    match shape.len() {
                        2 => crate::tensor::to_f32_vec(burn::tensor::Tensor::<2>::from_data(d, &dev)).unwrap(),
                        _ => crate::tensor::to_f32_vec(burn::tensor::Tensor::<4>::from_data(d, &dev)).unwrap(),
                    }
                } else {
                    d.convert::<f32>().try_into_vec::<f32>().unwrap()
                };
                v
            }).collect()
        };
        // Every scale storage with both value widths: version 2 as written, and the version-1 block scales.
        let kinds = [Scales::Channel, Scales::BlockU8, Scales::Block];
        for (quant, kind) in [Quant::Int8, Quant::Int4].into_iter().flat_map(|q| kinds.map(|k| (q, k))) {
            let (tensors, counts) = quantize_module_as(&vae, quant, kind).unwrap();
            assert!(counts.quantized > 0);
            let file = dir.join(format!("{}.safetensors", quant.name()));
            crate::weights::write_safetensors(&file, &tensors, Some(metadata_as(quant, kind))).unwrap();
            let mut whole = crate::vae::AutoencoderKL::new(&cfg, &dev).unwrap();
            load_in_chunks(&mut whole, "vae", &file, Precision::F32, None, usize::MAX, false).unwrap();
            let mut pieces = crate::vae::AutoencoderKL::new(&cfg, &dev).unwrap();
            load_in_chunks(&mut pieces, "vae", &file, Precision::F32, None, 1, false).unwrap();
            assert_eq!(values(&whole), values(&pieces), "{quant:?} {kind:?}");
            // What was loaded is `scale × q` with the writer's scales.
            let reference: Vec<f32> = vae.collect(None, Some(Box::new(burn::store::BurnToPyTorchAdapter)), true)
                .into_iter().flat_map(|t| {
                    let name = t.name.clone();
                    let d = burn::store::bridge::into_data(t).unwrap();
                    let shape = d.shape().to_vec();
                    let v = d.convert::<f32>().try_into_vec::<f32>().unwrap();
                    if storage(&name, &shape) != Storage::Quantized {
                        return v.into_iter().map(|x| f16::from_f32(x).to_f32()).collect::<Vec<_>>();
                    }
                    let (q, s, _) = quantize(&v, &shape, quant, kind);
                    let (_, i, r) = layout(&shape);
                    let w: Vec<f32> = q.iter().enumerate()
                        .map(|(k, &q)| q as f32 * s[(k / (i * r) * (i / BLOCK) + k / r % i / BLOCK) * r + k % r]).collect();
                    // burn holds a Linear's weight as [in, out].
                    if shape.len() == 2 {
                        let (o, i) = (shape[0], shape[1]);
                        (0..o * i).map(|k| w[(k % o) * i + k / o]).collect()
                    } else {
                        w
                    }
                }).collect();
            assert_eq!(values(&whole), reference, "{quant:?} {kind:?}");
            // One tensor left out: reported as missing, by name, in both modes.
            let short: Vec<OwnedTensor> = tensors.into_iter().filter(|t| t.name != "decoder.conv_in.bias").collect();
            crate::weights::write_safetensors(&file, &short, Some(metadata_as(quant, kind))).unwrap();
            for chunk in [1, usize::MAX] {
                let mut m = crate::vae::AutoencoderKL::new(&cfg, &dev).unwrap();
                match load_in_chunks(&mut m, "vae", &file, Precision::F32, None, chunk, false) {
                    Err(Error::WeightMismatch { report, .. }) => {
                        assert_eq!(report.matches("missing").count(), 1, "{report}");
                        assert!(report.contains("decoder.conv_in.bias"), "{report}");
                    }
                    other => panic!("expected a weight mismatch, got {:?}", other.map(|_| ())),
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Hostile int4 files of the tiny VAE: a missing row scale, two packed weights swapped (each the other's shape:
    /// the packed-weight mapper's own shape check), and one renamed to a layer that does not exist; each refused by
    /// name, nothing panics.
    #[test]
    fn broken_packed_files_are_refused_by_name() {
        let (cfg, dev, vae) = tiny_vae();
        let (tensors, _) = quantize_module(&vae, Quant::Int4).unwrap();
        let dir = std::env::temp_dir().join(format!("unsee-quant-broken-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |tensors: &[OwnedTensor]| {
            let file = dir.join("vae.safetensors");
            crate::weights::write_safetensors(&file, tensors, Some(metadata(Quant::Int4))).unwrap();
            let mut m = crate::vae::AutoencoderKL::new(&cfg, &dev).unwrap();
            load_in_chunks(&mut m, "vae", &file, Precision::F32, None, usize::MAX, false).map(|_| ())
        };
        load(&tensors).unwrap();
        let packed: Vec<&OwnedTensor> = tensors.iter().filter(|t| t.dtype == Dtype::U8 && !t.name.contains(".qscale"))
            .collect();
        // Two packed weights of different shapes.
        let a = packed[0];
        let b = packed.iter().find(|t| t.shape != a.shape).expect("two shapes");
        let (an, bn) = (a.name.clone(), b.name.clone());
        let rename = |from: &str, to: &str| -> Vec<OwnedTensor> {
            tensors.iter().map(|t| {
                let mut t = OwnedTensor { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone(),
                                          bytes: t.bytes.clone() };
                if let Some(rest) = t.name.strip_prefix(from) {
                    t.name = format!("{to}{rest}");
                } else if let Some(rest) = t.name.strip_prefix(to) {
                    t.name = format!("{from}{rest}");
                }
                t
            }).collect()
        };
        match load(&rename(&an, &bn)) {
            Err(Error::WeightMismatch { report, .. }) => assert!(report.contains("mis-shaped"), "{report}"),
            other => panic!("swapped packed weights: {:?}", other.map(|_| ())),
        }
        match load(&rename(&an, "decoder.nowhere.weight")) {
            Err(Error::WeightMismatch { report, .. }) => assert!(report.contains("decoder.nowhere.weight"), "{report}"),
            other => panic!("a packed weight for no layer: {:?}", other.map(|_| ())),
        }
        let no_row: Vec<OwnedTensor> = rename("", "").into_iter()
            .filter(|t| t.name != format!("{an}{ROW_SCALE_SUFFIX}")).collect();
        match load(&no_row) {
            Err(Error::CorruptWeights { message, .. }) => assert!(message.contains(&an), "{message}"),
            other => panic!("no row scales: {:?}", other.map(|_| ())),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn int4_packing_round_trips() {
        let shape = [3, 64, 2];
        let q: Vec<i8> = (0..3 * 64 * 2).map(|k| ((k * 7 % 15) as i8) - 7).collect();
        assert_eq!(unpack_int4(&pack_int4(&q, &shape), &shape), q);
    }

    #[test]
    fn quantization_error_is_bounded_by_half_a_step() {
        let shape = [4, 64];
        let v: Vec<f32> = (0..256).map(|k| ((k as f32) * 0.37).sin() * (1.0 + (k % 7) as f32)).collect();
        for quant in [Quant::Int8, Quant::Int4] {
            for kind in [Scales::Block, Scales::Channel, Scales::BlockU8] {
                let (q, s, _) = quantize(&v, &shape, quant, kind);
                for (k, x) in v.iter().enumerate() {
                    let scale = s[(k / 64) * 2 + (k % 64) / 32];
                    assert!((scale * q[k] as f32 - x).abs() <= 0.5 * scale * 1.01 + 1e-6, "{quant:?} {kind:?} at {k}");
                }
            }
        }
    }
}
