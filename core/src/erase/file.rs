//! Erasure files: the low-rank factors of an edit plus what it was computed from, as safetensors.
//!
//! Tensors: `<component>.<matrix>.R` (f32, d_out × r) and `<component>.<matrix>.X` (f32, d_in × r), with
//! ΔW = R·Xᵀ. Metadata: `format = "unsee-erasure"`, `version`, `method`, `spec` (the resolved spec as JSON),
//! `concepts`, `replacements`, `base_hashes` (hash of every edited matrix before the edit), `text_encoder_hash`
//! and `factors_sha256`: the SHA-256 of the claims (method, concepts, replacements, base hashes, text-encoder hash)
//! and of every factor's name, shape and bytes, so a file cannot claim to erase a concept other than the one its
//! factors were computed for without it showing (the signed bundles build on this digest). A file is applied only
//! to weights that hash the same; empty, zero or non-finite factors, and updates larger than
//! [`MAX_RELATIVE_UPDATE`] × the matrix, are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use super::Edit;
use super::linalg;
use super::matrices::{Component, Delta, apply_delta, hash_matrix, linear_mut, read_weight, text_encoder_hash};
use crate::error::{Error, Result};
use crate::load::StableDiffusion;
use crate::weights::{MappedSafetensors, OwnedTensor, write_safetensors};

pub const FORMAT: &str = "unsee-erasure";
pub const VERSION: &str = "2";
/// The largest ‖ΔW‖_F / ‖W‖_F an erasure file may apply (closed-form edits change a matrix by a fraction of its
/// norm; a factor scaled by 1e30 is an attack or a bug, not an erasure).
pub const MAX_RELATIVE_UPDATE: f64 = 100.0;
/// The largest matrix (d_out × d_in) an erasure file may edit: 16 M entries (SD-1.x's largest edited matrix, a
/// text-encoder `fc2`, has 2.4 M; SDXL's 6.6 M), so checking a file never allocates more than 128 MB.
pub const MAX_MATRIX_ENTRIES: usize = 16 << 20;

/// SHA-256 binding an erasure file's claims to its factors (`factors` = (name, shape, little-endian f32 bytes)).
fn factors_digest(claims: [&str; 6], factors: &[(String, Vec<usize>, Vec<u8>)]) -> String {
    let all: Vec<&str> = [FORMAT, VERSION].into_iter().chain(claims).collect();
    claims_digest(&all, factors)
}

/// SHA-256 over length-prefixed `claims` then `tensors` (name, shape, bytes) sorted by name: what binds a file's
/// metadata to its tensors (erasure files, hardened text-encoder deltas).
pub(crate) fn claims_digest(claims: &[&str], tensors: &[(String, Vec<usize>, Vec<u8>)]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for claim in claims {
        h.update((claim.len() as u64).to_le_bytes());
        h.update(claim.as_bytes());
    }
    let mut sorted: Vec<&(String, Vec<usize>, Vec<u8>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, shape, bytes) in sorted {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        for &s in shape {
            h.update((s as u64).to_le_bytes());
        }
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    format!("{:x}", h.finalize())
}

/// What an erasure file says about itself.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ErasureInfo {
    pub method: String,
    pub concepts: Vec<String>,
    pub replacements: Vec<String>,
    pub spec: serde_json::Value,
    pub base_hashes: BTreeMap<String, String>,
    pub text_encoder_hash: String,
    pub matrices: usize,
    pub rank: usize,
}

