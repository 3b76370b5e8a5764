//! One error type for the runtime. Every failure a user can act on has its own variant.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model not found: {0}")]
    ModelNotFound(PathBuf),

    #[error("invalid model at {path}: {message}")]
    InvalidModel { path: PathBuf, message: String },

    #[error("model folder {path} has no `{component}` component ({hint})")]
    MissingComponent { path: PathBuf, component: String, hint: String },

    /// Missing, unexpected or mis-shaped tensors, all of them in one report.
    #[error("weights of {component} do not match its config ({file}):\n{report}")]
    WeightMismatch { component: String, file: PathBuf, report: String },

    #[error("{file}: pickle checkpoints are never executed. Convert it to safetensors first, e.g. with diffusers: \
             `python -c \"import torch, safetensors.torch as st; sd = torch.load('{file}', weights_only=True); \
             st.save_file({{k: v.contiguous() for k, v in sd.get('state_dict', sd).items()}}, 'model.safetensors')\"`")]
    PickleRefused { file: PathBuf },

    /// A PyTorch checkpoint refused before any tensor is read: a reference outside tensor storage (or a format
    /// the reference check cannot follow). Nothing in it is ever executed.
    #[error("{}: refused PyTorch checkpoint: {message}", file.display())]
    UnsafePickle { file: PathBuf, message: String },

    #[error("corrupt or unreadable safetensors file {file}: {message}")]
    CorruptWeights { file: PathBuf, message: String },

    #[error("non-finite values (NaN or Inf) in {count} tensor(s) of {component}: {names}")]
    NonFiniteWeights { component: String, count: usize, names: String },

    /// An erasure file computed for other base weights or another text encoder.
    #[error("{}: erasure mismatch: {message}", file.display())]
    ErasureMismatch { file: PathBuf, message: String },

    /// A file that is not a valid erasure file (wrong format or version, missing or malformed tensors).
    #[error("{}: not a valid erasure file: {message}", file.display())]
    InvalidErasureFile { file: PathBuf, message: String },

    /// A LoRA file that cannot be merged into this model (unknown format or layer names, shapes that do not fit,
    /// NaN/Inf, a quantized target); the message names the tensor.
    #[error("{}: not a usable LoRA: {message}", file.display())]
    InvalidLora { file: PathBuf, message: String },

    /// An edit spec that cannot be used (unknown method, a value out of range, a concept both erased and
    /// preserved…); TOML specs name the line.
    #[error("invalid spec: {0}")]
    InvalidSpec(String),

    /// The generation produced NaN or Inf (from weights with NaN/Inf beyond the automatic scan, or values that
    /// overflow on the device): an error instead of a black image.
    #[error("the {0} produced NaN or Inf values (check the weights with --check)")]
    NonFiniteOutput(String),

    #[error("device unavailable: {0}")]
    DeviceUnavailable(String),

    /// A bad generation request or input: prompt, size, step count, guidance, latents, output buffer.
    #[error("invalid request: {0}")]
    InvalidRequest(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("cancelled")]
    Cancelled,

    #[error("I/O error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A bundle whose manifest, signature or files do not check out (altered, swapped, missing or extra file, wrong
    /// key): names the file.
    #[error("{}: bundle refused: {message}", file.display())]
    Bundle { file: PathBuf, message: String },

    /// A guarded engine refused a load or a request its policy does not allow (unsigned or untrusted bundle, a
    /// required concept not erased, a text-encoder override, raw conditioning, init latents, a further erasure).
    #[error("guard: {0}")]
    GuardViolation(String),

    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn invalid_model(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::InvalidModel { path: path.into(), message: message.into() }
    }
}
