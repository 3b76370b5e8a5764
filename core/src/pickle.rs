//! PyTorch checkpoints (`torch.save` zip archives: `pytorch_model.bin`, `.pt`) read **without executing pickle
//! code**, for the one place unsee accepts them: a text encoder such as AdvUnlearn's robust ones (HF
//! `OPTML-Group/AdvUnlearn`), which are published only as pickles.
//!
//! Two layers: (1) [`check_references`] walks the archive's `data.pkl` opcode by opcode (as `pickletools` does,
//! nothing is built or called) and refuses any reference — `GLOBAL`, `STACK_GLOBAL`, `INST`, extension codes — that
//! is not tensor storage, a tensor-rebuild function or `collections.OrderedDict`, naming it; (2) the tensors are then
//! read by burn-store's reader (`pytorch-reader`, behind `PytorchStore`), which interprets only those calls. Legacy
//! (pre-1.6) and tar checkpoints are refused: AdvUnlearn's files are zip archives.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The largest `data.pkl` read (the tensors themselves live in separate archive entries).
const MAX_PICKLE_BYTES: u64 = 64 << 20;

/// What a checkpoint's pickle may reference.
fn allowed(module: &str, name: &str) -> bool {
    const STORAGES: [&str; 11] = ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
                                  "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
                                  "UntypedStorage"];
    const DTYPES: [&str; 8] = ["float32", "float16", "bfloat16", "float64", "int64", "int32", "uint8", "bool"];
    match module {
        "collections" => name == "OrderedDict",
        "torch._utils" => matches!(name, "_rebuild_tensor" | "_rebuild_tensor_v2" | "_rebuild_tensor_v3"
                                         | "_rebuild_parameter"),
        "torch" => STORAGES.contains(&name) || DTYPES.contains(&name),
        _ => false,
    }
}

fn unsafe_pickle(file: &Path, message: impl Into<String>) -> Error {
    Error::UnsafePickle { file: file.to_path_buf(), message: message.into() }
}

/// The `data.pkl` of a `torch.save` zip archive.
pub fn archive_pickle(file: &Path) -> Result<Vec<u8>> {
    let f = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
    let mut zip = zip::ZipArchive::new(f)
        .map_err(|e| unsafe_pickle(file, format!("not a torch.save zip archive (PyTorch ≥ 1.6): {e}")))?;
    let names: Vec<String> = zip.file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .filter(|n| n == "data.pkl" || n.ends_with("/data.pkl"))
        .collect();
    let [name] = names.as_slice() else {
        return Err(unsafe_pickle(file, format!("expected one data.pkl in the archive, found {}", names.len())));
    };
    let entry = zip.by_name(name).map_err(|e| unsafe_pickle(file, e.to_string()))?;
    let mut bytes = vec![];
    entry.take(MAX_PICKLE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| Error::io(file, e))?;
    if bytes.len() as u64 > MAX_PICKLE_BYTES {
        return Err(unsafe_pickle(file, format!("data.pkl is larger than {MAX_PICKLE_BYTES} bytes")));
    }
    Ok(bytes)
}