/// Writes `edit` as an erasure file (atomically).
pub fn save(edit: &Edit, path: &Path) -> Result<()> {
    let mut tensors = vec![];
    for d in &edit.deltas {
        let key = format!("{}.{}", d.component.prefix(), d.name);
        for (suffix, m) in [("R", &d.r), ("X", &d.x)] {
            tensors.push(OwnedTensor::f32(format!("{key}.{suffix}"), vec![m.nrows(), m.ncols()], &linalg::to_f32(m)));
        }
    }
    let method = edit.spec.method.name().to_string();
    let concepts = to_json(&edit.spec.erase.iter().map(|e| &e.concept).collect::<Vec<_>>())?;
    let replacements = to_json(&edit.spec.erase.iter().map(|e| &e.replace_with).collect::<Vec<_>>())?;
    let base_hashes = to_json(&edit.base_hashes)?;
    let factors: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|t| (t.name.clone(), t.shape.clone(), t.bytes.clone())).collect();
    let spec = to_json(&edit.spec)?;
    let digest =
        factors_digest([&method, &spec, &concepts, &replacements, &base_hashes, &edit.text_encoder_hash], &factors);
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("version".to_string(), VERSION.to_string());
    meta.insert("method".to_string(), method);
    meta.insert("spec".to_string(), spec);
    meta.insert("concepts".to_string(), concepts);
    meta.insert("replacements".to_string(), replacements);
    meta.insert("base_hashes".to_string(), base_hashes);
    meta.insert("text_encoder_hash".to_string(), edit.text_encoder_hash.clone());
    meta.insert("factors_sha256".to_string(), digest);
    write_safetensors(path, &tensors, Some(meta))
}

/// JSON text of a metadata value.
fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Internal(e.to_string()))
}

/// Reads an erasure file: its description and its deltas.
pub fn load(path: &Path) -> Result<(ErasureInfo, Vec<Delta>)> {
    let bad = |message: String| Error::InvalidErasureFile { file: path.to_path_buf(), message };
    let mapped = MappedSafetensors::open(path)?;
    let (_, header) = SafeTensors::read_metadata(mapped.bytes()).map_err(|e| bad(e.to_string()))?;
    let meta = header.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(bad("missing format = unsee-erasure".into()));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(bad(format!("unsupported version {:?}", meta.get("version"))));
    }
    let json = |k: &str| -> Result<serde_json::Value> {
        serde_json::from_str(meta.get(k).ok_or_else(|| bad(format!("no {k}")))?).map_err(|e| bad(format!("{k}: {e}")))
    };
    let strings = |v: serde_json::Value| -> Vec<String> {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default()
    };
    let base_hashes: BTreeMap<String, String> =
        serde_json::from_value(json("base_hashes")?).map_err(|e| bad(format!("base_hashes: {e}")))?;
    if base_hashes.is_empty() {
        return Err(bad("it edits no matrix".into()));
    }
    let text = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("no {k}")));
    let st = mapped.tensors();
    let mut factors = vec![];
    let mut deltas = vec![];
    for key in base_hashes.keys() {
        let (component, name) = match key.split_once('.') {
            Some(("unet", n)) => (Component::Unet, n),
            Some(("text_encoder", n)) => (Component::TextEncoder, n),
            _ => return Err(bad(format!("unknown matrix {key}"))),
        };
        let dims = |suffix: &str| -> Result<Vec<usize>> {
            let v = st.tensor(&format!("{key}.{suffix}")).map_err(|_| bad(format!("missing {key}.{suffix}")))?;
            if v.dtype() != Dtype::F32 || v.shape().len() != 2 {
                return Err(bad(format!("{key}.{suffix} must be a 2-D f32 tensor")));
            }
            Ok(v.shape().to_vec())
        };
        let read = |suffix: &str| -> Result<(linalg::M, Vec<usize>, Vec<u8>)> {
            let v = st.tensor(&format!("{key}.{suffix}")).map_err(|_| bad(format!("missing {key}.{suffix}")))?;
            if v.dtype() != Dtype::F32 || v.shape().len() != 2 {
                return Err(bad(format!("{key}.{suffix} must be a 2-D f32 tensor")));
            }
            let f: Vec<f32> = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            if f.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("{key}.{suffix} contains NaN or Inf")));
            }
            Ok((linalg::from_f32(v.shape()[0], v.shape()[1], &f), v.shape().to_vec(), v.data().to_vec()))
        };
        let (r_dims, x_dims) = (dims("R")?, dims("X")?);
        let (d_out, d_in, rank) = (r_dims[0], x_dims[0], r_dims[1]);
        if rank != x_dims[1] || rank == 0 || rank > d_out.max(d_in) {
            return Err(bad(format!("{key}: R and X must have the same rank, between 1 and the matrix width")));
        }
        if d_out.max(d_in) > crate::limits::MAX_WIDTH || d_out * d_in > MAX_MATRIX_ENTRIES {
            return Err(bad(format!("{key}: a {d_out}×{d_in} matrix is larger than any unsee edits")));
        }
        let ((r, r_shape, r_bytes), (x, x_shape, x_bytes)) = (read("R")?, read("X")?);
        let delta = Delta { component, name: name.to_string(), r, x };
        let norm = linalg::frob(&delta.dense());
        if !(norm.is_finite() && norm > 0.0) {
            return Err(bad(format!("{key}: the update is {norm} (empty, zero or overflowing)")));
        }
        factors.push((format!("{key}.R"), r_shape, r_bytes));
        factors.push((format!("{key}.X"), x_shape, x_bytes));
        deltas.push(delta);
    }
    let method = text("method")?;
    let (concepts, replacements) = (text("concepts")?, text("replacements")?);
    let te_hash = text("text_encoder_hash")?;
    let base_json = text("base_hashes")?;
    let spec_json = text("spec")?;
    let digest = factors_digest([&method, &spec_json, &concepts, &replacements, &base_json, &te_hash], &factors);
    if meta.get("factors_sha256") != Some(&digest) {
        return Err(bad("factors_sha256 does not match its claims and factors (altered after it was written)".into()));
    }
    let info = ErasureInfo {
        method,
        concepts: strings(json("concepts")?),
        replacements: strings(json("replacements")?),
        spec: json("spec")?,
        base_hashes,
        text_encoder_hash: te_hash,
        matrices: deltas.len(),
        rank: deltas.iter().map(|d| d.r.ncols()).max().unwrap_or(0),
    };
    if info.concepts.is_empty() {
        return Err(bad("it names no concept".into()));
    }
    Ok((info, deltas))
}

