//! Closed-form concept erasure on the device.
//!
//! Conventions: a projection W is d_out × d_in and acts on column vectors (keys are text-encoder hidden states,
//! one column per token). Every method ends in a low-rank update ΔW = R·Xᵀ, stored as the factors (R, X).
//!
//! Methods (each cited once; formulas as in `../shared/reference/erasure-methods.md`):
//! - **UCE** — Gandikota et al., *Unified Concept Editing in Diffusion Models*, WACV 2024 (arXiv 2308.14761):
//!   min_W Σ_E s_e‖W k_e − W₀ k_g‖² + s_p Σ_P ‖W k_p − W₀ k_p‖² + λ‖W − W₀‖², whose solution is
//!   ΔW = W₀(K_G − K_E)·S·(M⁻¹K_E)ᵀ with M = λI + K_E S K_Eᵀ + s_p G (G = Σ_P k kᵀ, the preservation Gram).
//! - **TIME** — Orgad, Kawar, Belinkov, *Editing Implicit Assumptions in Text-to-Image Diffusion Models*, ICCV 2023
//!   (arXiv 2303.08084): the same ridge edit over all 77 source tokens aligned to the destination prompt, λ = 0.1.
//! - **RECE** — Gong et al., *Reliable and Efficient Concept Erasure*, ECCV 2024 (arXiv 2407.12383): after a UCE
//!   edit, C′ = (λ_reg I + Σ_l W′ₗᵀW′ₗ)⁻¹(Σ_l W′ₗᵀWₗ)C is the embedding that best regenerates the concept in the
//!   edited model; erase it towards " " with a ridge edit anchored at W′, and repeat.
//! - **SPEED** — Li et al., *Scalable, Precise, and Efficient Concept Erasure*, ICLR 2026 (arXiv 2503.07392):
//!   the ridge edit restricted to the null space of the preserved keys (after IPF filtering and DPA augmentation)
//!   and of the null-text keys (IEC), so those keys are left exactly unchanged.
//! - **ErasePro** — Chen et al., *Zero-Residual Concept Erasure via Progressive Alignment*, arXiv 2508.04472:
//!   min ‖W − W₀‖_F s.t. W X = W₀ Y, i.e. ΔW = W₀(Y − X)(XᵀX)⁻¹Xᵀ; `erasepro-text` applies it progressively to
//!   the text encoder's layers.
//! - **All-but-One** — Hong, Lee, Woo, AAAI 2024 (arXiv 2312.12807): the user-chosen replacement (`replace_with`).
//!
//! Hard constraints (`pin_unconditional`, SPEED's null space) are imposed exactly: the update is searched in the
//! orthogonal complement N of the pinned keys, ΔW = R·(N(NᵀMN)⁻¹NᵀK)ᵀ, so ΔW·k = 0 for every pinned k.

pub mod attack;
pub mod audit;
pub mod file;
pub mod linalg;
pub mod spec;

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{Int, Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::pipeline::StableDiffusion;
use crate::unet::UNet2DConditionModel;
use linalg::{M, from_columns, hcat, identity, zeros};
use spec::{Method, Spec, TokenMode};

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

    /// The same ΔW with at most min(d_out, d_in) factor columns: when the factors are wider than the matrix (an
    /// edit constrained on more keys than the width), R becomes ΔW itself and X the identity, so files and the
    /// on-device product stay no larger than one dense matrix.
    pub fn compact(self) -> Self {
        let (d_out, d_in) = (self.r.nrows(), self.x.nrows());
        if self.r.ncols() <= d_out.min(d_in) {
            return self;
        }
        let r = self.dense();
        Delta { r, x: identity(d_in), ..self }
    }
}

/// Timings of an edit, for `--json` and the benchmark.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct EditTimings {
    pub encode_s: f64,
    pub solve_s: f64,
    pub apply_s: f64,
}