/// Walks `pickle`'s opcodes and returns every (module, name) it references (`GLOBAL`, `INST`), refusing any outside
/// the allow-list and anything it cannot account for: an unknown opcode, a truncated stream, the extension registry,
/// and protocol 4's `STACK_GLOBAL`, whose operands come from the stack (`torch.save` writes protocol 2, where every
/// reference is spelled inline; a file re-saved with protocol 4 is refused with that reason). Nothing is executed
/// or constructed.
pub fn check_references(pickle: &[u8], file: &Path) -> Result<Vec<(String, String)>> {
    let bad = |m: String| unsafe_pickle(file, m);
    let mut refs = vec![];
    let mut pos = 0usize;
    let take = |pos: &mut usize, n: u64| -> Result<()> {
        let end = usize::try_from(n).ok().and_then(|n| pos.checked_add(n)).filter(|&e| e <= pickle.len())
            .ok_or_else(|| unsafe_pickle(file, "the pickle ends inside an opcode"))?;
        *pos = end;
        Ok(())
    };
    let length = |pos: &mut usize, n: usize| -> Result<u64> {
        let start = *pos;
        take(pos, n as u64)?;
        Ok(pickle[start..*pos].iter().rev().fold(0u64, |a, &x| (a << 8) | x as u64))
    };
    let line = |pos: &mut usize| -> Result<String> {
        let rest = &pickle[*pos..];
        let n = rest.iter().position(|&b| b == b'\n').ok_or_else(|| unsafe_pickle(file, "unterminated text argument"))?;
        *pos += n + 1;
        Ok(String::from_utf8_lossy(&rest[..n]).into_owned())
    };
    loop {
        let Some(&op) = pickle.get(pos) else {
            return Err(bad("the pickle has no STOP".into()));
        };
        pos += 1;
        match op {
            b'.' => return Ok(refs),
            // No argument.
            b'(' | b'0' | b'1' | b'2' | b'N' | b'R' | b'b' | b'a' | b'e' | b'd' | b'}' | b']' | b')' | b'l' | b't'
            | b's' | b'u' | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 | 0x81 | 0x92 | 0x8f | 0x90 | 0x91 | b'Q' | b'o'
            | 0x94 => {}
            // Fixed-size arguments.
            b'K' | b'h' | b'q' | 0x80 => take(&mut pos, 1)?,
            b'M' => take(&mut pos, 2)?,
            b'J' | b'j' | b'r' => take(&mut pos, 4)?,
            b'G' | 0x95 => take(&mut pos, 8)?, // FRAME: a length; the frame's opcodes follow inline
            // Length-prefixed arguments.
            0x8c | b'U' | b'C' | 0x8a => {
                let n = length(&mut pos, 1)?;
                take(&mut pos, n)?
            }
            b'X' | b'T' | b'B' | 0x8b => {
                let n = length(&mut pos, 4)?;
                take(&mut pos, n)?
            }
            0x8d | 0x8e | 0x96 => {
                let n = length(&mut pos, 8)?;
                take(&mut pos, n)?
            }
            // Text arguments.
            b'I' | b'L' | b'F' | b'S' | b'V' | b'P' | b'g' | b'p' => {
                line(&mut pos)?;
            }
            b'c' | b'i' => {
                let (module, name) = (line(&mut pos)?, line(&mut pos)?);
                if !allowed(&module, &name) {
                    return Err(bad(format!(
                        "the pickle references {module}.{name}; only tensor storage, tensor-rebuild functions and \
                         collections.OrderedDict are read (nothing is ever executed)"
                    )));
                }
                refs.push((module, name));
            }
            0x93 => return Err(bad("a protocol-4 STACK_GLOBAL reference (re-save with torch.save's default \
                                    protocol 2, or convert to safetensors elsewhere)".into())),
            0x82..=0x84 => return Err(bad("the pickle uses the copyreg extension registry".into())),
            other => return Err(bad(format!("unknown or unsupported pickle opcode 0x{other:02x} at byte {}", pos - 1))),
        }
    }
}