/// Applies an erasure file to `sd`, after checking that it was computed for exactly these weights and this text
/// encoder. Files are applied in order: each must have been computed on the model as the previous ones left it.
pub fn apply_file(sd: &mut StableDiffusion, path: &Path) -> Result<ErasureInfo> {
    let (info, deltas) = load(path)?;
    apply_checked(sd, path, &info, &deltas)?;
    Ok(info)
}

/// Applies deltas read from the erasure file `path` (see [`load`]) after the same checks as [`apply_file`]. On a
/// model with only some networks loaded (a low-memory engine's stage, [`crate::load::Parts`]) it checks and applies
/// what concerns those: the deltas of the loaded networks, and the text-encoder identity when it is known.
pub fn apply_checked(sd: &mut StableDiffusion, path: &Path, info: &ErasureInfo, deltas: &[Delta]) -> Result<()> {
    if sd.text_encoder.is_loaded() || sd.text_encoder_identity.is_some() {
        let te = text_encoder_hash(sd);
        if te != info.text_encoder_hash {
            return Err(Error::ErasureMismatch {
                file: path.to_path_buf(),
                message: "it was computed with another text encoder (its keys would not match this one's)".into(),
            });
        }
    }
    let loaded = |d: &&Delta| match d.component {
        Component::Unet => sd.unet.is_loaded(),
        Component::TextEncoder => sd.text_encoder.is_loaded(),
    };
    let deltas: Vec<&Delta> = deltas.iter().filter(loaded).collect();
    for d in deltas.iter().copied() {
        let key = format!("{}.{}", d.component.prefix(), d.name);
        let lin = linear_mut(sd, d.component, &d.name).ok_or_else(|| Error::ErasureMismatch {
            file: path.to_path_buf(),
            message: format!("the model has no matrix {key}"),
        })?;
        let (d_out, d_in) = (d.r.nrows(), d.x.nrows());
        let [w_in, w_out] = crate::kernels::logical_dims(&lin.weight.val());
        if (d_out, d_in) != (w_out, w_in) {
            return Err(Error::ErasureMismatch {
                file: path.to_path_buf(),
                message: format!("{key} is {w_out}×{w_in} in the model, {d_out}×{d_in} in the erasure"),
            });
        }
        let w = read_weight(lin)?;
        let (update, norm) = (linalg::frob(&d.dense()), linalg::frob(&w));
        if update > MAX_RELATIVE_UPDATE * norm {
            return Err(Error::InvalidErasureFile { file: path.to_path_buf(), message: format!(
                "{key}: the update is {:.3e} × the matrix (more than {MAX_RELATIVE_UPDATE}×)", update / norm.max(1e-30)
            ) });
        }
        if Some(&hash_matrix(&w)) != info.base_hashes.get(&key) {
            return Err(Error::ErasureMismatch {
                file: path.to_path_buf(),
                message: format!("{key} differs from the weights the erasure was computed for (another base model, \
                                  or erasures applied in another order)"),
            });
        }
    }
    for d in deltas {
        apply_delta(sd, d)?;
    }
    Ok(())
}