/// The result of `erase`: the deltas plus what they were computed from.
#[derive(Debug, Clone)]
pub struct Edit {
    pub spec: Spec,
    pub deltas: Vec<Delta>,
    /// Hash of each edited matrix before the edit.
    pub base_hashes: BTreeMap<String, String>,
    /// Hash of the text encoder the keys were computed with.
    pub text_encoder_hash: String,
    pub timings: EditTimings,
    /// Per-layer residual ‖WX − T‖/‖T‖ of zero-residual solves (`erasepro`, `erasepro-text`).
    pub residuals: Vec<(String, f64)>,
    /// Things the user should know (e.g. a pin that had to be truncated on a narrow model).
    pub warnings: Vec<String>,
}

/// Fits a pinned basis (orthonormal, strongest direction first) into a `d`-dimensional space that must keep
/// `n_edit` free dimensions for the edit. On a narrow model (d close to 77) the null-text keys can span almost the
/// whole space; then only their strongest directions are pinned, and a warning says so.
fn fit_pin(u: M, d: usize, n_edit: usize, what: &str, warnings: &mut Vec<String>) -> M {
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

// ---------------------------------------------------------------------------------------------------------------
// Access to the edited matrices.

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
            let rest = if p[0] == "mid_block" { &p[3..] } else { &p[4..] };
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

/// W (d_out × d_in) of a burn `Linear` (stored d_in × d_out), in f64 on the host.
pub fn read_weight(lin: &Linear) -> M {
    let w = lin.weight.val();
    let [d_in, d_out] = w.dims();
    let v: Vec<f32> = w.cast(burn::tensor::DType::F32).into_data().try_to_vec::<f32>().expect("f32");
    M::from_fn(d_out, d_in, |o, i| v[i * d_out + o] as f64)
}

/// SHA-256 of a matrix's values rounded to f16: the same for a model stored or computed in f32 or f16.
pub fn hash_values(v: impl IntoIterator<Item = f32>) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut buf = Vec::with_capacity(8192);
    for x in v {
        buf.extend_from_slice(&half::f16::from_f32(x).to_le_bytes());
        if buf.len() >= 8192 {
            h.update(&buf);
            buf.clear();
        }
    }
    h.update(&buf);
    format!("{:x}", h.finalize())
}

pub fn hash_matrix(w: &M) -> String {
    hash_values((0..w.nrows()).flat_map(|i| (0..w.ncols()).map(move |j| (i, j))).map(|(i, j)| w[(i, j)] as f32))
}

/// Hash of every text-encoder parameter (module order).
pub fn text_encoder_hash(sd: &StableDiffusion) -> String {
    use burn::store::ModuleSnapshot;
    let tensors = sd.text_encoder.collect(None, None, true);
    let mut all = Vec::new();
    for t in &tensors {
        if let Ok(data) = burn::store::bridge::to_data(t)
            && let Ok(v) = data.convert::<f32>().try_to_vec::<f32>()
        {
            all.push((t.name.clone(), hash_values(v)));
        }
    }
    all.sort();
    hash_values(all.iter().flat_map(|(n, h)| n.bytes().chain(h.bytes()).map(|b| b as f32)))
}

