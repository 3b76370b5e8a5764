//! The edited matrices: which ones a method may touch, reading them as f64, hashing them (so an erasure is only
//! applied to the weights it was computed for), and adding a low-rank ΔW = R·Xᵀ on the device.

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData};

use super::linalg::{self, M, identity};
use crate::error::{Error, Result};
use crate::load::StableDiffusion;
use crate::unet::UNet2DConditionModel;

/// Which network an edited matrix belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Component {
    Unet,
    TextEncoder,
}

impl Component {
    pub fn prefix(self) -> &'static str {
        match self {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        }
    }
}

/// ΔW = R·Xᵀ for one matrix (`name` is its diffusers key without `.weight`).
#[derive(Debug, Clone)]
pub struct Delta {
    pub component: Component,
    pub name: String,
    pub r: M,
    pub x: M,
}

impl Delta {
    pub fn dense(&self) -> M {
        &self.r * self.x.transpose()
    }

    /// The same ΔW with at most min(d_out, d_in) factor columns: when the factors are wider (an edit constrained
    /// on more keys than the width), ΔW itself becomes one factor and the identity of the smaller side the other
    /// (R = ΔW, X = I when d_in ≤ d_out; R = I, X = ΔWᵀ otherwise), so files and the on-device product stay no
    /// larger than one dense matrix, and compacting again changes nothing.
    pub fn compact(self) -> Self {
        let (d_out, d_in) = (self.r.nrows(), self.x.nrows());
        if self.r.ncols() <= d_out.min(d_in) {
            return self;
        }
        let dense = self.dense();
        if d_in <= d_out {
            Delta { r: dense, x: identity(d_in), ..self }
        } else {
            Delta { r: identity(d_out), x: dense.transpose().to_owned(), ..self }
        }
    }
}

/// Names of the UNet cross-attention projections `…attn2.to_k|to_v`, in UNet order (16 blocks × 2 on SD-1.x).
pub fn cross_attention_names(unet: &UNet2DConditionModel, targets: &[String]) -> Vec<String> {
    let mut names = vec![];
    let mut push = |prefix: String, n_blocks: usize| {
        for k in 0..n_blocks {
            for t in targets {
                names.push(format!("{prefix}.transformer_blocks.{k}.attn2.{t}"));
            }
        }
    };
    for (i, b) in unet.down_blocks.iter().enumerate() {
        for (j, a) in b.attentions.iter().enumerate() {
            push(format!("down_blocks.{i}.attentions.{j}"), a.transformer_blocks.len());
        }
    }
    for (j, a) in unet.mid_block.attentions.iter().enumerate() {
        push(format!("mid_block.attentions.{j}"), a.transformer_blocks.len());
    }
    for (i, b) in unet.up_blocks.iter().enumerate() {
        for (j, a) in b.attentions.iter().enumerate() {
            push(format!("up_blocks.{i}.attentions.{j}"), a.transformer_blocks.len());
        }
    }
    names
}

fn parse_idx(s: Option<&str>) -> Option<usize> {
    s?.parse().ok()
}

/// The `Linear` named `name` (diffusers key without `.weight`) in the UNet or the text encoder.
pub fn linear_mut<'a>(sd: &'a mut StableDiffusion, component: Component, name: &str) -> Option<&'a mut Linear> {
    let p: Vec<&str> = name.split('.').collect();
    match component {
        Component::Unet => {
            let attn = match p.first()? {
                &"down_blocks" => sd.unet.down_blocks.get_mut(parse_idx(p.get(1).copied())?)?
                    .attentions.get_mut(parse_idx(p.get(3).copied())?)?,
                &"up_blocks" => sd.unet.up_blocks.get_mut(parse_idx(p.get(1).copied())?)?
                    .attentions.get_mut(parse_idx(p.get(3).copied())?)?,
                &"mid_block" => sd.unet.mid_block.attentions.get_mut(parse_idx(p.get(2).copied())?)?,
                _ => return None,
            };
            let rest = if p[0] == "mid_block" { p.get(3..)? } else { p.get(4..)? };
            // transformer_blocks.{k}.attn2.{to_k|to_v}
            if rest.len() != 4 || rest[0] != "transformer_blocks" || rest[2] != "attn2" {
                return None;
            }
            let block = attn.transformer_blocks.get_mut(parse_idx(Some(rest[1]))?)?;
            match rest[3] {
                "to_k" => Some(&mut block.attn2.to_k),
                "to_v" => Some(&mut block.attn2.to_v),
                _ => None,
            }
        }
        Component::TextEncoder => {
            // text_model.encoder.layers.{l}.mlp.fc2
            if p.len() != 6 || p[0] != "text_model" || p[1] != "encoder" || p[2] != "layers" || p[4] != "mlp" || p[5] != "fc2" {
                return None;
            }
            let layer = sd.text_encoder.text_model.encoder.layers.get_mut(parse_idx(Some(p[3]))?)?;
            Some(&mut layer.mlp.fc2)
        }
    }
}