/// Writes a complete diffusers folder with the edited weights: every file of the base folder is copied, and the
/// edited matrices are rewritten in their original dtype. The folder is built beside `out` under a temporary name
/// and renamed into place at the end, so `out` is either absent or complete. Only regular files are copied (a FIFO
/// or a device is refused, never opened); a symlink is followed only to a regular file inside the model folder (or,
/// for a Hugging Face cache snapshot, inside its repository folder); `out` may not lie inside the model folder.
pub fn bake(sd: &StableDiffusion, deltas: &[Delta], out: &Path) -> Result<()> {
    let crate::model::ModelLocation::Folder(src) = &sd.location else {
        return Err(Error::InvalidRequest("--bake needs a diffusers folder as the base model".into()));
    };
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::InvalidRequest(format!("{} exists and is not empty", out.display())));
    }
    let src = std::fs::canonicalize(src).map_err(|e| Error::io(src, e))?;
    let name = out.file_name().ok_or_else(|| Error::InvalidRequest(format!("{} names no folder", out.display())))?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let parent = std::fs::canonicalize(&parent).map_err(|e| Error::io(&parent, e))?;
    if parent.join(name).starts_with(&src) {
        return Err(Error::InvalidRequest(format!("{} lies inside the model folder it would copy", out.display())));
    }
    // Symlinks may lead to the snapshot's repository folder (models--org--name/blobs), nowhere else.
    let mut roots = vec![src.clone()];
    if src.parent().and_then(|p| p.file_name()).is_some_and(|n| n == "snapshots")
        && let Some(repo) = src.parent().and_then(Path::parent)
    {
        roots.push(repo.to_path_buf());
    }
    static BAKES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = BAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staging = parent.join(format!(".{}.baking-{}-{n}", name.to_string_lossy(), std::process::id()));
    // Created here, exclusively: only a folder this call created is ever removed.
    std::fs::create_dir(&staging).map_err(|e| Error::io(&staging, e))?;
    let built = copy_dir(&src, &staging, &roots, 0).and_then(|_| bake_deltas(deltas, &staging));
    let done = built.and_then(|_| {
        if out.exists() {
            std::fs::remove_dir(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&staging, out).map_err(|e| Error::io(out, e))
    });
    if done.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    done
}

