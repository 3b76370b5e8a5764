//! The FFI façade of unsee: one `Engine` for Kotlin, Swift and Python through uniffi (proc-macros, library mode),
//! plus a hand-written JNI entry that renders into a caller-owned buffer (see [`jni_path`]).
//!
//! No logic lives here: every call converts its arguments, forwards to [`unsee::engine::Engine`] and converts the
//! result. Two rules hold for every exported call:
//! - no panic crosses the boundary: each body runs under `catch_unwind` and a panic becomes [`UnseeError::Internal`];
//! - `Engine` is `Send + Sync`; calls on one engine are **serialised** by a mutex (a second `generate` waits for
//!   the first), while [`CancelToken::cancel`] never takes that lock, so it works from any thread at any time.

use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use unsee::error::Error as CoreError;

pub mod jni_path;

uniffi::setup_scaffolding!();

// -----------------------------------------------------------------------------------------------------------------
// Errors

/// Every failure a caller can act on. The message is `core`'s, which names the file, value or limit involved.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum UnseeError {
    /// The model path (or text encoder, or erasure file) does not exist.
    #[error("{0}")]
    ModelNotFound(String),
    /// The model (or a LoRA merged into it) is incomplete, corrupt, mis-shaped, contains NaN/Inf, or is a pickle
    /// checkpoint.
    #[error("{0}")]
    InvalidModel(String),
    /// An erasure file computed for other base weights or another text encoder.
    #[error("{0}")]
    ErasureMismatch(String),
    /// A file that is not a valid erasure file (wrong format or version, missing or malformed tensors): a
    /// damaged or foreign asset, not a user error.
    #[error("{0}")]
    InvalidErasureFile(String),
    /// The requested device (or precision on it) is not available.
    #[error("{0}")]
    DeviceUnavailable(String),
    /// A bad prompt, size, step count, edit spec (TOML; its errors name the line) or buffer.
    #[error("{0}")]
    InvalidRequest(String),
    /// The call was cancelled through its `CancelToken`.
    #[error("{0}")]
    Cancelled(String),
    /// Reading or writing a file failed.
    #[error("{0}")]
    Io(String),
    /// A bundle whose manifest, signature or files do not check out (altered, swapped, missing or extra file, an
    /// untrusted key); the message names the file.
    #[error("{0}")]
    BundleRefused(String),
    /// A guarded engine refused a load or a call its policy does not allow.
    #[error("{0}")]
    GuardViolation(String),
    /// A bug: a panic inside the runtime (caught at the boundary) or an unexpected internal state.
    #[error("{0}")]
    Internal(String),
}

impl From<CoreError> for UnseeError {
    fn from(e: CoreError) -> Self {
        let m = e.to_string();
        match e {
            CoreError::ModelNotFound(_) => Self::ModelNotFound(m),
            CoreError::InvalidModel { .. }
            | CoreError::MissingComponent { .. }
            | CoreError::WeightMismatch { .. }
            | CoreError::PickleRefused { .. }
            | CoreError::UnsafePickle { .. }
            | CoreError::CorruptWeights { .. }
            | CoreError::NonFiniteWeights { .. }
            | CoreError::InvalidLora { .. }
            | CoreError::NonFiniteOutput(_) => Self::InvalidModel(m),
            CoreError::ErasureMismatch { .. } => Self::ErasureMismatch(m),
            CoreError::InvalidErasureFile { .. } => Self::InvalidErasureFile(m),
            CoreError::DeviceUnavailable(_) => Self::DeviceUnavailable(m),
            CoreError::InvalidRequest(_) | CoreError::InvalidSpec(_) | CoreError::Tokenizer(_) => {
                Self::InvalidRequest(m)
            }
            CoreError::Cancelled => Self::Cancelled(m),
            CoreError::Io { .. } => Self::Io(m),
            CoreError::Bundle { .. } => Self::BundleRefused(m),
            CoreError::GuardViolation(_) => Self::GuardViolation(m),
            CoreError::Internal(_) => Self::Internal(m),
        }
    }
}