/// The matrix `name` of `component` (d_out × d_in, f64), or an error naming it when the model has none.
pub fn read_matrix(sd: &StableDiffusion, component: Component, name: &str) -> Result<M> {
    let mut sd = sd.clone(); // cheap: tensors are shared handles
    let lin = linear_mut(&mut sd, component, name).ok_or_else(|| {
        Error::InvalidModel { path: component.prefix().into(), message: format!("the model has no matrix {name}") }
    })?;
    read_weight(lin)
}

/// W (d_out × d_in) of a burn `Linear` (stored d_in × d_out), in f64 on the host.
pub fn read_weight(lin: &Linear) -> Result<M> {
    linalg::from_linear_weight(lin.weight.val())
}

/// SHA-256 of a matrix's values rounded to f16: the same for a model stored or computed in f32 or f16.
pub fn hash_values(v: impl IntoIterator<Item = f32>) -> String {
    let mut h = F16Hasher::default();
    let mut chunk = Vec::with_capacity(HASH_CHUNK);
    for x in v {
        chunk.push(x);
        if chunk.len() == HASH_CHUNK {
            h.update(&chunk);
            chunk.clear();
        }
    }
    h.update(&chunk);
    h.finish()
}

/// Values converted to f16 per call of [`F16Hasher::update`] (the conversion is vectorised: F16C where present).
const HASH_CHUNK: usize = 4096;

/// [`hash_values`] fed slice by slice.
#[derive(Default)]
struct F16Hasher {
    sha: sha2::Sha256,
    halves: Vec<half::f16>,
    bytes: Vec<u8>,
}

impl F16Hasher {
    fn update(&mut self, values: &[f32]) {
        use half::slice::HalfFloatSliceExt;
        use sha2::Digest;
        for part in values.chunks(HASH_CHUNK) {
            self.halves.resize(part.len(), half::f16::ZERO);
            self.halves.convert_from_f32_slice(part);
            self.bytes.clear();
            self.bytes.extend(self.halves.iter().flat_map(|x| x.to_le_bytes()));
            self.sha.update(&self.bytes);
        }
    }

    fn finish(self) -> String {
        use sha2::Digest;
        format!("{:x}", self.sha.finalize())
    }
}

/// [`hash_values`] of a slice.
pub fn hash_slice(values: &[f32]) -> String {
    let mut h = F16Hasher::default();
    h.update(values);
    h.finish()
}

pub fn hash_matrix(w: &M) -> String {
    hash_values((0..w.nrows()).flat_map(|i| (0..w.ncols()).map(move |j| (i, j))).map(|(i, j)| w[(i, j)] as f32))
}

/// Hash of every text-encoder parameter (module order). For a bundle's own (quantized) encoder, the hash of the
/// encoder it was quantized from, as its manifest records it: erasure files made for that encoder apply to its
/// quantized form.
pub fn text_encoder_hash(sd: &StableDiffusion) -> String {
    sd.text_encoder_identity.clone().unwrap_or_else(|| text_encoder_hash_of(&sd.text_encoder))
}

/// [`text_encoder_hash`] of one encoder.
pub fn text_encoder_hash_of(te: &crate::clip::CLIPTextModel) -> String {
    use burn::store::ModuleSnapshot;
    let tensors = te.collect(None, None, true);
    let hash_one = |t: &burn::store::burn_pack::Tensor| -> Option<(String, String)> {
        let data = burn::store::bridge::to_data(t).ok()?;
        if matches!(data.dtype(), burn::tensor::DType::QFloat(_)) {
            // Quantized: the stored values and scales identify it.
            use sha2::Digest;
            Some((t.name.clone(), format!("{:x}", sha2::Sha256::digest(data.as_bytes()))))
        } else if let Ok(v) = data.as_slice::<f32>() {
            Some((t.name.clone(), hash_slice(v)))
        } else {
            data.convert::<f32>().try_to_vec::<f32>().ok().map(|v| (t.name.clone(), hash_slice(&v)))
        }
    };
    // Each tensor is hashed on its own, so the work splits across threads (the token embedding alone is a third).
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let mut all: Vec<(String, String)> = std::thread::scope(|s| {
        let other = s.spawn(|| second.iter().filter_map(hash_one).collect::<Vec<_>>());
        let mut v: Vec<_> = first.iter().filter_map(hash_one).collect();
        v.extend(other.join().unwrap_or_default());
        v
    });
    all.sort();
    hash_values(all.iter().flat_map(|(n, h)| n.bytes().chain(h.bytes()).map(|b| b as f32)))
}

