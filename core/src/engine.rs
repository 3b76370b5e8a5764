//! A loaded model plus the erasures applied to it: the stateful object behind the mobile bindings (`unsee-ffi`).
//!
//! It keeps the model as loaded (base) next to the model in use (base + erasures), so that `audit` can always
//! compare against the base weights and `generate` always uses every erasure, whether it came from a file at load
//! or from an `erase` call.

use std::path::{Path, PathBuf};

use crate::device::{DeviceChoice, select};
use crate::erase::audit::AuditReport;
use crate::erase::spec::Spec;
use crate::erase::{Delta, Edit, apply_delta, file};
use crate::error::{Error, Result};
use crate::pipeline::{Control, GenerateRequest, Generated, LoadOptions, StableDiffusion, StepEvent, Timings};
use crate::weights::Precision;

/// What to load.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A diffusers folder, an HF-cache folder or a single-file checkpoint.
    pub model: PathBuf,
    /// A text encoder that replaces the model's (see [`LoadOptions::text_encoder`]).
    pub text_encoder: Option<PathBuf>,
    /// Erasure files applied at load, in order.
    pub erasures: Vec<PathBuf>,
    pub device: DeviceChoice,
    pub precision: Precision,
}

/// One erasure in effect.
#[derive(Debug, Clone)]
pub struct AppliedErasure {
    /// The file it came from; `None` for an edit computed by [`Engine::erase`] and not saved.
    pub source: Option<PathBuf>,
    pub method: String,
    pub concepts: Vec<String>,
    pub replacements: Vec<String>,
    deltas: Vec<Delta>,
}

pub struct Engine {
    base: StableDiffusion,
    model: StableDiffusion,
    applied: Vec<AppliedErasure>,
}

impl Engine {
    pub fn open(opts: &EngineOptions) -> Result<Self> {
        let device = select(opts.device, opts.precision)?;
        let load = LoadOptions { text_encoder: opts.text_encoder.clone(), ..Default::default() };
        let base = StableDiffusion::load(&opts.model, device, &load)?;
        let mut model = base.clone();
        let mut applied = vec![];
        for path in &opts.erasures {
            let (info, deltas) = file::load(path)?;
            file::apply_checked(&mut model, path, &info, &deltas)?;
            applied.push(AppliedErasure {
                source: Some(path.clone()),
                method: info.method,
                concepts: info.concepts,
                replacements: info.replacements,
                deltas,
            });
        }
        Ok(Self { base, model, applied })
    }

    /// The model in use (base + erasures).
    pub fn model(&self) -> &StableDiffusion {
        &self.model
    }

    pub fn erasures(&self) -> &[AppliedErasure] {
        &self.applied
    }

    /// Generates with progress reports after every denoising step; `cancelled` is polled before the run and after
    /// each step, and a `true` ends the call with [`Error::Cancelled`].
    pub fn generate(&self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize), cancelled: &dyn Fn() -> bool)
        -> Result<Generated> {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        self.model.generate(req, None, None, &mut step_callback(progress, cancelled))
    }

    /// [`generate`](Self::generate) into a caller-owned RGBA8 buffer of exactly width × height × 4 bytes.
    pub fn generate_into(&self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize),
                         cancelled: &dyn Fn() -> bool, out: &mut [u8]) -> Result<Timings> {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        self.model.generate_into(req, &mut step_callback(progress, cancelled), out)
    }

    /// Computes the edit `spec` describes on the model in use, applies it, and (if `save_to` is given) writes it
    /// as an erasure file. On error nothing is applied.
    pub fn erase(&mut self, spec: &Spec, save_to: Option<&Path>) -> Result<Edit> {
        let mut edited = self.model.clone();
        let edit = crate::erase::erase(&mut edited, spec)?;
        if let Some(path) = save_to {
            file::save(&edit, path)?;
        }
        self.model = edited;
        self.applied.push(AppliedErasure {
            source: save_to.map(Path::to_path_buf),
            method: spec.method.name().to_string(),
            concepts: spec.erase.iter().map(|e| e.concept.clone()).collect(),
            replacements: spec.erase.iter().map(|e| e.replace_with.clone()).collect(),
            deltas: edit.deltas.clone(),
        });
        Ok(edit)
    }

    /// Audits, against the base weights, the erasures in effect — or, when there are none, the edit `spec`
    /// describes — on the concepts and preserve set of `spec`. The model in use is not changed.
    pub fn audit(&self, spec: &Spec) -> Result<AuditReport> {
        let mut sd = self.base.clone();
        crate::erase::audit::audit(&mut sd, spec, |sd| {
            if self.applied.is_empty() {
                return crate::erase::erase(sd, spec).map(|_| ());
            }
            for d in self.applied.iter().flat_map(|a| &a.deltas) {
                apply_delta(sd, d)?;
            }
            Ok(())
        })
    }
}

fn step_callback<'a>(progress: &'a mut dyn FnMut(usize, usize), cancelled: &'a dyn Fn() -> bool)
    -> impl FnMut(StepEvent) -> Control + 'a {
    move |ev: StepEvent| {
        progress(ev.step, ev.total);
        if cancelled() { Control::Cancel } else { Control::Continue }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Engine>();
    }
}
