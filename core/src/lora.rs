//! LoRA adapters (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"), merged into the weights
//! at load as diffusers' `fuse_lora` does: for every adapted Linear or Conv2d weight W (out × in [× kh × kw]),
//!
//! ```text
//!     W' = W + s · (α / r) · B A
//! ```
//!
//! with A = `lora_down` / `lora_A` (r × in [× kh × kw]), B = `lora_up` / `lora_B` (out × r [× 1 × 1]), r the rank, α
//! the file's alpha and s the user's scale. Files:
//! - **kohya-ss** (`lora_unet_…`, `lora_te_…`, `.lora_down.weight`, `.lora_up.weight`, `.alpha`): the module path
//!   with `.` written `_`, in diffusers' names or in the original LDM ones (`lora_unet_input_blocks_1_1_proj_in`).
//!   Paths are matched against the model's own parameter names, so no table of names is kept;
//! - **diffusers / PEFT** (`unet.<path>.lora_A.weight`, `text_encoder.<path>.lora_B.weight`, as
//!   `save_lora_weights` writes): α from the `lora_adapter_metadata` that diffusers stores (`lora_alpha`,
//!   `alpha_pattern`, `use_rslora`), else α = r.
//!
//! Anything else in the file (LoHa/LoKr factors, DoRA magnitudes, a key naming no layer of this model, a shape that
//! does not fit) is refused with the key named: a LoRA is never partly applied. Quantized weights (bundles) are
//! refused: merge before building the bundle.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::store::{BurnToPyTorchAdapter, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
                  SafetensorsStore};
use burn::tensor::DType;
use safetensors::Dtype;

use crate::clip::CLIPTextModel;
use crate::error::{Error, Result};
use crate::unet::{UNet2DConditionModel, UNetConfig};
use crate::weights::{MappedSafetensors, OwnedTensor, Precision};

/// A LoRA file and the scale it is merged with (`FILE[:SCALE]` on the command line).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

impl std::str::FromStr for LoraSpec {
    type Err = String;
    /// `FILE` (scale 1) or `FILE:SCALE`; a path that itself contains `:` is taken whole unless what follows the
    /// last `:` is a number.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (path, scale) = match s.rsplit_once(':').map(|(p, x)| (p, x.parse::<f64>())) {
            Some((p, Ok(x))) => (p, x),
            _ => (s, 1.0),
        };
        if path.is_empty() {
            return Err("a LoRA needs a file: FILE or FILE:SCALE".into());
        }
        let spec = LoraSpec { path: PathBuf::from(path), scale };
        spec.check_scale().map_err(|e| e.to_string())?;
        Ok(spec)
    }
}

/// The largest |scale| accepted (LoRAs are used at 0–2; anything far beyond is a typo that would wreck the model).
pub const MAX_SCALE: f64 = 100.0;

impl LoraSpec {
    fn check_scale(&self) -> Result<()> {
        if !(self.scale.is_finite() && self.scale.abs() <= MAX_SCALE) {
            return Err(Error::InvalidRequest(format!(
                "LoRA scale {} for {} must be a finite number in [-{MAX_SCALE}, {MAX_SCALE}]", self.scale,
                self.path.display())));
        }
        Ok(())
    }
}

/// What merging one LoRA changed (`unsee info`, [`crate::engine::EngineInfo`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedLora {
    pub path: PathBuf,
    pub scale: f64,
    /// `kohya` or `peft`.
    pub format: String,
    /// Adapted layers per network (`unet`, `text_encoder`).
    pub layers: BTreeMap<String, usize>,
    /// sha256 of the file.
    pub sha256: String,
}

/// The network a LoRA entry adapts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Net {
    Unet,
    TextEncoder,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Unet => "unet",
            Net::TextEncoder => "text_encoder",
        }
    }
}

/// One adapted layer as read from the file: A (down), B (up), α.
#[derive(Default)]
struct Pair {
    down: Option<(Vec<usize>, Vec<f32>)>,
    up: Option<(Vec<usize>, Vec<f32>)>,
    alpha: Option<f64>,
}