/// Adds ΔW = R·Xᵀ to the matrix on its device (the product is formed there).
pub fn apply_delta(sd: &mut StableDiffusion, delta: &Delta) -> Result<()> {
    let device = sd.dev().clone();
    let float = sd.device.precision.dtype();
    let lin = linear_mut(sd, delta.component, &delta.name)
        .ok_or_else(|| Error::InvalidModel { path: delta.component.prefix().into(),
                                             message: format!("the model has no matrix {}", delta.name) })?;
    let w = lin.weight.val();
    // A quantized matrix is edited in floating point (it stays so: the edit is not re-quantized), and one kept in
    // f16 in memory (a bundle's) in the model's precision, as if it had been widened at load.
    let w = if crate::tensor::is_quantized(&w) { crate::kernels::dequantize_any(w)? } else { w };
    let w = if w.dtype() != float { w.cast(float) } else { w };
    let [d_in, d_out] = w.dims();
    if delta.r.nrows() != d_out || delta.x.nrows() != d_in {
        return Err(Error::InvalidModel { path: delta.component.prefix().into(), message: format!(
            "{}: the erasure is for a {}×{} matrix, the model's is {d_out}×{d_in}",
            delta.name, delta.r.nrows(), delta.x.nrows()
        ) });
    }
    let dtype = w.dtype();
    let to_tensor = |m: &M| {
        Tensor::<2>::from_data(TensorData::new(linalg::to_f32(m), [m.nrows(), m.ncols()]), &device).cast(dtype)
    };
    // Stored layout is d_in × d_out, so the update is X·Rᵀ.
    let update = to_tensor(&delta.x).matmul(to_tensor(&delta.r).transpose());
    lin.weight = Param::from_tensor(w + update);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compact_keeps_the_product_and_narrow_factors() {
        // 3 × 4 matrix, factors of rank 6 (wider than min(3, 4)): compacted to R = ΔW, X = I.
        let r = M::from_fn(3, 6, |i, j| (i + 2 * j) as f64 * 0.5 - 1.0);
        let x = M::from_fn(4, 6, |i, j| ((i * 7 + j * 3) % 5) as f64 - 2.0);
        let wide = Delta { component: Component::Unet, name: "m".into(), r: r.clone(), x: x.clone() };
        let dense = wide.dense();
        let c = wide.compact();
        assert_eq!((c.r.ncols(), c.x.ncols()), (3, 3));
        assert!(linalg::frob(&(c.dense() - &dense)) < 1e-12);
        // Compacting again changes nothing; the taller case keeps ΔW as R.
        let again = c.clone().compact();
        assert_eq!((&again.r, &again.x), (&c.r, &c.x));
        let tall = Delta { component: Component::Unet, name: "m".into(), r: x.clone(), x: r.clone() }.compact();
        assert_eq!((tall.r.ncols(), tall.x.nrows()), (3, 3));
        assert!(linalg::frob(&(tall.dense() - &dense.transpose())) < 1e-12);
        // Narrow factors are kept as they are.
        let narrow = Delta { component: Component::Unet, name: "m".into(), r: r.subcols(0, 2).to_owned(),
                             x: x.subcols(0, 2).to_owned() };
        let c = narrow.clone().compact();
        assert_eq!((c.r, c.x), (narrow.r, narrow.x));
    }

    #[test]
    fn chunked_f16_hash_equals_the_value_by_value_definition() {
        // The definition erasure files were written with: each value rounded to f16 (from_f32), little-endian.
        fn reference(v: &[f32]) -> String {
            use sha2::Digest;
            let mut h = sha2::Sha256::new();
            for x in v {
                h.update(half::f16::from_f32(*x).to_le_bytes());
            }
            format!("{:x}", h.finalize())
        }
        // Ties, subnormals, overflow to ±inf, signed zeros, and more than one chunk.
        let mut v: Vec<f32> = vec![0.0, -0.0, 1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 6.0e-8, 3.0e-5,
                                   65504.0, 65520.0, -1.0e9, f32::MIN_POSITIVE];
        v.extend((0..10_000).map(|i| ((i as f32) * 0.7311).sin() * 1.0e3 / (1 + i % 97) as f32));
        assert_eq!(hash_slice(&v), reference(&v));
        assert_eq!(hash_values(v.iter().copied()), reference(&v));
        assert_eq!(hash_slice(&[]), reference(&[]));
    }
}