/// Runs `f`, turning a panic into [`UnseeError::Internal`].
pub(crate) fn guard<T>(f: impl FnOnce() -> Result<T, UnseeError>) -> Result<T, UnseeError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let what = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        tracing::error!("panic caught at the FFI boundary: {what}");
        Err(UnseeError::Internal(format!("panic inside unsee (please report it): {what}")))
    })
}

// -----------------------------------------------------------------------------------------------------------------
// Configuration and requests

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum DeviceKind {
    /// A hardware GPU if there is one, else the CPU.
    Auto,
    /// burn's `flex` CPU backend (all cores).
    Cpu,
    /// Any wgpu adapter (Vulkan on Android/Linux, Metal on Apple), software ones included.
    Gpu,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Precision {
    F32,
    /// Needs a device with f16 arithmetic (most mobile GPUs).
    F16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Scheduler {
    Ddim,
    EulerAncestral,
    /// DPM-Solver++(2M).
    DpmSolverMultistep,
    /// DPM-Solver++(2M) with Karras sigmas.
    DpmSolverMultistepKarras,
    /// Latent consistency model sampling (2–8 steps with an LCM-LoRA or LCM-distilled UNet).
    Lcm,
}

impl From<Scheduler> for unsee::scheduler::SchedulerKind {
    fn from(s: Scheduler) -> Self {
        use unsee::scheduler::SchedulerKind as K;
        match s {
            Scheduler::Ddim => K::Ddim,
            Scheduler::EulerAncestral => K::EulerAncestral,
            Scheduler::DpmSolverMultistep => K::DpmSolverPP2M { karras: false },
            Scheduler::DpmSolverMultistepKarras => K::DpmSolverPP2M { karras: true },
            Scheduler::Lcm => K::Lcm,
        }
    }
}

impl From<unsee::scheduler::SchedulerKind> for Scheduler {
    fn from(k: unsee::scheduler::SchedulerKind) -> Self {
        use unsee::scheduler::SchedulerKind as K;
        match k {
            K::Ddim => Scheduler::Ddim,
            K::EulerAncestral => Scheduler::EulerAncestral,
            K::DpmSolverPP2M { karras: false } => Scheduler::DpmSolverMultistep,
            K::DpmSolverPP2M { karras: true } => Scheduler::DpmSolverMultistepKarras,
            K::Lcm => Scheduler::Lcm,
        }
    }
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct EngineConfig {
    /// A diffusers folder, an HF-cache folder or a single-file `.safetensors` checkpoint. `None`: `$UNSEE_MODEL`,
    /// else the repository's embedded model (development only: apps ship their own model).
    #[uniffi(default = None)]
    pub model_path: Option<String>,
    /// A text encoder that replaces the model's (an erased or robust one): a `text_encoder` folder or a model
    /// folder that has one.
    #[uniffi(default = None)]
    pub text_encoder_path: Option<String>,
    /// Erasure files applied at load, in order.
    #[uniffi(default = [])]
    pub erasure_paths: Vec<String>,
    pub device: DeviceKind,
    pub precision: Precision,
    /// Guarded mode when not empty: `model_path` must be a bundle (`unsee bundle build --sign`) signed by one of
    /// these minisign public keys (the `.pub` file's contents or its base64 line), whose files all match its
    /// manifest; text-encoder overrides, erasure files, raw conditioning and init latents are refused with
    /// `GuardViolation`.
    #[uniffi(default = [])]
    pub trusted_keys: Vec<String>,
    /// Guarded mode: concepts the bundle must erase (case-insensitive).
    #[uniffi(default = [])]
    pub required_concepts: Vec<String>,
    /// LoRAs merged into the weights at load, in order, before the erasure files (refused in guarded mode).
    #[uniffi(default = [])]
    pub loras: Vec<Lora>,
    /// Sequential residency: load each network only for its stage of a generation (text encoder, then UNet, then
    /// VAE), so at most one is in memory at a time; the weights are read (and a bundle's hashed) again at every
    /// generation. Generation and prompt encoding only; LoRAs, a replacement text encoder and single-file
    /// checkpoints are refused.
    #[uniffi(default = false)]
    pub low_memory: bool,
}

/// A LoRA file (kohya or diffusers/PEFT safetensors) and the scale it is merged with.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Lora {
    pub path: String,
    #[uniffi(default = 1.0)]
    pub scale: f64,
}

/// What to generate. Integer fields are signed so that the Kotlin API has plain `Int`/`Long` (callable from Java);
/// negative values are refused with `InvalidRequest`.
#[derive(Debug, Clone, uniffi::Record)]
pub struct GenerateRequest {
    pub prompt: String,
    #[uniffi(default = "")]
    pub negative_prompt: String,
    #[uniffi(default = 20)]
    pub steps: i32,
    #[uniffi(default = 7.5)]
    pub guidance: f64,
    /// Any 64-bit value (read as unsigned): the same seed gives the same image on every platform.
    #[uniffi(default = 0)]
    pub seed: i64,
    /// Pixels; `None` = the model's native size. Multiples of 8.
    #[uniffi(default = None)]
    pub width: Option<i32>,
    #[uniffi(default = None)]
    pub height: Option<i32>,
    pub scheduler: Scheduler,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct GeneratedImage {
    pub width: i32,
    pub height: i32,
    /// RGBA8, row-major, alpha 255.
    pub rgba: Vec<u8>,
}

pub(crate) fn non_negative(name: &str, v: i32) -> Result<usize, UnseeError> {
    usize::try_from(v).map_err(|_| UnseeError::InvalidRequest(format!("{name} must be ≥ 0 (got {v})")))
}

impl GenerateRequest {
    pub(crate) fn to_core(&self) -> Result<unsee::pipeline::GenerateRequest, UnseeError> {
        Ok(unsee::pipeline::GenerateRequest {
            prompt: self.prompt.clone(),
            negative_prompt: self.negative_prompt.clone(),
            steps: non_negative("steps", self.steps)?,
            guidance: self.guidance,
            seed: self.seed as u64,
            width: self.width.map(|w| non_negative("width", w)).transpose()?,
            height: self.height.map(|h| non_negative("height", h)).transpose()?,
            scheduler: self.scheduler.into(),
        })
    }
}

// -----------------------------------------------------------------------------------------------------------------
// Progress and cancellation

/// Implemented by the app: called after every denoising step, on the thread that called `generate`.
#[uniffi::export(with_foreign)]
pub trait ProgressListener: Send + Sync {
    fn on_step(&self, step: i32, total: i32);
}

/// Cancels a running (or future) call: `generate` checks it before starting and between denoising steps and then
/// fails with `Cancelled`. One token can be shared by several calls; it cannot be reset.
#[derive(Debug, Default, uniffi::Object)]
pub struct CancelToken {
    cancelled: AtomicBool,
}

#[uniffi::export]
impl CancelToken {
    #[uniffi::constructor]
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

// -----------------------------------------------------------------------------------------------------------------
// Results of erase / audit / info

#[derive(Debug, Clone, uniffi::Record)]
pub struct ErasureSummary {
    pub method: String,
    pub concepts: Vec<String>,
    pub replacements: Vec<String>,
    /// Number of edited matrices and the largest rank of their low-rank deltas.
    pub matrices: i32,
    pub rank: i32,
    pub encode_seconds: f64,
    pub solve_seconds: f64,
    pub apply_seconds: f64,
    /// Things the user should know (e.g. a pin that had to be truncated on a narrow model).
    pub warnings: Vec<String>,
    /// Where the erasure file was written, if a path was given.
    pub saved_to: Option<String>,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct MeanWorst {
    pub mean: f64,
    pub worst: f64,
}

/// Leakage of one erased concept (0 = fully turned into the replacement, 1 = untouched).
#[derive(Debug, Clone, uniffi::Record)]
pub struct ConceptAudit {
    pub concept: String,
    pub replacement: String,
    pub key_leakage: MeanWorst,
    pub noise_leakage: MeanWorst,
    /// Noise leakage under the embedding attack (RECE's closed-form adversarial embedding); null for
    /// text-encoder edits.
    pub attack_noise_leakage: Option<MeanWorst>,
}

/// Relative change of one preserved prompt.
#[derive(Debug, Clone, uniffi::Record)]
pub struct DriftAudit {
    pub prompt: String,
    pub key_drift: MeanWorst,
    pub noise_drift: MeanWorst,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct AuditReport {
    pub concepts: Vec<ConceptAudit>,
    pub preserved: Vec<DriftAudit>,
    pub overall_key_leakage: MeanWorst,
    pub overall_noise_leakage: MeanWorst,
    pub overall_attack_noise_leakage: Option<MeanWorst>,
    pub overall_key_drift: Option<MeanWorst>,
    pub overall_noise_drift: Option<MeanWorst>,
    /// The report as `unsee audit` prints it, and as its `--json`.
    pub table: String,
    pub json: String,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct ComponentInfo {
    pub name: String,
    pub file: String,
    pub parameters: i64,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct ErasureEntry {
    /// The erasure file, or `None` for an `erase` call that was not saved.
    pub source: Option<String>,
    pub method: String,
    pub concepts: Vec<String>,
    pub replacements: Vec<String>,
}

#[derive(Debug, Clone, uniffi::Record)]
pub struct EngineInfo {
    pub model: String,
    pub device: String,
    pub is_gpu: bool,
    pub precision: Precision,
    pub components: Vec<ComponentInfo>,
    /// Erasures in effect, in the order they were applied.
    pub erasures: Vec<ErasureEntry>,
    /// Networks are loaded per stage of a generation (`EngineConfig.low_memory`).
    pub low_memory: bool,
}

fn stat(s: &unsee::erase::audit::Stat) -> MeanWorst {
    MeanWorst { mean: s.mean, worst: s.worst }
}

fn path_string(p: &Path) -> String {
    p.display().to_string()
}

// -----------------------------------------------------------------------------------------------------------------
// Engine

/// A model on a device, with its erasures. Create one per model and share it: it is `Send + Sync`, and its calls
/// are serialised.
#[derive(uniffi::Object)]
pub struct Engine {
    inner: Mutex<unsee::engine::Engine>,
    jni_id: OnceLock<i64>,
}

impl Engine {
    /// The engine, even if an earlier call panicked while holding it (its state is still consistent: `generate`
    /// does not mutate, and `erase` replaces the model only after the edit succeeded).
    pub(crate) fn lock(&self) -> MutexGuard<'_, unsee::engine::Engine> {
        self.inner.lock().unwrap_or_else(|poisoned| {
            self.inner.clear_poison();
            poisoned.into_inner()
        })
    }
}

fn parse_spec(spec_toml: &str) -> Result<unsee::erase::spec::Spec, UnseeError> {
    // `preserve_file`/`templates` paths are the app's: absolute, or relative to the working directory.
    Ok(unsee::erase::spec::Spec::parse_inline(spec_toml)?)
}

#[uniffi::export]
impl Engine {
    /// Loads the model (and applies the erasure files) on the chosen device.
    #[uniffi::constructor]
    pub fn new(config: EngineConfig) -> Result<Arc<Self>, UnseeError> {
        guard(|| {
            let defaults = unsee::engine::EngineOptions::default();
            let opts = unsee::engine::EngineOptions {
                model: config.model_path.map(PathBuf::from).unwrap_or(defaults.model),
                text_encoder: config.text_encoder_path.map(PathBuf::from),
                erasures: config.erasure_paths.iter().map(PathBuf::from).collect(),
                loras: config.loras.iter()
                    .map(|l| unsee::lora::LoraSpec { path: PathBuf::from(&l.path), scale: l.scale })
                    .collect(),
                device: match config.device {
                    DeviceKind::Auto => unsee::device::DeviceChoice::Auto,
                    DeviceKind::Cpu => unsee::device::DeviceChoice::Cpu,
                    DeviceKind::Gpu => unsee::device::DeviceChoice::Gpu,
                },
                precision: match config.precision {
                    Precision::F32 => unsee::weights::Precision::F32,
                    Precision::F16 => unsee::weights::Precision::F16,
                },
                guard: match (config.trusted_keys.is_empty(), config.required_concepts.is_empty()) {
                    (true, true) => None,
                    (true, false) => return Err(UnseeError::InvalidRequest(
                        "required_concepts needs trusted_keys (guarded mode)".into())),
                    _ => Some(unsee::engine::Guard { trusted_keys: config.trusted_keys,
                                                     required_concepts: config.required_concepts }),
                },
                low_memory: config.low_memory,
                ..defaults
            };
            let engine = unsee::engine::Engine::open(&opts)?;
            Ok(Arc::new(Self { inner: Mutex::new(engine), jni_id: OnceLock::new() }))
        })
    }

    /// Generates one image. `progress` is called after each denoising step; `cancel` is checked before the run and
    /// between steps (a cancelled call fails with `Cancelled`).
    pub fn generate(&self, request: GenerateRequest, progress: Option<Arc<dyn ProgressListener>>,
                    cancel: Option<Arc<CancelToken>>) -> Result<GeneratedImage, UnseeError> {
        guard(|| {
            let req = request.to_core()?;
            let cancelled = || cancel.as_ref().is_some_and(|c| c.is_cancelled());
            unsee::engine::check_cancelled(&cancelled)?;
            let engine = self.lock();
            // Again once the engine is ours: the call may have waited for another one.
            unsee::engine::check_cancelled(&cancelled)?;
            let mut report = |step: usize, total: usize| {
                if let Some(p) = &progress {
                    p.on_step(step as i32, total as i32);
                }
            };
            let inputs = unsee::pipeline::Inputs { cancelled: Some(&cancelled), ..Default::default() };
            let g = engine.generate(&req, inputs, &mut unsee::engine::step_callback(&mut report, &cancelled),
                                    unsee::pipeline::Target::Rgba)?;
            Ok(GeneratedImage { width: g.width as i32, height: g.height as i32, rgba: g.rgba })
        })
    }

    /// Erases the concepts of an edit spec (TOML, the format of `unsee erase --spec`) from this engine's model —
    /// later `generate` calls use the edit — and, if `save_to` is given, writes the erasure file there.
    pub fn erase(&self, spec_toml: String, save_to: Option<String>) -> Result<ErasureSummary, UnseeError> {
        guard(|| {
            let spec = parse_spec(&spec_toml)?;
            let save = save_to.as_deref().map(Path::new);
            let edit = self.lock().erase(&spec, save)?;
            Ok(ErasureSummary {
                method: spec.method.name().to_string(),
                concepts: spec.erase.iter().map(|e| e.concept.clone()).collect(),
                replacements: spec.erase.iter().map(|e| e.replace_with.clone()).collect(),
                matrices: edit.deltas.len() as i32,
                rank: edit.deltas.iter().map(|d| d.r.ncols()).max().unwrap_or(0) as i32,
                encode_seconds: edit.timings.encode_s,
                solve_seconds: edit.timings.solve_s,
                apply_seconds: edit.timings.apply_s,
                warnings: edit.warnings,
                saved_to: save_to,
            })
        })
    }

    /// Leakage and drift (as `unsee audit`) of the erasures in effect — or, if there are none, of the edit the spec
    /// describes — on the spec's concepts and preserve set, against the base weights. Changes nothing.
    pub fn audit(&self, spec_toml: String) -> Result<AuditReport, UnseeError> {
        guard(|| {
            let spec = parse_spec(&spec_toml)?;
            let r = self.lock().audit(&spec)?;
            Ok(AuditReport {
                concepts: r
                    .concepts
                    .iter()
                    .map(|c| ConceptAudit {
                        concept: c.concept.clone(),
                        replacement: c.replacement.clone(),
                        key_leakage: stat(&c.key_leakage),
                        noise_leakage: stat(&c.noise_leakage),
                        attack_noise_leakage: c.attack_noise_leakage.as_ref().map(stat),
                    })
                    .collect(),
                preserved: r
                    .preserved
                    .iter()
                    .map(|p| DriftAudit { prompt: p.prompt.clone(), key_drift: stat(&p.key_drift),
                                          noise_drift: stat(&p.noise_drift) })
                    .collect(),
                overall_key_leakage: stat(&r.overall_key_leakage),
                overall_noise_leakage: stat(&r.overall_noise_leakage),
                overall_attack_noise_leakage: r.overall_attack_noise_leakage.as_ref().map(stat),
                overall_key_drift: r.overall_key_drift.as_ref().map(stat),
                overall_noise_drift: r.overall_noise_drift.as_ref().map(stat),
                table: r.table(),
                json: serde_json::to_string_pretty(&r).map_err(|e| UnseeError::Internal(e.to_string()))?,
            })
        })
    }

    /// The device, precision, components and the erasures in effect (with their concepts).
    pub fn info(&self) -> Result<EngineInfo, UnseeError> {
        guard(|| {
            let info = self.lock().info()?;
            Ok(EngineInfo {
                model: info.model,
                device: info.device,
                is_gpu: info.is_gpu,
                precision: match info.precision {
                    unsee::weights::Precision::F32 => Precision::F32,
                    unsee::weights::Precision::F16 => Precision::F16,
                },
                components: info
                    .files
                    .iter()
                    .map(|(c, f)| ComponentInfo {
                        name: c.clone(),
                        file: path_string(&f.file),
                        // A single-file checkpoint holds all three networks.
                        parameters: match info.parameters.get(c) {
                            Some(&p) => p as i64,
                            None => info.parameters.values().sum::<usize>() as i64,
                        },
                    })
                    .collect(),
                low_memory: info.low_memory,
                erasures: info
                    .erasures
                    .iter()
                    .map(|a| ErasureEntry {
                        source: a.source.as_deref().map(path_string),
                        method: a.method.clone(),
                        concepts: a.concepts.clone(),
                        replacements: a.replacements.clone(),
                    })
                    .collect(),
            })
        })
    }

    /// A handle for the JNI fast path (`app.unsee.UnseeNative`): it refers to this engine without owning it and
    /// stops working (with an error, never a crash) once the engine is dropped. The same engine always gets the
    /// same handle.
    pub fn jni_handle(self: Arc<Self>) -> i64 {
        *self.jni_id.get_or_init(|| {
            static NEXT: AtomicI64 = AtomicI64::new(1);
            let id = NEXT.fetch_add(1, Ordering::SeqCst);
            jni_registry().lock().unwrap_or_else(|p| p.into_inner()).insert(id, Arc::downgrade(&self));
            id
        })
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(id) = self.jni_id.get() {
            jni_registry().lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
    }
}

/// Engines reachable from the JNI path, by handle.
fn jni_registry() -> &'static Mutex<HashMap<i64, Weak<Engine>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<i64, Weak<Engine>>>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

pub(crate) fn engine_for_handle(handle: i64) -> Result<Arc<Engine>, UnseeError> {
    jni_registry()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&handle)
        .and_then(Weak::upgrade)
        .ok_or_else(|| UnseeError::InvalidRequest(format!("no live engine has the JNI handle {handle}")))
}

/// wgpu adapters this device offers (name, backend, type), for a device picker.
#[uniffi::export]
pub fn gpu_adapters() -> Vec<String> {
    guard(|| {
        Ok(unsee::device::list_adapters()
            .iter()
            .map(|a| format!("{} ({}, {})", a.name, a.backend, a.device_type))
            .collect())
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Engine>();
    }
}
