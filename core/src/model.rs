//! Finding a model on disk: diffusers folders (with `model_index.json`), the Hugging Face cache layout
//! (`models--org--name/snapshots/<rev>/`), and single-file SD-1.x checkpoints.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::weights::is_pickle;

/// The embedded default model, `models/shapes-sd` (an SD-1.x model trained on synthetic shapes, 32×32; see
/// `unsee::shapes`), or the folder named by the `UNSEE_MODEL` environment variable.
pub fn default_model_dir() -> PathBuf {
    if let Ok(p) = std::env::var("UNSEE_MODEL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join("shapes-sd")
}

/// Where a model's parts are.
#[derive(Debug, Clone)]
pub enum ModelLocation {
    /// A diffusers folder.
    Folder(PathBuf),
    /// One safetensors file with CompVis key names; configs and tokenizer come from `config_dir`.
    SingleFile { file: PathBuf, config_dir: PathBuf },
}

/// Resolves `path` to a model: a diffusers folder, an HF-cache repo folder, or a single `.safetensors` file.
pub fn locate(path: &Path, config_dir: Option<&Path>) -> Result<ModelLocation> {
    if !path.exists() {
        return Err(Error::ModelNotFound(path.to_path_buf()));
    }
    if path.is_file() {
        if is_pickle(path) {
            return Err(Error::PickleRefused { file: path.to_path_buf() });
        }
        if path.extension().and_then(|e| e.to_str()) != Some("safetensors") {
            return Err(Error::invalid_model(path, "a single-file model must be a .safetensors checkpoint"));
        }
        let config_dir = match config_dir {
            Some(d) => d.to_path_buf(),
            None => sd15_config_dir(),
        };
        return Ok(ModelLocation::SingleFile { file: path.to_path_buf(), config_dir });
    }
    let dir = hf_cache_snapshot(path)?.unwrap_or_else(|| path.to_path_buf());
    if !dir.join("model_index.json").is_file() && !dir.join("unet").is_dir() {
        return Err(Error::invalid_model(&dir, "not a diffusers folder: no model_index.json and no unet/ folder"));
    }
    Ok(ModelLocation::Folder(dir))
}

/// The SD-1.5 configs (UNet, VAE, CLIP ViT-L/14 text encoder, scheduler) used for single-file checkpoints.
pub fn sd15_config_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models").join("sd15-config")
}

/// `models--org--name` (HF hub cache): use the snapshot named by `refs/main`, else the only snapshot.
fn hf_cache_snapshot(path: &Path) -> Result<Option<PathBuf>> {
    let snapshots = path.join("snapshots");
    if !snapshots.is_dir() {
        return Ok(None);
    }
    if let Ok(rev) = std::fs::read_to_string(path.join("refs").join("main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(Some(p));
        }
    }
    let entries: Vec<PathBuf> = std::fs::read_dir(&snapshots)
        .map_err(|e| Error::io(&snapshots, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    match entries.as_slice() {
        [one] => Ok(Some(one.clone())),
        [] => Err(Error::invalid_model(path, "HF cache folder has no snapshot")),
        _ => Err(Error::invalid_model(path, "HF cache folder has several snapshots and no refs/main; pass the \
                                             snapshot folder itself")),
    }
}

/// The weights file of a component folder: `<stem>.safetensors`, else the `fp16` variant. Pickle-only components
/// are refused with a conversion hint.
pub fn component_weights(root: &Path, component: &str, stem: &str) -> Result<PathBuf> {
    let dir = root.join(component);
    if !dir.is_dir() {
        return Err(Error::MissingComponent {
            path: root.to_path_buf(),
            component: component.to_string(),
            hint: format!("expected the folder {}", dir.display()),
        });
    }
    for name in [format!("{stem}.safetensors"), format!("{stem}.fp16.safetensors")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Ok(p);
        }
    }
    for name in [format!("{stem}.bin"), format!("{stem}.fp16.bin"), format!("{stem}.ckpt")] {
        let p = dir.join(&name);
        if p.is_file() {
            return Err(Error::PickleRefused { file: p });
        }
    }
    if dir.join(format!("{stem}.safetensors.index.json")).is_file() {
        return Err(Error::invalid_model(&dir, "sharded weights are not supported for SD-1.x components"));
    }
    Err(Error::MissingComponent {
        path: root.to_path_buf(),
        component: component.to_string(),
        hint: format!("no {stem}.safetensors or {stem}.fp16.safetensors in {}", dir.display()),
    })
}

pub fn read_config<T: serde::de::DeserializeOwned>(root: &Path, component: &str, file: &str) -> Result<T> {
    let p = root.join(component).join(file);
    if p.exists() && !p.is_file() {
        return Err(Error::invalid_model(&p, "not a regular file (a folder, FIFO or device)"));
    }
    if !p.is_file() {
        return Err(Error::MissingComponent {
            path: root.to_path_buf(),
            component: component.to_string(),
            hint: format!("missing {}", p.display()),
        });
    }
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid_model(&p, e.to_string()))
}
