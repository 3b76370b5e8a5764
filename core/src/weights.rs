//! Loading safetensors weights into the modules: validation first (corrupt, truncated or pickle files, NaN/Inf),
//! then `burn::store` with `PyTorchToBurnAdapter` (Linear transposes, norm `weight/bias → gamma/beta`), and one
//! report listing every missing, unexpected or mis-shaped tensor.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::store::{ApplyError, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, SafetensorsStore};
use burn::tensor::DType;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};

/// Storage precision of the weights on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    F16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" | "fp32" => Ok(Precision::F32),
            "f16" | "fp16" => Ok(Precision::F16),
            _ => Err(format!("unknown precision {s:?} (f32 or f16)")),
        }
    }
}

/// Extensions of pickle-based checkpoints, which are never unpickled.
pub const PICKLE_EXTENSIONS: [&str; 4] = ["ckpt", "bin", "pt", "pth"];

pub fn is_pickle(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| PICKLE_EXTENSIONS.contains(&e))
}

/// A memory-mapped safetensors file whose header and offsets have been validated.
pub struct MappedSafetensors {
    pub path: PathBuf,
    mmap: memmap2::Mmap,
}

impl MappedSafetensors {
    pub fn open(path: &Path) -> Result<Self> {
        if is_pickle(path) {
            return Err(Error::PickleRefused { file: path.to_path_buf() });
        }
        // Checked before opening: opening a FIFO would block, and mapping a folder fails with "No such device".
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::InvalidInput,
                                                           "not a regular file (a folder, FIFO or device)")));
        }
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only and lives as long as `self`; a file truncated by another process while
        // mapped is outside what any mmap-based loader can defend against.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        SafeTensors::deserialize(&mmap)
            .map_err(|e| Error::CorruptWeights { file: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self { path: path.to_path_buf(), mmap })
    }

    pub fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.mmap).expect("validated in open")
    }

    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Names of floating-point tensors that contain NaN or ±Inf.
    pub fn non_finite_tensors(&self) -> Vec<String> {
        let st = self.tensors();
        let mut bad = Vec::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let finite = match view.dtype() {
                Dtype::F32 => data.chunks_exact(4).all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
                Dtype::F16 => data.chunks_exact(2).all(|b| half::f16::from_le_bytes([b[0], b[1]]).is_finite()),
                Dtype::BF16 => data.chunks_exact(2).all(|b| half::bf16::from_le_bytes([b[0], b[1]]).is_finite()),
                Dtype::F64 => data.chunks_exact(8).all(|b| f64::from_le_bytes(b.try_into().unwrap()).is_finite()),
                _ => true,
            };
            if !finite {
                bad.push(name);
            }
        }
        bad.sort();
        bad
    }

    /// Number of scalar values in the file.
    pub fn num_values(&self) -> usize {
        self.tensors().tensors().iter().map(|(_, v)| v.shape().iter().product::<usize>()).sum()
    }

    /// The file's `__metadata__`, if any.
    pub fn metadata(&self) -> Option<HashMap<String, String>> {
        let (_, header) = SafeTensors::read_metadata(&self.mmap).ok()?;
        header.metadata().clone()
    }

    /// Storage dtypes present, for `unsee info`.
    pub fn dtypes(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for (_, v) in self.tensors().tensors() {
            *m.entry(format!("{:?}", v.dtype()).to_lowercase()).or_insert(0) += v.shape().iter().product::<usize>();
        }
        m
    }
}

/// A tensor to write: its name, dtype, shape and little-endian bytes.
pub struct OwnedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(name: impl Into<String>, shape: Vec<usize>, values: &[f32]) -> Self {
        Self { name: name.into(), dtype: Dtype::F32, shape, bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
    pub fn i64(name: impl Into<String>, values: &[i64]) -> Self {
        Self { name: name.into(), dtype: Dtype::I64, shape: vec![values.len()],
               bytes: values.iter().flat_map(|x| x.to_le_bytes()).collect() }
    }
}

/// Writes `tensors` (and `metadata`) as a safetensors file, atomically: to a temporary file beside `path`, then
/// renamed over it, so a reader never sees a partial file and a failed write leaves any old file intact.
pub fn write_safetensors(path: &Path, tensors: &[OwnedTensor], metadata: Option<HashMap<String, String>>)
    -> Result<()> {
    write_atomic(path, &safetensors_bytes(tensors, metadata)?)
}

/// `tensors` (and `metadata`) serialized as a safetensors file in memory.
pub fn safetensors_bytes(tensors: &[OwnedTensor], metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for t in tensors {
        let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
            .map_err(|e| Error::Internal(format!("tensor {}: {e}", t.name)))?;
        views.push((t.name.clone(), view));
    }
    safetensors::serialize(views, metadata).map_err(|e| Error::Internal(e.to_string()))
}

/// Writes `bytes` to `path` atomically: into a new temporary file beside it (created exclusively, so an existing
/// file or symlink of that name is never followed or overwritten), flushed to disk, then renamed over `path`
/// (which replaces a symlink at `path` instead of writing through it). A crash or a concurrent writer leaves
/// either the old file or a complete new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    static WRITES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let partial = path.with_file_name(format!(".{name}.{}-{n}.partial", std::process::id()));
    let written = std::fs::File::create_new(&partial).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    written.and_then(|_| std::fs::rename(&partial, path)).map_err(|e| {
        let _ = std::fs::remove_file(&partial);
        Error::io(path, e)
    })
}