/// Adds ΔW = R·Xᵀ to the matrix on its device (the product is formed there).
pub fn apply_delta(sd: &mut StableDiffusion, delta: &Delta) -> Result<()> {
    let device = sd.dev().clone();
    let lin = linear_mut(sd, delta.component, &delta.name)
        .ok_or_else(|| Error::InvalidRequest(format!("the model has no matrix {} in its {}", delta.name,
                                                      delta.component.prefix())))?;
    let w = lin.weight.val();
    let [d_in, d_out] = w.dims();
    if delta.r.nrows() != d_out || delta.x.nrows() != d_in {
        return Err(Error::InvalidRequest(format!(
            "{}: the erasure is for a {}×{} matrix, the model's is {d_out}×{d_in}",
            delta.name, delta.r.nrows(), delta.x.nrows()
        )));
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

// ---------------------------------------------------------------------------------------------------------------
// Prompt keys.

/// Host copies of text-encoder hidden states, by prompt and prefix length.
pub struct Keys<'a> {
    sd: &'a StableDiffusion,
    cache: BTreeMap<(String, usize), (M, crate::tokenizer::Tokens)>,
}

impl<'a> Keys<'a> {
    pub fn new(sd: &'a StableDiffusion) -> Self {
        Self { sd, cache: BTreeMap::new() }
    }

    /// Hidden states (d × len) of the first `len` positions of `prompt` (all 77 when `None`). CLIP is causal, so a
    /// prefix is encoded alone.
    pub fn hidden(&mut self, prompt: &str, len: Option<usize>) -> Result<(M, crate::tokenizer::Tokens)> {
        let tokens = self.sd.tokenizer.encode(prompt)?;
        let len = len.unwrap_or(tokens.ids.len()).min(tokens.ids.len()).max(1);
        if let Some(v) = self.cache.get(&(prompt.to_string(), len)) {
            return Ok(v.clone());
        }
        let ids: Vec<i64> = tokens.ids[..len].iter().map(|&i| i as i64).collect();
        let ids = Tensor::<1, Int>::from_data(TensorData::new(ids, [len]), self.sd.dev()).reshape([1, len]);
        let h = self.sd.text_encoder.forward(ids);
        let d = h.dims()[2];
        let v: Vec<f32> = h.cast(burn::tensor::DType::F32).into_data().try_to_vec::<f32>().expect("f32");
        let m = M::from_fn(d, len, |i, j| v[j * d + i] as f64);
        self.cache.insert((prompt.to_string(), len), (m.clone(), tokens.clone()));
        Ok((m, tokens))
    }

    /// The last subject token (the one before EOS) of `prompt`.
    pub fn last_token(&mut self, prompt: &str) -> Result<Vec<f64>> {
        let eos = self.sd.tokenizer.encode(prompt)?.eos_position;
        let (h, _) = self.hidden(prompt, Some(eos))?;
        Ok(h.col(eos - 1).iter().copied().collect())
    }

    /// Keys of `prompt` at the positions `mode` uses, each a column.
    pub fn columns(&mut self, prompt: &str, mode: TokenMode) -> Result<Vec<Vec<f64>>> {
        match mode {
            TokenMode::Last => Ok(vec![self.last_token(prompt)?]),
            TokenMode::Tail | TokenMode::All => {
                let (h, t) = self.hidden(prompt, None)?;
                let start = if mode == TokenMode::Tail { t.eos_position - 1 } else { 0 };
                Ok((start..h.ncols()).map(|j| h.col(j).iter().copied().collect()).collect())
            }
        }
    }
}

/// Pairs (concept position → replacement position) for aligning two prompts token by token: the common prefix
/// maps to itself, the differing spans map proportionally, and the tail after EOS maps by offset from EOS
/// (clamped to the last position). Used by TIME and `erasepro-text`.
pub fn align(src: &crate::tokenizer::Tokens, dst: &crate::tokenizer::Tokens) -> Vec<(usize, usize)> {
    let n = src.ids.len();
    let prefix = src.ids.iter().zip(&dst.ids).take_while(|(a, b)| a == b).count().min(src.eos_position).min(dst.eos_position);
    let (ls, ld) = (src.eos_position - prefix, dst.eos_position - prefix);
    (0..n)
        .map(|p| {
            let q = if p < prefix {
                p
            } else if p < src.eos_position {
                prefix + if ld == 0 { 0 } else { ((p - prefix) * ld) / ls.max(1) }.min(ld.saturating_sub(1))
            } else {
                (dst.eos_position + (p - src.eos_position)).min(n - 1)
            };
            (p, q)
        })
        .collect()
}

/// The erase pairs (concept key, guide key) for every concept, replacement and template.
fn erase_pairs(keys: &mut Keys, spec: &Spec) -> Result<(Vec<Vec<f64>>, Vec<Vec<f64>>)> {
    let (mut ke, mut kg) = (vec![], vec![]);
    for item in &spec.erase {
        for t in &spec.templates {
            let c = Spec::fill(t, &item.concept);
            let g = Spec::fill(t, &item.replace_with).trim().to_string();
            match spec.token_mode {
                TokenMode::Last => {
                    ke.push(keys.last_token(&c)?);
                    kg.push(keys.last_token(&g)?);
                }
                TokenMode::Tail => {
                    let a = keys.columns(&c, TokenMode::Tail)?;
                    let b = keys.columns(&g, TokenMode::Tail)?;
                    let n = a.len().min(b.len());
                    ke.extend(a.into_iter().take(n));
                    kg.extend(b.into_iter().take(n));
                }
                TokenMode::All => {
                    let (hc, tc) = keys.hidden(&c, None)?;
                    let (hg, tg) = keys.hidden(&g, None)?;
                    for (p, q) in align(&tc, &tg) {
                        ke.push(hc.col(p).iter().copied().collect());
                        kg.push(hg.col(q).iter().copied().collect());
                    }
                }
            }
        }
    }
    Ok((ke, kg))
}

/// Preservation Gram G = Σ k kᵀ over the preserve prompts (× templates) at the method's positions; for the
/// 2023-style `tail` mode the unconditional prompt "" is always included, as in UCE's original script.
/// Cached per text encoder, token mode and prompt list in `$UNSEE_CACHE_DIR` (default: the system temp dir).
pub fn preservation_gram(keys: &mut Keys, spec: &Spec, te_hash: &str, d: usize) -> Result<(M, usize)> {
    let mut prompts: Vec<String> = spec
        .preserve
        .iter()
        .flat_map(|p| spec.templates.iter().map(move |t| Spec::fill(t, p)))
        .collect();
    if spec.token_mode == TokenMode::Tail {
        prompts.push(String::new());
    }
    if prompts.is_empty() {
        return Ok((zeros(d, d), 0));
    }
    let key = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(te_hash.as_bytes());
        h.update(format!("{:?}", spec.token_mode).as_bytes());
        for p in &prompts {
            h.update(p.as_bytes());
            h.update([0u8]);
        }
        format!("{:x}", h.finalize())
    };
    let dir = std::env::var_os("UNSEE_CACHE_DIR").map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("unsee-cache"));
    let path = dir.join(format!("gram-{key}.bin"));
    if let Ok(bytes) = std::fs::read(&path)
        && bytes.len() == 8 + d * d * 8
    {
        let count = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let v: Vec<f64> = bytes[8..].chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
        tracing::info!("preservation Gram of {} prompts loaded from cache", prompts.len());
        return Ok((M::from_fn(d, d, |i, j| v[i * d + j]), count));
    }
    let mut g = zeros(d, d);
    let mut count = 0;
    for p in &prompts {
        let cols = keys.columns(p, if spec.token_mode == TokenMode::All { TokenMode::Last } else { spec.token_mode })?;
        let k = from_columns(d, &cols);
        g += &k * k.transpose();
        count += cols.len();
    }
    let _ = std::fs::create_dir_all(&dir);
    let mut bytes = (count as u64).to_le_bytes().to_vec();
    for i in 0..d {
        for j in 0..d {
            bytes.extend_from_slice(&g[(i, j)].to_le_bytes());
        }
    }
    // Write then rename, so a concurrent reader never sees a partial file.
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let partial = dir.join(format!("gram-{key}.{}-{n}.partial", std::process::id()));
    if std::fs::write(&partial, bytes).and_then(|_| std::fs::rename(&partial, &path)).is_err() {
        tracing::warn!("could not cache the preservation Gram in {}", dir.display());
    }
    Ok((g, count))
}