/// The text-encoder tensors of a checkpoint in either AdvUnlearn layout, with diffusers' names
/// (`text_model.…`): transformers' `CLIPTextModel` state dict (HF `pytorch_model.bin`), or the training script's
/// `TextEncoder-*.pt` (`text_encoder.text_model.…`, with the same tensors repeated under `embedding.`,
/// `encoder.` and `final_layer_norm.`, which are dropped). Returned as an in-memory safetensors file.
pub fn text_encoder_safetensors(file: &Path) -> Result<Vec<u8>> {
    let pickle = archive_pickle(file)?;
    check_references(&pickle, file)?;
    let reader = burn::store::pytorch::PytorchReader::new(file)
        .map_err(|e| Error::CorruptWeights { file: file.to_path_buf(), message: e.to_string() })?;
    let mut out: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = vec![];
    for (key, t) in reader.tensors() {
        let name = key.strip_prefix("text_encoder.").unwrap_or(key);
        if !name.starts_with("text_model.") || name.ends_with("position_ids") {
            continue;
        }
        let dtype = match t.dtype() {
            burn::store::pytorch_reader::DType::F32 => safetensors::Dtype::F32,
            burn::store::pytorch_reader::DType::F16 => safetensors::Dtype::F16,
            burn::store::pytorch_reader::DType::BF16 => safetensors::Dtype::BF16,
            other => {
                return Err(Error::CorruptWeights { file: file.to_path_buf(),
                                                   message: format!("{key} is {other:?}, not a float tensor") });
            }
        };
        let bytes = t.read().map_err(|e| Error::io(file, e))?;
        let finite = match dtype {
            safetensors::Dtype::F32 => bytes.chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            safetensors::Dtype::F16 => bytes.chunks_exact(2).all(|b| half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
            _ => bytes.chunks_exact(2).all(|b| half::bf16::from_le_bytes([b[0], b[1]]).is_finite()),
        };
        if !finite {
            return Err(Error::NonFiniteWeights { component: format!("text encoder ({})", file.display()), count: 1,
                                                 names: key.clone() });
        }
        out.push((name.to_string(), dtype, t.shape().to_vec(), bytes));
    }
    if out.is_empty() {
        return Err(Error::CorruptWeights { file: file.to_path_buf(),
                                           message: "no text_model.* tensors (not a CLIP text encoder)".into() });
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let views = out.iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.as_str(), v))
                .map_err(|e| Error::CorruptWeights { file: file.to_path_buf(), message: format!("{n}: {e}") })
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = HashMap::from([("converted_from".to_string(), file.display().to_string())]);
    safetensors::serialize(views, Some(meta)).map_err(|e| Error::Internal(format!("serialising {}: {e}", file.display())))
}

/// The pickle checkpoint a `--text-encoder` path names, if it is one: the file itself, or a folder's
/// `pytorch_model.bin` when it has no safetensors weights.
pub fn text_encoder_checkpoint(path: &Path) -> Option<PathBuf> {
    if path.is_file() && crate::weights::is_pickle(path) {
        return Some(path.to_path_buf());
    }
    let bin = path.join("pytorch_model.bin");
    (path.is_dir() && bin.is_file() && !path.join("model.safetensors").is_file()).then_some(bin)
}

/// What [`convert_text_encoder`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Converted {
    pub source: PathBuf,
    pub config_from: PathBuf,
    pub tensors: usize,
    pub out: PathBuf,
}

/// Writes the text encoder in `checkpoint` (a file, or a folder with `pytorch_model.bin`) as a `text_encoder`
/// folder `out` (`config.json` + `model.safetensors`, each written atomically); `out` must not exist. The config is
/// the one beside the checkpoint, else `model`'s `text_encoder/config.json`.
pub fn convert_text_encoder(checkpoint: &Path, model: &Path, out: &Path) -> Result<Converted> {
    if !checkpoint.exists() {
        return Err(Error::ModelNotFound(checkpoint.to_path_buf()));
    }
    let file = text_encoder_checkpoint(checkpoint).ok_or_else(|| Error::InvalidRequest(format!(
        "{} is not a PyTorch checkpoint (.bin/.pt/.pth/.ckpt, or a folder with pytorch_model.bin)", checkpoint.display()
    )))?;
    if out.exists() {
        return Err(Error::InvalidRequest(format!("{} exists; choose a new folder", out.display())));
    }
    let beside = file.parent().map(|p| p.join("config.json")).filter(|p| p.is_file());
    let config_from = beside.unwrap_or_else(|| model.join("text_encoder").join("config.json"));
    let config = crate::erase::spec::read_text_file(&config_from, 1 << 20).map_err(Error::InvalidRequest)?;
    let parsed: crate::clip::ClipTextConfig = serde_json::from_str(&config)
        .map_err(|e| Error::invalid_model(&config_from, e.to_string()))?;
    parsed.validate().map_err(|m| Error::invalid_model(&config_from, m))?;
    let bytes = text_encoder_safetensors(&file)?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes).map(|s| s.len()).unwrap_or(0);
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    crate::weights::write_atomic(&out.join("config.json"), config.as_bytes())?;
    crate::weights::write_atomic(&out.join("model.safetensors"), &bytes)?;
    Ok(Converted { source: file, config_from, tensors, out: out.to_path_buf() })
}