/// Reads the f32 tensor `name` of rank `rank` from a safetensors file, refusing other dtypes, shapes and NaN/Inf.
pub fn read_f32_tensor(path: &Path, name: &str, rank: usize) -> Result<(Vec<usize>, Vec<f32>)> {
    let mapped = MappedSafetensors::open(path)?;
    let st = mapped.tensors();
    let bad = |m: String| Error::InvalidRequest(format!("{}: {m}", path.display()));
    let view = st.tensor(name).map_err(|_| bad(format!("no tensor named `{name}`")))?;
    if view.dtype() != Dtype::F32 || view.shape().len() != rank {
        return Err(bad(format!("`{name}` must be f32 with {rank} dimensions, found {:?} {:?}", view.dtype(), view.shape())));
    }
    let v: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(bad(format!("`{name}` contains NaN or Inf")));
    }
    Ok((view.shape().to_vec(), v))
}

/// Files with at most this many values are scanned for NaN/Inf at every load; larger ones with `check = true`.
pub const AUTO_CHECK_LIMIT: usize = 64 * 1024 * 1024;

/// Source of a component's tensors: a file on disk or an in-memory safetensors buffer (single-file checkpoints
/// converted to diffusers names).
pub enum TensorSource {
    File(PathBuf),
    Bytes { origin: PathBuf, bytes: Vec<u8> },
}

/// Keys that checkpoints carry but that are buffers, not parameters (e.g. `position_ids` of older transformers).
fn ignorable(key: &str) -> bool {
    key.ends_with("position_ids")
}

/// Loads `source` into `module`, casting floats to `precision`. Everything wrong is reported at once.
pub fn load_module<M: ModuleSnapshot>(module: &mut M, component: &str, source: TensorSource, precision: Precision)
    -> Result<()> {
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(precision.dtype()));
    let (origin, store) = match source {
        TensorSource::File(p) => (p.clone(), SafetensorsStore::from_file(p)),
        TensorSource::Bytes { origin, bytes } => (origin, SafetensorsStore::from_bytes(Some(bytes))),
    };
    let mut store = store.with_from_adapter(adapter).allow_partial(true).validate(false).skip_enum_variants(true);
    let result = module
        .load_from(&mut store)
        .map_err(|e| Error::CorruptWeights { file: origin.clone(), message: e.to_string() })?;

    check_applied(component, &origin, &result)
}

/// Every missing, unexpected, mis-shaped or unreadable tensor of a load into a module, in one
/// [`Error::WeightMismatch`] report (shared by the safetensors and the bundle loaders).
pub fn check_applied(component: &str, file: &Path, result: &burn::store::ApplyResult) -> Result<()> {
    let mut lines = Vec::new();
    for err in &result.errors {
        lines.push(match err {
            ApplyError::ShapeMismatch { path, expected, found } => {
                format!("  mis-shaped: {path}: expected {:?}, found {:?}", expected.as_slice(), found.as_slice())
            }
            ApplyError::DTypeMismatch { path, expected, found } => {
                format!("  wrong dtype: {path}: expected {expected:?}, found {found:?}")
            }
            other => format!("  unreadable: {other}"),
        });
    }
    for (path, _) in &result.missing {
        lines.push(format!("  missing:    {path}"));
    }
    for path in result.unused.iter().filter(|p| !ignorable(p)) {
        lines.push(format!("  unexpected: {path}"));
    }
    if lines.is_empty() {
        Ok(())
    } else {
        Err(Error::WeightMismatch { component: component.to_string(), file: file.to_path_buf(),
                                    report: lines.join("\n") })
    }
}

/// Validates a component file: header/offsets (always) and NaN/Inf (small files always, large ones on request).
pub fn check_file(path: &Path, component: &str, check_values: bool) -> Result<MappedSafetensors> {
    let mapped = MappedSafetensors::open(path)?;
    if check_values || mapped.num_values() <= AUTO_CHECK_LIMIT {
        let bad = mapped.non_finite_tensors();
        if !bad.is_empty() {
            return Err(Error::NonFiniteWeights {
                component: component.to_string(),
                count: bad.len(),
                names: bad.iter().take(10).cloned().collect::<Vec<_>>().join(", "),
            });
        }
    }
    Ok(mapped)
}