/// Orthonormal basis of the null-text ("") keys at all 77 positions: the unconditional branch of CFG.
pub fn null_text_basis(keys: &mut Keys) -> Result<M> {
    let (h, _) = keys.hidden("", None)?;
    linalg::orth_basis(&h, 1e-7, "null-text keys")
}

/// X-factor of the (optionally constrained) ridge solve: M⁻¹K, or N(NᵀMN)⁻¹NᵀK when ΔW must vanish on span(pin).
fn ridge_factor(m: &M, k: &M, pin: Option<&M>) -> Result<M> {
    match pin {
        None => linalg::spd_solve(m, k, "ridge system"),
        Some(u) if u.ncols() == 0 => linalg::spd_solve(m, k, "ridge system"),
        Some(u) => {
            let n = linalg::complement(u, m.nrows(), "pinned keys")?;
            if n.ncols() == 0 {
                return Err(Error::InvalidRequest(
                    "the pinned keys span the whole key space: nothing is left to edit".into(),
                ));
            }
            let small = n.transpose() * m * &n;
            let y = linalg::spd_solve(&small, &(n.transpose() * k), "constrained ridge system")?;
            Ok(&n * y)
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// The engine.

/// Computes the edit described by `spec` on `sd` (whose weights are the base) and applies it to `sd`.
pub fn erase(sd: &mut StableDiffusion, spec: &Spec) -> Result<Edit> {
    let t0 = Instant::now();
    let te_hash = text_encoder_hash(sd);
    let mut timings = EditTimings::default();
    if spec.method == Method::EraseproText {
        return erasepro_text(sd, spec, te_hash);
    }

    // Base weights of the targeted projections (host, f64).
    let names = cross_attention_names(&sd.unet, &spec.targets);
    if names.is_empty() {
        return Err(Error::InvalidModel { path: "unet".into(), message: "the UNet has no cross-attention".into() });
    }
    let mut w0 = Vec::with_capacity(names.len());
    for n in &names {
        let lin = linear_mut(sd, Component::Unet, n).expect("name from cross_attention_names");
        w0.push(read_weight(lin));
    }
    let d = w0[0].ncols();
    let base_hashes: BTreeMap<String, String> =
        names.iter().zip(&w0).map(|(n, w)| (format!("unet.{n}"), hash_matrix(w))).collect();

    let mut keys = Keys::new(sd);
    let (ke, kg) = erase_pairs(&mut keys, spec)?;
    let (ke, kg) = (from_columns(d, &ke), from_columns(d, &kg));
    let (gram, _) = preservation_gram(&mut keys, spec, &te_hash, d)?;
    let mut warnings = vec![];
    let pin = if spec.pin_unconditional {
        // Zero-residual edits need a free dimension per edited key; ridge edits only need some room.
        let n_edit = if spec.method == Method::Erasepro { ke.ncols() } else { 1 };
        Some(fit_pin(null_text_basis(&mut keys)?, d, n_edit, "pin_unconditional", &mut warnings))
    } else {
        None
    };
    timings.encode_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut residuals = vec![];
    let mut deltas: Vec<Delta> = match spec.method {
        Method::Uce | Method::Time | Method::Rece => {
            let s = spec.erase_scale;
            let m = identity(d) * spec.lambda + (&ke * ke.transpose()) * s + &gram * spec.preserve_scale;
            let x = ridge_factor(&m, &ke, pin.as_ref())?;
            let diff = (&kg - &ke) * s;
            names.iter().zip(&w0).map(|(n, w)| Delta {
                component: Component::Unet,
                name: n.clone(),
                r: w * &diff,
                x: x.clone(),
            }).collect()
        }
        Method::Erasepro => {
            // Zero residual: ΔW·X = W₀(Y − X) exactly (and ΔW·U = 0 for the pinned keys), minimum Frobenius norm.
            let z = match &pin {
                Some(u) => hcat(&ke, u),
                None => ke.clone(),
            };
            let full = linalg::right_pinv_factor(&z, "erasepro constraints")?;
            let x = full.subcols(0, ke.ncols()).to_owned();
            let diff = &kg - &ke;
            names.iter().zip(&w0).map(|(n, w)| {
                let r = w * &diff;
                let dw = &r * x.transpose();
                let target = w * &diff;
                let res = linalg::frob(&(&dw * &ke - &target)) / linalg::frob(&target).max(1e-30);
                residuals.push((n.clone(), res));
                Delta { component: Component::Unet, name: n.clone(), r, x: x.clone() }
            }).collect()
        }
        Method::Speed => speed(&mut keys, spec, &names, &w0, &ke, &kg, pin.as_ref(), &mut warnings)?,
        Method::EraseproText => unreachable!(),
    };
    timings.solve_s = t1.elapsed().as_secs_f64();

    if spec.method == Method::Rece && spec.rounds > 0 {
        let t2 = Instant::now();
        let more = rece_rounds(&mut keys, spec, &names, &w0, &deltas, d, pin.as_ref())?;
        for (delta, extra) in deltas.iter_mut().zip(more) {
            delta.r = hcat(&delta.r, &extra.0);
            delta.x = hcat(&delta.x, &extra.1);
        }
        timings.solve_s += t2.elapsed().as_secs_f64();
    }
    drop(keys);
    let deltas: Vec<Delta> = deltas.into_iter().map(Delta::compact).collect();

    let t3 = Instant::now();
    for delta in &deltas {
        apply_delta(sd, delta)?;
    }
    let _ = sd.dev().sync();
    timings.apply_s = t3.elapsed().as_secs_f64();
    Ok(Edit { spec: spec.clone(), deltas, base_hashes, text_encoder_hash: te_hash, timings, residuals, warnings })
}

/// SPEED's null-space edit for each matrix: ΔW = R·Xᵀ with R = W(C* − C₁)/n and X from the ridge system
/// αI + C₁C₁ᵀ/n restricted to the complement of span(preserved keys with eigenvalue ≥ τ, null-text keys).
#[allow(clippy::too_many_arguments)]
fn speed(keys: &mut Keys, spec: &Spec, names: &[String], w0: &[M], c1: &M, cs: &M, pin: Option<&M>,
         warnings: &mut Vec<String>) -> Result<Vec<Delta>> {
    let d = c1.nrows();
    let n = c1.ncols() as f64;
    let s_tt = (c1 * c1.transpose()) * (1.0 / n);
    let diff = (cs - c1) * (1.0 / n);
    // Retain keys: last subject tokens of preserve prompts that do not mention an erased concept (IPF, step 1).
    let words: Vec<String> = spec.erase.iter().map(|e| e.concept.to_lowercase()).collect();
    let mut retain = vec![];
    for p in &spec.preserve {
        if words.iter().any(|w| p.to_lowercase().contains(w)) {
            continue;
        }
        for t in &spec.templates {
            retain.push(keys.last_token(&Spec::fill(t, p))?);
        }
    }
    // IEC: [SOT] of "" and 3 k-means centroids of its tokens 1..76; with pin_unconditional, all 77 null-text keys.
    let iec = match pin {
        Some(u) => u.clone(),
        None => {
            let (h, _) = keys.hidden("", None)?;
            let mut cols = vec![h.col(0).iter().copied().collect::<Vec<f64>>()];
            cols.extend(kmeans(&(1..h.ncols()).map(|j| h.col(j).iter().copied().collect()).collect::<Vec<_>>(), 3));
            from_columns(d, &cols)
        }
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut out = vec![];
    for (name, w) in names.iter().zip(w0) {
        let e = w * &diff * c1.transpose() * linalg::lu_inverse(&(identity(d) + &s_tt));
        let norm_e = |k: &Vec<f64>| {
            let kv = from_columns(d, std::slice::from_ref(k));
            linalg::frob(&(&e * kv))
        };
        let above_mean = |ks: Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            if ks.is_empty() {
                return ks;
            }
            let norms: Vec<f64> = ks.iter().map(norm_e).collect();
            let mean = norms.iter().sum::<f64>() / norms.len() as f64;
            ks.into_iter().zip(norms).filter(|(_, n)| *n > mean).map(|(k, _)| k).collect()
        };
        let mut kept = if spec.filter { above_mean(retain.clone()) } else { retain.clone() };
        // DPA: perturb kept keys along W's smallest right-singular direction, keep the influential ones.
        if spec.augment > 0 && !kept.is_empty() {
            let (_, vecs) = linalg::sym_eigen(&(w.transpose() * w), "WᵀW")?;
            let vmin: Vec<f64> = vecs.col(0).iter().copied().collect();
            let mut aug = vec![];
            for k in &kept {
                for _ in 0..spec.augment {
                    let eps: f64 = StandardNormal.sample(&mut rng);
                    aug.push(k.iter().zip(&vmin).map(|(a, b)| a + eps * b).collect());
                }
            }
            kept.extend(above_mean(aug));
        }
        let mut pinned = iec.clone();
        if !kept.is_empty() {
            let k = from_columns(d, &kept);
            let sigma0 = (&k * k.transpose()) * (1.0 / kept.len() as f64);
            let (vals, vecs) = linalg::sym_eigen(&sigma0, "retain covariance")?;
            let big: Vec<usize> = (0..d).filter(|&i| vals[i] >= spec.null_threshold).collect();
            let u = M::from_fn(d, big.len(), |i, j| vecs[(i, big[j])]);
            pinned = hcat(&u, &iec);
        }
        let basis = linalg::orth_basis(&pinned, 1e-9, "SPEED constraints")?;
        let basis = fit_pin(basis, d, 1, &format!("SPEED {name}"), warnings);
        let m = identity(d) * spec.retain_scale + &s_tt;
        let x = ridge_factor(&m, &(c1 * (1.0 / n)), Some(&basis))?;
        out.push(Delta { component: Component::Unet, name: name.clone(), r: w * (cs - c1), x });
    }
    Ok(out)
}

/// Deterministic k-means (Lloyd, evenly spaced initial centres, 25 iterations).
fn kmeans(points: &[Vec<f64>], k: usize) -> Vec<Vec<f64>> {
    let k = k.min(points.len());
    let mut centres: Vec<Vec<f64>> = (0..k).map(|i| points[i * points.len() / k].clone()).collect();
    for _ in 0..25 {
        let mut sums = vec![vec![0.0; points[0].len()]; k];
        let mut counts = vec![0usize; k];
        for p in points {
            let c = (0..k)
                .min_by(|&a, &b| dist2(p, &centres[a]).total_cmp(&dist2(p, &centres[b])))
                .unwrap();
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

/// RECE's rounds. Returns, per matrix, the extra (R, X) columns of all rounds.
fn rece_rounds(keys: &mut Keys, spec: &Spec, names: &[String], w0: &[M], first: &[Delta], d: usize, pin: Option<&M>)
    -> Result<Vec<(M, M)>> {
    let mut current: Vec<M> = w0.iter().zip(first).map(|(w, dl)| w + dl.dense()).collect();
    let mut extra: Vec<(M, M)> = names.iter().map(|_| (zeros(0, 0), zeros(0, 0))).collect();
    let (guide, _) = keys.hidden(" ", None)?;
    for round in 0..spec.rounds {
        // C′ = (λ_reg I + Σ W′ᵀW′)⁻¹ (Σ W′ᵀW₀) C for each concept's full 77-token embedding.
        let mut a = identity(d) * spec.lambda_reg;
        let mut b = zeros(d, d);
        for (wc, w) in current.iter().zip(w0) {
            a += wc.transpose() * wc;
            b += wc.transpose() * w;
        }
        let mut ke_cols = vec![];
        let mut kg_cols = vec![];
        for item in &spec.erase {
            let (c, _) = keys.hidden(&item.concept, None)?;
            let adv = linalg::spd_solve(&a, &(&b * &c), "RECE embedding")?;
            for j in 0..adv.ncols() {
                ke_cols.push(adv.col(j).iter().copied().collect::<Vec<f64>>());
                kg_cols.push(guide.col(j).iter().copied().collect::<Vec<f64>>());
            }
        }
        let ke = from_columns(d, &ke_cols);
        let kg = from_columns(d, &kg_cols);
        // UCE step anchored at the current weights: λ = 0.1, preserve " " (and the spec's preserve set) at 0.1.
        let mut gram = &guide * guide.transpose();
        for p in &spec.preserve {
            let (h, _) = keys.hidden(p, None)?;
            gram += &h * h.transpose();
        }
        let m = identity(d) * 0.1 + &ke * ke.transpose() * spec.erase_scale + gram * spec.preserve_scale;
        let x = ridge_factor(&m, &ke, pin)?;
        let diff = (&kg - &ke) * spec.erase_scale;
        for (i, wc) in current.iter_mut().enumerate() {
            let r = &*wc * &diff;
            *wc += &r * x.transpose();
            let (er, ex) = &extra[i];
            extra[i] = if er.ncols() == 0 { (r, x.clone()) } else { (hcat(er, &r), hcat(ex, &x)) };
        }
        tracing::info!("RECE round {}: adversarial embedding erased", round + 1);
    }
    Ok(extra)
}

/// ErasePro's progressive text-encoder edit: layer by layer, `mlp.fc2` is changed (minimum norm) so that the
/// concept prompts' layer outputs equal the replacement prompts' outputs in the original encoder at the aligned
/// positions, with the features recomputed through the already-edited layers. `fc2` is the last linear map before
/// each layer's residual sum, so its edit sets the layer output directly, and it is the widest input (intermediate
/// size), which leaves the most room for zero residual.
fn erasepro_text(sd: &mut StableDiffusion, spec: &Spec, te_hash: String) -> Result<Edit> {
    let t0 = Instant::now();
    let dev = sd.dev().clone();
    let n_layers = sd.text_encoder.text_model.encoder.layers.len();
    let to_ids = |ids: &[u32]| {
        let v: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        Tensor::<1, Int>::from_data(TensorData::new(v, [ids.len()]), &dev).reshape([1, ids.len()])
    };
    let host = |t: Tensor<3>| -> M {
        let [_, s, d] = t.dims();
        let v: Vec<f32> = t.cast(burn::tensor::DType::F32).into_data().try_to_vec::<f32>().expect("f32");
        M::from_fn(d, s, |i, j| v[j * d + i] as f64)
    };
    // Pairs of (concept prompt, replacement prompt) and their aligned positions from the first differing token.
    let mut pairs = vec![];
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
        sd.text_encoder.forward_traced(to_ids(&r.ids), &mut |k, t| {
            if k > 0 {
                outs.push(host(t.clone()));
            }
        });
        original.push(outs);
    }
    let base_hashes = (0..n_layers)
        .map(|l| {
            let name = format!("text_model.encoder.layers.{l}.mlp.fc2");
            let w = read_weight(&sd.text_encoder.text_model.encoder.layers[l].mlp.fc2);
            (format!("text_encoder.{name}"), hash_matrix(&w))
        })
        .collect();
    let encode_s = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut deltas = vec![];
    let mut residuals = vec![];
    let mut warnings = vec![];
    for l in 0..n_layers {
        // Features entering layer l, through the edited layers 0..l.
        let layer_inputs = |sd: &StableDiffusion, ids: &[u32]| -> (M, M) {
            let mut x = sd.text_encoder.embed(to_ids(ids));
            for layer in &sd.text_encoder.text_model.encoder.layers[..l] {
                x = layer.forward(x);
            }
            let (mid, act) = sd.text_encoder.text_model.encoder.layers[l].forward_parts(x);
            (host(mid), host(act))
        };
        let fc2 = &sd.text_encoder.text_model.encoder.layers[l].mlp.fc2;
        let w = read_weight(fc2);
        let bias: Vec<f64> = match &fc2.bias {
            Some(b) => b.val().cast(burn::tensor::DType::F32).into_data().try_to_vec::<f32>().unwrap()
                .into_iter().map(f64::from).collect(),
            None => vec![0.0; w.nrows()],
        };
        let (mut a_cols, mut t_cols) = (vec![], vec![]);
        for (i, (c, _, map)) in pairs.iter().enumerate() {
            let (mid, act) = layer_inputs(sd, &c.ids);
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
            let (_, act_null) = layer_inputs(sd, &null.ids);
            let mut pinned = act_null;
            for (c, _, map) in &pairs {
                let prefix = map.first().map(|m| m.0).unwrap_or(0);
                if prefix > 1 {
                    let (_, act_c) = layer_inputs(sd, &c.ids[..prefix]);
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
        apply_delta(sd, &delta)?;
        deltas.push(delta);
    }
    let solve_s = t1.elapsed().as_secs_f64();
    Ok(Edit {
        spec: spec.clone(),
        deltas,
        base_hashes,
        text_encoder_hash: te_hash,
        timings: EditTimings { encode_s, solve_s, apply_s: 0.0 },
        residuals,
        warnings,
    })
}