/// The layers a LoRA can name: every Linear/Conv2d weight of the UNet and the text encoder, by each spelling of
/// its path, with its PyTorch-layout shape.
struct Targets {
    by_key: HashMap<String, (Net, String)>,
    ambiguous: Vec<String>,
    shapes: HashMap<(Net, String), Vec<usize>>,
    /// Layers stored quantized (a bundle), which cannot take a LoRA.
    quantized: HashSet<(Net, String)>,
}

/// Every Linear/Conv2d weight: (path, PyTorch-layout shape, quantized).
fn layer_shapes<M: ModuleSnapshot>(module: &M) -> Vec<(String, Vec<usize>, bool)> {
    module
        .collect(None, Some(Box::new(BurnToPyTorchAdapter)), true)
        .into_iter()
        .filter(|t| t.name.ends_with(".weight") && matches!(t.shape.as_slice().len(), 2 | 4))
        .map(|t| {
            // A packed 4-bit weight's stored input axis is half the layer's (`kernels::is_packed4`).
            let mut shape = t.shape.as_slice().to_vec();
            if crate::kernels::is_packed4(t.dtype) {
                shape[1] *= 2;
            }
            (t.name.trim_end_matches(".weight").to_string(), shape, matches!(t.dtype, DType::QFloat(_)))
        })
        .collect()
}

impl Targets {
    fn new(unet: &UNet2DConditionModel, unet_config: &UNetConfig, te: &CLIPTextModel) -> Self {
        let mut t = Targets { by_key: HashMap::new(), ambiguous: vec![], shapes: HashMap::new(),
                              quantized: Default::default() };
        for (path, shape, quantized) in layer_shapes(unet) {
            if quantized {
                t.quantized.insert((Net::Unet, path.clone()));
            }
            let mut keys = vec![format!("lora_unet_{}", path.replace('.', "_")), format!("unet.{path}")];
            if let Some(ldm) = crate::compvis::unet_key_to_compvis(&format!("{path}.weight"), unet_config) {
                keys.push(format!("lora_unet_{}", ldm.trim_end_matches(".weight").replace('.', "_")));
            }
            t.add(Net::Unet, &path, shape, keys);
        }
        for (path, shape, quantized) in layer_shapes(te) {
            if quantized {
                t.quantized.insert((Net::TextEncoder, path.clone()));
            }
            let bare = path.strip_prefix("text_model.").unwrap_or(&path).to_string();
            let keys = vec![format!("lora_te_{}", path.replace('.', "_")), format!("text_encoder.{path}"),
                            format!("text_encoder.text_model.{bare}"), format!("text_encoder.{bare}")];
            t.add(Net::TextEncoder, &path, shape, keys);
        }
        t
    }

    fn add(&mut self, net: Net, path: &str, shape: Vec<usize>, keys: Vec<String>) {
        for k in keys {
            match self.by_key.get(&k) {
                Some((n, p)) if (*n, p.as_str()) != (net, path) => self.ambiguous.push(k),
                Some(_) => {}
                None => {
                    self.by_key.insert(k, (net, path.to_string()));
                }
            }
        }
        self.shapes.insert((net, path.to_string()), shape);
    }
}