/// Rewrites the edited matrices of the copied folder `out`.
fn bake_deltas(deltas: &[Delta], out: &Path) -> Result<()> {
    for (component, stem) in [(Component::Unet, "diffusion_pytorch_model"), (Component::TextEncoder, "model")] {
        let edited: Vec<&Delta> = deltas.iter().filter(|d| d.component == component).collect();
        if edited.is_empty() {
            continue;
        }
        let folder = match component {
            Component::Unet => "unet",
            Component::TextEncoder => "text_encoder",
        };
        let file = crate::model::component_weights(out, folder, stem)?;
        let mapped = MappedSafetensors::open(&file)?;
        let st = mapped.tensors();
        // Every erasure in effect, summed per matrix (several edits of one matrix add up).
        let mut sums: Vec<(&str, linalg::M)> = vec![];
        for d in &edited {
            match sums.iter_mut().find(|(n, _)| *n == d.name) {
                Some((_, sum)) => *sum += d.dense(),
                None => sums.push((&d.name, d.dense())),
            }
        }
        let mut replaced: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
        for (name, dense) in &sums {
            // The file may name text-encoder weights with or without the `text_model.` prefix.
            let candidates = [format!("{name}.weight"),
                              name.strip_prefix("text_model.").map(|n| format!("{n}.weight")).unwrap_or_default()];
            let (key, v) = candidates.iter().find_map(|k| st.tensor(k).ok().map(|v| (k.clone(), v))).ok_or_else(|| {
                Error::Internal(format!("{} has no {}", file.display(), candidates[0]))
            })?;
            if v.shape() != [dense.nrows(), dense.ncols()] {
                return Err(Error::Internal(format!("{key}: {:?} in the file, {}×{} in the edit", v.shape(),
                                                   dense.nrows(), dense.ncols())));
            }
            let (d_out, d_in) = (dense.nrows(), dense.ncols());
            let old: Vec<f32> = match v.dtype() {
                Dtype::F32 => v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
                Dtype::F16 => v.data().chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                Dtype::BF16 => v.data().chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
                other => return Err(Error::Internal(format!("{key}: cannot bake into {other:?}"))),
            };
            let new: Vec<f32> = (0..d_out * d_in).map(|i| old[i] + dense[(i / d_in, i % d_in)] as f32).collect();
            let bytes: Vec<u8> = match v.dtype() {
                Dtype::F32 => new.iter().flat_map(|x| x.to_le_bytes()).collect(),
                Dtype::F16 => new.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
                _ => new.iter().flat_map(|x| half::bf16::from_f32(*x).to_le_bytes()).collect(),
            };
            replaced.insert(key, (v.dtype(), v.shape().to_vec(), bytes));
        }
        let mut views = vec![];
        for (name, v) in st.tensors() {
            match replaced.get(&name) {
                Some((dt, s, b)) => views.push((name, safetensors::tensor::TensorView::new(*dt, s.clone(), b).unwrap())),
                None => views.push((name, v)),
            }
        }
        let (_, header) = SafeTensors::read_metadata(mapped.bytes()).map_err(|e| Error::Internal(e.to_string()))?;
        let bytes = safetensors::serialize(views, header.metadata().clone())
            .map_err(|e| Error::Internal(e.to_string()))?;
        drop(mapped);
        crate::weights::write_atomic(&file, &bytes)?;
    }
    Ok(())
}

/// Copies the regular files of `from` into the new folder `to` (see [`bake`] for what is refused).
/// `to` must exist and be empty.
fn copy_dir(from: &Path, to: &Path, roots: &[std::path::PathBuf], depth: usize) -> Result<()> {
    if depth > 16 {
        return Err(Error::InvalidRequest(format!("{} is nested more than 16 folders deep", from.display())));
    }
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let (p, dst) = (e.path(), to.join(e.file_name()));
        let kind = e.file_type().map_err(|e| Error::io(&p, e))?;
        let refuse = |why: &str| Err(Error::InvalidModel { path: p.clone(), message: why.to_string() });
        if kind.is_dir() {
            std::fs::create_dir(&dst).map_err(|e| Error::io(&dst, e))?;
            copy_dir(&p, &dst, roots, depth + 1)?;
            continue;
        }
        let source = if kind.is_symlink() {
            let target = std::fs::canonicalize(&p).map_err(|e| Error::io(&p, e))?;
            if !roots.iter().any(|r| target.starts_with(r)) {
                return refuse("a symlink that leads out of the model folder");
            }
            target
        } else {
            p.clone()
        };
        if !std::fs::metadata(&source).map_err(|e| Error::io(&source, e))?.is_file() {
            return refuse("not a regular file (a FIFO, device, socket or linked folder)");
        }
        std::fs::copy(&source, &dst).map_err(|e| Error::io(&source, e))?;
    }
    Ok(())
}
