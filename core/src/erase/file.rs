//! Erasure files: the low-rank factors of an edit plus what it was computed from, as safetensors.
//!
//! Tensors: `<component>.<matrix>.R` (f32, d_out × r) and `<component>.<matrix>.X` (f32, d_in × r), with
//! ΔW = R·Xᵀ. Metadata: `format = "unsee-erasure"`, `version`, `method`, `spec` (the resolved spec as JSON),
//! `concepts`, `replacements`, `base_hashes` (hash of every edited matrix before the edit) and
//! `text_encoder_hash`. A file is applied only to weights that hash the same.

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
pub const VERSION: &str = "1";

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
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("version".to_string(), VERSION.to_string());
    meta.insert("method".to_string(), edit.spec.method.name().to_string());
    meta.insert("spec".to_string(), to_json(&edit.spec)?);
    meta.insert("concepts".to_string(), to_json(&edit.spec.erase.iter().map(|e| &e.concept).collect::<Vec<_>>())?);
    meta.insert("replacements".to_string(),
                to_json(&edit.spec.erase.iter().map(|e| &e.replace_with).collect::<Vec<_>>())?);
    meta.insert("base_hashes".to_string(), to_json(&edit.base_hashes)?);
    meta.insert("text_encoder_hash".to_string(), edit.text_encoder_hash.clone());
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
    let st = mapped.tensors();
    let mut deltas = vec![];
    for key in base_hashes.keys() {
        let (component, name) = match key.split_once('.') {
            Some(("unet", n)) => (Component::Unet, n),
            Some(("text_encoder", n)) => (Component::TextEncoder, n),
            _ => return Err(bad(format!("unknown matrix {key}"))),
        };
        let read = |suffix: &str| -> Result<linalg::M> {
            let v = st.tensor(&format!("{key}.{suffix}")).map_err(|_| bad(format!("missing {key}.{suffix}")))?;
            if v.dtype() != Dtype::F32 || v.shape().len() != 2 {
                return Err(bad(format!("{key}.{suffix} must be a 2-D f32 tensor")));
            }
            let f: Vec<f32> = v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            if f.iter().any(|x| !x.is_finite()) {
                return Err(bad(format!("{key}.{suffix} contains NaN or Inf")));
            }
            Ok(linalg::from_f32(v.shape()[0], v.shape()[1], &f))
        };
        let (r, x) = (read("R")?, read("X")?);
        if r.ncols() != x.ncols() {
            return Err(bad(format!("{key}: R and X have different ranks")));
        }
        deltas.push(Delta { component, name: name.to_string(), r, x });
    }
    let info = ErasureInfo {
        method: meta.get("method").cloned().unwrap_or_default(),
        concepts: strings(json("concepts")?),
        replacements: strings(json("replacements")?),
        spec: json("spec")?,
        base_hashes,
        text_encoder_hash: meta.get("text_encoder_hash").cloned().unwrap_or_default(),
        matrices: deltas.len(),
        rank: deltas.iter().map(|d| d.r.ncols()).max().unwrap_or(0),
    };
    Ok((info, deltas))
}

/// Applies an erasure file to `sd`, after checking that it was computed for exactly these weights and this text
/// encoder. Files are applied in order: each must have been computed on the model as the previous ones left it.
pub fn apply_file(sd: &mut StableDiffusion, path: &Path) -> Result<ErasureInfo> {
    let (info, deltas) = load(path)?;
    apply_checked(sd, path, &info, &deltas)?;
    Ok(info)
}

/// Applies deltas read from the erasure file `path` (see [`load`]) after the same checks as [`apply_file`].
pub fn apply_checked(sd: &mut StableDiffusion, path: &Path, info: &ErasureInfo, deltas: &[Delta]) -> Result<()> {
    let te = text_encoder_hash(sd);
    if te != info.text_encoder_hash {
        return Err(Error::ErasureMismatch {
            file: path.to_path_buf(),
            message: "it was computed with another text encoder (its keys would not match this one's)".into(),
        });
    }
    for d in deltas {
        let key = format!("{}.{}", d.component.prefix(), d.name);
        let lin = linear_mut(sd, d.component, &d.name).ok_or_else(|| Error::ErasureMismatch {
            file: path.to_path_buf(),
            message: format!("the model has no matrix {key}"),
        })?;
        let (d_out, d_in) = (d.r.nrows(), d.x.nrows());
        let [w_in, w_out] = lin.weight.val().dims();
        if (d_out, d_in) != (w_out, w_in) {
            return Err(Error::ErasureMismatch {
                file: path.to_path_buf(),
                message: format!("{key} is {w_out}×{w_in} in the model, {d_out}×{d_in} in the erasure"),
            });
        }
        if Some(&hash_matrix(&read_weight(lin)?)) != info.base_hashes.get(&key) {
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
/// edited matrices are rewritten in their original dtype.
pub fn bake(sd: &StableDiffusion, deltas: &[Delta], out: &Path) -> Result<()> {
    let crate::model::ModelLocation::Folder(src) = &sd.location else {
        return Err(Error::InvalidRequest("--bake needs a diffusers folder as the base model".into()));
    };
    if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(false) {
        return Err(Error::InvalidRequest(format!("{} exists and is not empty", out.display())));
    }
    copy_dir(src, out)?;
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
        let mut replaced: HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
        for d in &edited {
            // The file may name text-encoder weights with or without the `text_model.` prefix.
            let candidates = [format!("{}.weight", d.name),
                              d.name.strip_prefix("text_model.").map(|n| format!("{n}.weight")).unwrap_or_default()];
            let key = candidates.iter().find(|k| st.tensor(k).is_ok()).cloned().ok_or_else(|| {
                Error::Internal(format!("{} has no {}", file.display(), candidates[0]))
            })?;
            let v = st.tensor(&key).unwrap();
            let (d_out, d_in) = (v.shape()[0], v.shape()[1]);
            let dense = d.dense();
            let old: Vec<f32> = match v.dtype() {
                Dtype::F32 => v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
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
        std::fs::write(&file, bytes).map_err(|e| Error::io(&file, e))?;
    }
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    for e in std::fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let p = e.path();
        let dst = to.join(e.file_name());
        if p.is_dir() {
            copy_dir(&p, &dst)?;
        } else {
            std::fs::copy(&p, &dst).map_err(|e| Error::io(&p, e))?;
        }
    }
    Ok(())
}