fn to_f32(view: &safetensors::tensor::TensorView<'_>) -> Option<Vec<f32>> {
    let d = view.data();
    Some(match view.dtype() {
        Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F16 => d.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::BF16 => d.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// α per adapted module of a diffusers/PEFT file, from its `lora_adapter_metadata` (keys `unet.lora_alpha`,
/// `unet.alpha_pattern`, `unet.use_rslora`, …): `(α, divide by √r instead of r)`.
struct PeftAlphas {
    meta: Option<serde_json::Map<String, serde_json::Value>>,
}

impl PeftAlphas {
    fn new(metadata: Option<&HashMap<String, String>>, bad: &dyn Fn(String) -> Error) -> Result<Self> {
        let meta = match metadata.and_then(|m| m.get("lora_adapter_metadata")) {
            None => None,
            Some(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(serde_json::Value::Object(m)) => Some(m),
                _ => return Err(bad("lora_adapter_metadata is not a JSON object".into())),
            },
        };
        Ok(Self { meta })
    }

    /// `(α, rslora)` for `module` (the file's path, without the `unet.`/`text_encoder.` prefix) of `net`; α = r when
    /// the file says nothing.
    fn get(&self, net: Net, module: &str, rank: usize, bad: &dyn Fn(String) -> Error) -> Result<(f64, bool)> {
        let Some(m) = &self.meta else { return Ok((rank as f64, false)) };
        let field = |k: &str| m.get(&format!("{}.{k}", net.name()));
        if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
            return Err(bad("DoRA adapters (use_dora) are not supported".into()));
        }
        let rslora = field("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        // PEFT matches a pattern key k against a module name n as `(.*\.)?k$`.
        let pattern = field("alpha_pattern").and_then(|v| v.as_object()).and_then(|p| {
            p.iter().filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v).next()
        });
        let alpha = match pattern.or_else(|| field("lora_alpha")) {
            None | Some(serde_json::Value::Null) => rank as f64,
            Some(v) => v.as_f64().filter(|a| a.is_finite())
                .ok_or_else(|| bad(format!("lora_alpha for {module} is not a finite number: {v}")))?,
        };
        Ok((alpha, rslora))
    }
}

/// One adapted layer: ΔW = factor · B A with B = `up` (out × r) and A = `down` (r × fan_in), row-major.
struct Layer {
    net: Net,
    /// The layer's path in the model (diffusers/transformers names).
    path: String,
    /// The weight's PyTorch-layout shape.
    shape: Vec<usize>,
    rank: usize,
    down: Vec<f32>,
    up: Vec<f32>,
    /// α / r (α / √r with rsLoRA).
    factor: f64,
}

impl Layer {
    /// ΔW = factor · B A (out × fan_in, row-major), multiplied in f32 as diffusers does.
    fn delta(&self) -> Vec<f32> {
        let (out, fan_in) = (self.shape[0], self.shape[1..].iter().product::<usize>());
        let b = faer::MatRef::from_row_major_slice(&self.up, out, self.rank);
        let a = faer::MatRef::from_row_major_slice(&self.down, self.rank, fan_in);
        let ba: faer::Mat<f32> = b * a;
        let f = self.factor as f32;
        let mut d = Vec::with_capacity(out * fan_in);
        for i in 0..out {
            d.extend((0..fan_in).map(|j| ba[(i, j)] * f));
        }
        d
    }
}

/// A LoRA read and checked against the model: its factors per adapted layer (ΔW is formed one layer at a time
/// while merging, so a full-size LoRA never holds a second copy of the UNet).
pub struct Lora {
    path: PathBuf,
    format: &'static str,
    sha256: String,
    layers: Vec<Layer>,
}

/// Merged weights are handed to the module in chunks of about this many bytes (f32), bounding the extra memory of
/// a merge whatever the LoRA's size.
const MERGE_CHUNK_BYTES: usize = 128 << 20;

/// The suffixes of the two formats: (suffix, role).
const SUFFIXES: [(&str, &str); 5] = [(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
                                     (".lora_A.weight", "down"), (".lora_B.weight", "up")];

impl Lora {
    /// Reads `path` and checks every entry against the layers of `unet` and `te`.
    pub fn read(path: &Path, unet: &UNet2DConditionModel, unet_config: &UNetConfig, te: &CLIPTextModel)
        -> Result<Self> {
        let bad = |m: String| Error::InvalidLora { file: path.to_path_buf(), message: m };
        if !path.exists() {
            return Err(bad("no such file".into()));
        }
        let mapped = MappedSafetensors::open(path)?;
        let sha256 = {
            use sha2::Digest;
            format!("{:x}", sha2::Sha256::digest(mapped.bytes()))
        };
        let targets = Targets::new(unet, unet_config, te);
        let st = mapped.tensors();
        let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
        let mut unknown = vec![];
        let (mut kohya, mut peft) = (false, false);
        for (name, view) in st.tensors() {
            let Some((stem, role)) = SUFFIXES.iter().find_map(|(s, r)| name.strip_suffix(s).map(|stem| (stem, *r)))
            else {
                unknown.push(name);
                continue;
            };
            if name.starts_with("lora_unet_") || name.starts_with("lora_te_") {
                kohya = true;
            } else {
                peft = true;
            }
            let values = to_f32(&view).ok_or_else(|| bad(format!("{name} is {:?}, not F32, F16 or BF16",
                                                                  view.dtype())))?;
            if values.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("{name} contains NaN or Inf")));
            }
            let pair = pairs.entry(stem.to_string()).or_default();
            let slot = match role {
                "down" => &mut pair.down,
                "up" => &mut pair.up,
                _ => {
                    if values.len() != 1 {
                        return Err(bad(format!("{name} must hold one value, not {:?}", view.shape())));
                    }
                    pair.alpha = Some(values[0] as f64);
                    continue;
                }
            };
            if slot.replace((view.shape().to_vec(), values)).is_some() {
                return Err(bad(format!("{stem} has two {role} matrices")));
            }
        }
        if !unknown.is_empty() {
            unknown.sort();
            return Err(bad(format!(
                "{} tensor(s) that are not plain LoRA factors (lora_down/lora_up/alpha or lora_A/lora_B; LoHa, LoKr, \
                 DoRA and the old `processor.*_lora` names are not supported): {}",
                unknown.len(), unknown.iter().take(5).cloned().collect::<Vec<_>>().join(", "))));
        }
        if pairs.is_empty() {
            return Err(bad("holds no LoRA layers".into()));
        }
        if kohya && peft {
            return Err(bad("mixes kohya (`lora_unet_…`) and diffusers (`unet.…`) names".into()));
        }
        let alphas = PeftAlphas::new(mapped.metadata().as_ref(), &bad)?;
        let mut layers = vec![];
        let mut seen = HashSet::new();
        for (stem, pair) in pairs {
            if targets.ambiguous.contains(&stem) {
                return Err(bad(format!("{stem} names more than one layer of this model")));
            }
            let Some((net, layer)) = targets.by_key.get(&stem) else {
                return Err(bad(format!("{stem} names no Linear or Conv2d layer of this model")));
            };
            if targets.quantized.contains(&(*net, layer.clone())) {
                return Err(bad(format!(
                    "{layer} is quantized (a bundle): merge the LoRA into the model the bundle is built from")));
            }
            if !seen.insert((*net, layer.clone())) {
                return Err(bad(format!("{layer} of the {} is adapted twice", net.name())));
            }
            let (Some((down_shape, down)), Some((up_shape, up))) = (pair.down, pair.up) else {
                return Err(bad(format!("{stem} needs both its down (A) and up (B) matrices")));
            };
            let w_shape = &targets.shapes[&(*net, layer.clone())];
            let rank = down_shape.first().copied().unwrap_or(0);
            let (out, fan_in) = (w_shape[0], w_shape[1..].iter().product::<usize>());
            let conv = w_shape.len() == 4;
            let want_down: Vec<usize> = [vec![rank], w_shape[1..].to_vec()].concat();
            let want_up = if conv { vec![out, rank, 1, 1] } else { vec![out, rank] };
            if rank == 0 || rank > out.min(fan_in) || down_shape != want_down || up_shape != want_up {
                return Err(bad(format!(
                    "{stem}: down {down_shape:?} and up {up_shape:?} do not fit {layer} {w_shape:?} (expected down \
                     [r, {}] and up {want_up:?} with 1 ≤ r ≤ {})",
                    w_shape[1..].iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "), out.min(fan_in))));
            }
            let (alpha, rslora) = match pair.alpha {
                Some(a) => (a, false),
                None if kohya => (rank as f64, false),
                None => {
                    let module = stem.split_once('.').map(|(_, m)| m).unwrap_or(&stem);
                    alphas.get(*net, module, rank, &bad)?
                }
            };
            let factor = if rslora { alpha / (rank as f64).sqrt() } else { alpha / rank as f64 };
            if !factor.is_finite() {
                return Err(bad(format!("{stem}: alpha {alpha} gives a non-finite scale")));
            }
            layers.push(Layer { net: *net, path: layer.clone(), shape: w_shape.clone(), rank, down, up, factor });
        }
        Ok(Self { path: path.to_path_buf(), format: if kohya { "kohya" } else { "peft" }, sha256, layers })
    }

    /// Whether the LoRA adapts the text encoder.
    pub fn touches_text_encoder(&self) -> bool {
        self.layers.iter().any(|l| l.net == Net::TextEncoder)
    }

    /// Merges `scale` · ΔW into the weights, in place, a chunk of layers at a time. Every check that does not need
    /// the merged values (scale, quantized targets) runs before any weight changes; a merge that overflows to
    /// NaN/Inf stops with an error and leaves the modules partly merged, so callers drop them (the load fails).
    pub fn merge(&self, scale: f64, unet: &mut UNet2DConditionModel, te: &mut CLIPTextModel, precision: Precision)
        -> Result<AppliedLora> {
        LoraSpec { path: self.path.clone(), scale }.check_scale()?;
        let unet_layers: Vec<&Layer> = self.layers.iter().filter(|l| l.net == Net::Unet).collect();
        let te_layers: Vec<&Layer> = self.layers.iter().filter(|l| l.net == Net::TextEncoder).collect();
        // Both modules' targets are collected and checked before either changes.
        let unet_pending = self.pending(unet, &unet_layers)?;
        let te_pending = self.pending(te, &te_layers)?;
        self.merge_into(unet, unet_pending, &unet_layers, scale, precision)?;
        self.merge_into(te, te_pending, &te_layers, scale, precision)?;
        let mut layers = BTreeMap::new();
        for (net, n) in [(Net::Unet, unet_layers.len()), (Net::TextEncoder, te_layers.len())] {
            if n > 0 {
                layers.insert(net.name().to_string(), n);
            }
        }
        Ok(AppliedLora { path: self.path.clone(), scale, format: self.format.to_string(), layers,
                         sha256: self.sha256.clone() })
    }

    /// The snapshots of `layers` in `module`, in the module's order; a quantized target (a bundle) is refused.
    fn pending<M: ModuleSnapshot>(&self, module: &M, layers: &[&Layer]) -> Result<Vec<burn::store::burn_pack::Tensor>> {
        if layers.is_empty() {
            return Ok(vec![]);
        }
        let names: HashSet<String> = layers.iter().map(|l| format!("{}.weight", l.path)).collect();
        // Only the snapshots of adapted layers are kept; each is dropped once read, so a replaced weight is freed as
        // soon as its merged copy is in the module.
        let pending: Vec<_> = module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true).into_iter()
            .filter(|s| names.contains(&s.name)).collect();
        if let Some(snap) = pending.iter().find(|s| matches!(s.dtype, DType::QFloat(_))) {
            return Err(Error::InvalidLora { file: self.path.clone(), message: format!(
                "{} is quantized (a bundle): merge the LoRA into the model the bundle is built from", snap.name) });
        }
        if pending.len() != layers.len() {
            return Err(Error::Internal(format!("{} of {} LoRA layers found in the module", pending.len(), layers.len())));
        }
        Ok(pending)
    }

    /// Adds `scale` · ΔW to each of `layers` in `module` (`pending`: their snapshots from [`Self::pending`]).
    fn merge_into<M: ModuleSnapshot>(&self, module: &mut M, mut pending: Vec<burn::store::burn_pack::Tensor>, layers: &[&Layer],
                                     scale: f64, precision: Precision) -> Result<()> {
        let bad = |m: String| Error::InvalidLora { file: self.path.clone(), message: m };
        let by_name: HashMap<String, &Layer> = layers.iter().map(|l| (format!("{}.weight", l.path), *l)).collect();
        pending.reverse();
        while !pending.is_empty() {
            let mut chunk = vec![];
            let mut bytes = 0;
            while bytes < MERGE_CHUNK_BYTES && let Some(snap) = pending.pop() {
                let layer = by_name[&snap.name];
                let name = snap.name.clone();
                let data = burn::store::bridge::into_data(snap).map_err(|e| Error::Internal(format!("{name}: {e:?}")))?;
                if data.shape().as_slice() != layer.shape.as_slice() {
                    return Err(Error::Internal(format!("{name}: shape changed to {:?}", data.shape())));
                }
                let mut w = data.convert::<f32>().try_into_vec::<f32>()
                    .map_err(|e| Error::Internal(format!("{name}: {e:?}")))?;
                for (w, d) in w.iter_mut().zip(layer.delta()) {
                    *w += (scale * d as f64) as f32;
                }
                if w.iter().any(|x| !x.is_finite()) {
                    return Err(bad(format!("{} becomes NaN or Inf with the LoRA merged at scale {scale}", layer.path)));
                }
                bytes += w.len() * 4;
                chunk.push(OwnedTensor::f32(name, layer.shape.clone(), &w));
            }
            let n = chunk.len();
            let serialized = crate::weights::safetensors_bytes(&chunk, None)?;
            drop(chunk);
            let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(precision.dtype()));
            let mut store = SafetensorsStore::from_bytes(Some(serialized)).with_from_adapter(adapter)
                .allow_partial(true).validate(false).skip_enum_variants(true);
            let result = module.load_from(&mut store).map_err(|e| Error::Internal(format!("merging a LoRA: {e}")))?;
            if !result.errors.is_empty() || !result.unused.is_empty() || result.applied.len() != n {
                return Err(Error::Internal(format!("merging a LoRA: {:?} {:?}", result.errors, result.unused)));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// α for diffusers/PEFT files: `lora_alpha`, an `alpha_pattern` entry (PEFT's `(.*\.)?key$` match on the module
    /// name), rsLoRA's √r, α = r without metadata, and DoRA refused.
    #[test]
    fn peft_alphas_follow_the_adapter_metadata() {
        let bad = |m: String| Error::InvalidRequest(m);
        let meta = |json: &str| HashMap::from([("lora_adapter_metadata".to_string(), json.to_string())]);
        let none = PeftAlphas::new(None, &bad).unwrap();
        assert_eq!(none.get(Net::Unet, "down_blocks.0.attn1.to_q", 4, &bad).unwrap(), (4.0, false));
        let m = meta(r#"{"unet.lora_alpha": 8, "unet.alpha_pattern": {"attn2.to_k": 2, "ff.net.2": 32},
                         "text_encoder.lora_alpha": 16, "text_encoder.use_rslora": true}"#);
        let a = PeftAlphas::new(Some(&m), &bad).unwrap();
        assert_eq!(a.get(Net::Unet, "down_blocks.0.attn1.to_q", 4, &bad).unwrap(), (8.0, false));
        assert_eq!(a.get(Net::Unet, "down_blocks.0.attn2.to_k", 4, &bad).unwrap(), (2.0, false));
        // a pattern matches whole trailing segments only
        assert_eq!(a.get(Net::Unet, "down_blocks.0.xattn2.to_k", 4, &bad).unwrap(), (8.0, false));
        assert_eq!(a.get(Net::TextEncoder, "encoder.layers.0.self_attn.q_proj", 4, &bad).unwrap(), (16.0, true));
        let dora = meta(r#"{"unet.use_dora": true}"#);
        assert!(PeftAlphas::new(Some(&dora), &bad).unwrap().get(Net::Unet, "x", 4, &bad).is_err());
        assert!(PeftAlphas::new(Some(&meta("[1, 2]")), &bad).is_err());
        let nan = meta(r#"{"unet.lora_alpha": "eight"}"#);
        assert!(PeftAlphas::new(Some(&nan), &bad).unwrap().get(Net::Unet, "x", 4, &bad).is_err());
    }

    #[test]
    fn lora_spec_parses_file_and_scale() {
        let s: LoraSpec = "a/b.safetensors:0.8".parse().unwrap();
        assert_eq!((s.path, s.scale), (PathBuf::from("a/b.safetensors"), 0.8));
        let s: LoraSpec = "a/b.safetensors".parse().unwrap();
        assert_eq!(s.scale, 1.0);
        let s: LoraSpec = "C:/x:y.safetensors".parse().unwrap();
        assert_eq!((s.path, s.scale), (PathBuf::from("C:/x:y.safetensors"), 1.0));
        assert!("x.safetensors:nan".parse::<LoraSpec>().is_err());
        assert!("x.safetensors:1e9".parse::<LoraSpec>().is_err());
        assert!(":0.5".parse::<LoraSpec>().is_err());
    }
}
