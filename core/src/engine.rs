//! The one stateful object behind every front end (the `unsee` CLI, the mobile bindings `unsee-ffi`, and any
//! server): a loaded model plus the erasures applied to it. Rules about what may be loaded or generated live here,
//! once.
//!
//! It keeps the model as loaded (base) next to the model in use (base + erasures), so that `audit` can always
//! compare against the base weights and `generate` always uses every erasure, whether it came from a file at load
//! or from an `erase` call.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::Tensor;

use crate::device::{DeviceChoice, select};
use crate::erase::attack::{AttackOptions, AttackReport, Judge};
use crate::erase::audit::AuditReport;
use crate::erase::harden::HardenReport;
use crate::erase::spec::Spec;
use crate::erase::{Delta, Edit, apply_delta, file};
use crate::error::{Error, Result};
use crate::load::{LoadOptions, Part, Parts, StableDiffusion};
use crate::pipeline::{Control, GenerateRequest, Generated, Inputs, StepEvent, Target};
use crate::tokenizer::Tokens;
use crate::weights::{MappedSafetensors, Precision};

/// What to load.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// A diffusers folder, an HF-cache folder or a single-file checkpoint.
    pub model: PathBuf,
    /// Configs and tokenizer for a single-file checkpoint (default: SD-1.5's).
    pub config_dir: Option<PathBuf>,
    /// A text encoder that replaces the model's (see [`LoadOptions::text_encoder`]).
    pub text_encoder: Option<PathBuf>,
    /// Erasure files applied at load, in order (after the LoRAs are merged: an erasure file records the merged
    /// weights it was computed from).
    pub erasures: Vec<PathBuf>,
    /// LoRAs merged into the weights at load ([`crate::lora`]), e.g. an LCM-LoRA for 4-step sampling.
    pub loras: Vec<crate::lora::LoraSpec>,
    pub device: DeviceChoice,
    pub precision: Precision,
    /// Scan every weight of a large single-file checkpoint for NaN/Inf before loading it (folders: always).
    pub check: bool,
    /// Guarded mode ([`Guard`]); `None` = unguarded.
    pub guard: Option<Guard>,
    /// Sequential residency: keep no network in memory between generations and load each one only for its stage
    /// of a generation (the text encoder to encode the prompt, the UNet to denoise, the VAE to decode), so that at
    /// most one is resident at a time; peak memory is then the largest network plus its stage's work, at the cost
    /// of reading (and, for a bundle, hashing) the weights at every generation. Weight files are read at the first
    /// generation, so a damaged file or a mismatched erasure file is reported then, not by `open` (an erasure
    /// file's text-encoder identity is checked at open for a bundle). Only generation and prompt encoding are
    /// offered; single-file checkpoints, LoRAs and replacement text encoders are refused (bake them into a
    /// bundle). On Linux with glibc it also sets, for the whole process, the size from which allocations are mapped
    /// on their own to 1 MiB (see `map_large_allocations`), and returns freed heap pages after each stage.
    pub low_memory: bool,
}

/// The policy of a guarded engine: it loads only a bundle ([`crate::bundle`]) signed by one of `trusted_keys`,
/// whose every file matches the manifest (weights hashed as they are read) and whose erasures include every
/// concept of `required_concepts`; it refuses text-encoder overrides, erasure files, further `erase` calls,
/// hardening, raw conditioning, init latents and injected sampler noise, with [`Error::GuardViolation`].
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// minisign public keys: `.pub` file contents or their base64 line.
    pub trusted_keys: Vec<String>,
    /// Concepts the bundle must erase (compared case-insensitively).
    pub required_concepts: Vec<String>,
}

impl Default for EngineOptions {
    /// The default model ([`crate::model::default_model_dir`]) on the best device, f32.
    fn default() -> Self {
        Self {
            model: crate::model::default_model_dir(),
            config_dir: None,
            text_encoder: None,
            erasures: vec![],
            loras: vec![],
            device: DeviceChoice::Auto,
            precision: Precision::F32,
            check: false,
            guard: None,
            low_memory: false,
        }
    }
}

/// One erasure in effect.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedErasure {
    /// The file it came from; `None` for an edit computed by [`Engine::erase`] and not saved.
    pub source: Option<PathBuf>,
    pub method: String,
    pub concepts: Vec<String>,
    pub replacements: Vec<String>,
    /// Already in the loaded weights (an erasure of a bundle).
    pub baked: bool,
    #[serde(skip)]
    deltas: Vec<Delta>,
    /// The file's own account (a low-memory engine checks and applies it again at every load).
    #[serde(skip)]
    info: Option<file::ErasureInfo>,
}

/// One weight file of the loaded model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileInfo {
    pub file: PathBuf,
    /// Values per storage dtype (`None` if the file can no longer be read).
    pub dtypes: Option<BTreeMap<String, usize>>,
}

/// What `unsee info` and the bindings' `info` report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    pub model: String,
    /// Parameters per network (`text_encoder`, `unet`, `vae`).
    pub parameters: BTreeMap<String, usize>,
    /// The weight file of each component (`checkpoint` for a single file).
    pub files: BTreeMap<String, FileInfo>,
    pub text_encoder: serde_json::Value,
    pub unet: serde_json::Value,
    pub vae: serde_json::Value,
    pub device: String,
    pub is_gpu: bool,
    pub precision: Precision,
    /// Erasures in effect, in the order they were applied.
    pub erasures: Vec<AppliedErasure>,
    /// LoRAs merged into the weights, in order.
    pub loras: Vec<crate::lora::AppliedLora>,
    /// The bundle's manifest, when the model is a bundle.
    pub bundle: Option<crate::bundle::Manifest>,
    /// The bundle's signer (minisign key id) when its signature was checked.
    pub signer: Option<String>,
    pub guarded: bool,
    /// Networks loaded per stage of a generation ([`EngineOptions::low_memory`]).
    pub low_memory: bool,
}

pub struct Engine {
    base: StableDiffusion,
    model: StableDiffusion,
    applied: Vec<AppliedErasure>,
    /// When the text encoder in use was hardened in this session: the one it was trained from, and the spec.
    hardened_from: Option<(crate::clip::CLIPTextModel, Spec)>,
    /// What the engine was opened with (the attacks reload the model's own text encoder when it was replaced).
    opts: EngineOptions,
    /// A low-memory engine runs one generation at a time (two would hold two sets of networks).
    one_at_a_time: std::sync::Mutex<()>,
}

fn guard_violation(m: impl Into<String>) -> Error {
    Error::GuardViolation(m.into())
}

impl Engine {
    /// Loads the model on the chosen device and applies the erasure files, each checked against the weights it
    /// was computed for.
    pub fn open(opts: &EngineOptions) -> Result<Self> {
        // The guard's checks that need no weights come first: a refused engine reads no weight file.
        let is_bundle = opts.model.is_dir() && crate::bundle::is_bundle(&opts.model);
        let bundle = match &opts.guard {
            Some(guard) => {
                if !is_bundle {
                    return Err(guard_violation(format!(
                        "{}: a guarded engine loads only signed bundles (`unsee bundle build --sign`)",
                        opts.model.display())));
                }
                if opts.text_encoder.is_some() {
                    return Err(guard_violation("a guarded engine refuses a replacement text encoder"));
                }
                if !opts.erasures.is_empty() {
                    return Err(guard_violation("a guarded engine applies only the erasures baked into its bundle"));
                }
                if !opts.loras.is_empty() {
                    return Err(guard_violation("a guarded engine refuses LoRAs (they change the signed weights)"));
                }
                let keys = guard.trusted_keys.iter().map(|k| crate::bundle::parse_public_key(k))
                    .collect::<Result<Vec<_>>>()?;
                if keys.is_empty() {
                    return Err(guard_violation("a guarded engine needs at least one trusted public key"));
                }
                let verified = crate::bundle::open(&opts.model, &keys, false)?;
                let erased: Vec<String> = verified.manifest.erased_concepts().iter()
                    .map(|c| c.trim().to_lowercase()).collect();
                for c in &guard.required_concepts {
                    if !erased.contains(&c.trim().to_lowercase()) {
                        return Err(guard_violation(format!(
                            "{}: the bundle does not erase the required concept {c:?} (it erases {:?})",
                            opts.model.display(), verified.manifest.erased_concepts())));
                    }
                }
                Some(std::sync::Arc::new(verified))
            }
            None if is_bundle => Some(std::sync::Arc::new(crate::bundle::open(&opts.model, &[], false)?)),
            None => None,
        };
        let device = select(opts.device, opts.precision)?;
        tracing::info!("device: {}", device.description);
        if opts.low_memory {
            map_large_allocations();
        }
        let load = LoadOptions {
            check: opts.check,
            config_dir: opts.config_dir.clone(),
            text_encoder: opts.text_encoder.clone(),
            bundle: bundle.clone(),
            loras: opts.loras.clone(),
            parts: if opts.low_memory { Parts::NONE } else { Parts::ALL },
        };
        let base = StableDiffusion::load(&opts.model, device, &load)?;
        tracing::info!("loaded {} in {:.2}s", opts.model.display(), base.load_time.as_secs_f64());
        let mut model = base.clone();
        let mut applied = vec![];
        if let Some(b) = &bundle {
            for e in &b.manifest.erasures {
                applied.push(AppliedErasure {
                    source: e.file.as_ref().map(|f| b.dir.join(f)),
                    method: e.method.clone(),
                    concepts: e.concepts.clone(),
                    replacements: e.replacements.clone(),
                    baked: true,
                    deltas: vec![],
                    info: None,
                });
            }
        }
        for path in &opts.erasures {
            let (info, deltas) = file::load(path)?;
            file::apply_checked(&mut model, path, &info, &deltas)?;
            tracing::info!("applied {} ({}: {:?} → {:?})", path.display(), info.method, info.concepts,
                           info.replacements);
            applied.push(AppliedErasure {
                source: Some(path.clone()),
                method: info.method.clone(),
                concepts: info.concepts.clone(),
                replacements: info.replacements.clone(),
                baked: false,
                deltas,
                info: Some(info),
            });
        }
        Ok(Self { base, model, applied, hardened_from: None, opts: opts.clone(),
                  one_at_a_time: std::sync::Mutex::new(()) })
    }

    /// The model in use (base + erasures). A low-memory engine's has its configs, tokenizer and files but no network
    /// loaded ([`crate::load::Net`]): generate and encode through the engine.
    pub fn model(&self) -> &StableDiffusion {
        &self.model
    }

    pub fn erasures(&self) -> &[AppliedErasure] {
        &self.applied
    }

    /// Whether the engine runs under a [`Guard`].
    pub fn is_guarded(&self) -> bool {
        self.opts.guard.is_some()
    }

    fn refuse_if_guarded(&self, what: &str) -> Result<()> {
        if self.is_guarded() { Err(guard_violation(format!("a guarded engine refuses {what}"))) } else { Ok(()) }
    }

    /// Whether the engine keeps no network loaded between generations ([`EngineOptions::low_memory`]).
    pub fn is_low_memory(&self) -> bool {
        self.opts.low_memory
    }

    /// Refuses what needs the networks loaded together on a low-memory engine.
    fn refuse_if_low_memory(&self, what: &str) -> Result<()> {
        if self.opts.low_memory {
            return Err(Error::InvalidRequest(format!(
                "a low-memory engine only generates and encodes prompts: {what} needs the model opened without \
                 low-memory mode")));
        }
        Ok(())
    }

    /// The model with only `part` loaded (from the same files, a bundle's hashed again as they are read), with the
    /// erasure files in effect checked and applied to it: one stage of a low-memory engine's generation.
    fn stage(&self, part: Part) -> Result<StableDiffusion> {
        release_freed_memory();
        let load = LoadOptions { check: self.opts.check, config_dir: self.opts.config_dir.clone(), text_encoder: None,
                                 bundle: self.base.bundle.clone(), loras: vec![], parts: Parts::only(part) };
        let mut sd = StableDiffusion::load(&self.opts.model, self.base.device.clone(), &load)?;
        for a in &self.applied {
            if let (Some(path), Some(info)) = (&a.source, &a.info) {
                file::apply_checked(&mut sd, path, info, &a.deltas)?;
            }
        }
        // And what loading freed (read buffers, converted chunks).
        release_freed_memory();
        Ok(sd)
    }

    /// Refuses work that needs the weights an erasure was computed from when they are not at hand: the erasures of
    /// a bundle are baked into its weights.
    fn refuse_if_baked(&self, what: &str) -> Result<()> {
        if self.applied.iter().any(|a| a.baked) {
            return Err(Error::InvalidRequest(format!(
                "the erasures of this bundle are baked into its weights: {what} the model it was built from")));
        }
        Ok(())
    }

    /// Refuses work that needs the whole token-embedding table on the device when the table had to stay on the CPU
    /// (a GPU whose binding limit is smaller than the table).
    fn refuse_if_table_offloaded(&self, what: &str) -> Result<()> {
        if self.model.text_encoder.table_is_offloaded() {
            return Err(Error::DeviceUnavailable(format!(
                "{what} need the whole token-embedding table on the device, and it is larger than what {} binds: run \
                 them with --device cpu", self.model.device.description)));
        }
        Ok(())
    }

    /// Refuses work that needs floating-point weights (training, attacks, exports) on a quantized bundle.
    fn refuse_if_bundle(&self, what: &str) -> Result<()> {
        if self.model.bundle.is_some() {
            return Err(Error::InvalidRequest(format!(
                "a bundle's weights are quantized: {what} the model it was built from instead")));
        }
        Ok(())
    }

    /// Generates with the model in use (see [`StableDiffusion::generate`]). A guarded engine takes only prompts:
    /// raw conditioning, init latents and injected sampler noise are refused.
    pub fn generate(&self, req: &GenerateRequest, inputs: Inputs, on_step: &mut dyn FnMut(StepEvent) -> Control,
                    target: Target) -> Result<Generated> {
        if inputs.context.is_some() {
            self.refuse_if_guarded("raw conditioning (embeddings in place of a prompt)")?;
        }
        if inputs.init_latents.is_some() {
            self.refuse_if_guarded("init latents")?;
        }
        if inputs.noise.is_some() {
            self.refuse_if_guarded("injected sampler noise")?;
        }
        if self.opts.low_memory {
            let _one = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
            let generated = self.model.generate_staged(req, inputs, on_step, target, &|p| Ok(Cow::Owned(self.stage(p)?)));
            release_freed_memory();
            return generated;
        }
        self.model.generate(req, inputs, on_step, target)
    }

    /// The text encoder's `last_hidden_state` `[1, 77, hidden]` for `prompt`, and its tokens.
    pub fn encode_prompt(&self, prompt: &str) -> Result<(Tensor<3>, Tokens)> {
        if self.opts.low_memory {
            let _one = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
            return self.stage(Part::TextEncoder)?.encode_prompt(prompt);
        }
        self.model.encode_prompt(prompt)
    }

    /// VAE decode of latents (e.g. [`Generated::latents`] of a [`Target::Latents`] generation) into an RGBA8 buffer
    /// of exactly the image's size ([`StableDiffusion::decode_rgba_into`]).
    pub fn decode_rgba_into(&self, latents: Tensor<4>, out: &mut [u8]) -> Result<(usize, usize)> {
        if self.opts.low_memory {
            let _one = self.one_at_a_time.lock().unwrap_or_else(|e| e.into_inner());
            return self.stage(Part::Vae)?.decode_rgba_into(latents, out);
        }
        self.model.decode_rgba_into(latents, out)
    }

    /// The refusal [`erase`](Self::erase) would give on this engine whatever the spec (guarded, low memory), so a
    /// front end that erases after other work can refuse before doing it.
    pub fn check_can_erase(&self) -> Result<()> {
        self.refuse_if_guarded("further erasures (only those baked into its bundle apply)")?;
        self.refuse_if_low_memory("erasing")
    }

    /// Computes the edit `spec` describes on the model in use, applies it, and (if `save_to` is given) writes it
    /// as an erasure file. On error nothing is applied.
    pub fn erase(&mut self, spec: &Spec, save_to: Option<&Path>) -> Result<Edit> {
        self.check_can_erase()?;
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
            baked: false,
            deltas: edit.deltas.clone(),
            info: None,
        });
        Ok(edit)
    }

    /// Writes a complete diffusers folder with every erasure in effect baked into the weights.
    pub fn bake(&self, out: &Path) -> Result<()> {
        self.refuse_if_low_memory("baking")?;
        if !self.model.loras.is_empty() {
            return Err(Error::InvalidRequest("--bake copies the model's files and rewrites the erased matrices, so it \
                cannot carry merged LoRAs: build a bundle (`unsee bundle build`, which writes the weights in use) or \
                bake without --lora".into()));
        }
        if self.model.bundle.is_some() {
            return Err(Error::InvalidRequest("a bundle cannot be baked: build a new bundle from the model it was \
                                              built from".into()));
        }
        let deltas: Vec<Delta> = self.applied.iter().flat_map(|a| a.deltas.iter().cloned()).collect();
        file::bake(&self.base, &deltas, out)
    }

    /// Writes the model with every erasure in effect baked in as one single-file checkpoint with CompVis key names
    /// (AUTOMATIC1111, ComfyUI): baked into a diffusers folder staged beside `out`, converted, written atomically.
    pub fn bake_single_file(&self, out: &Path) -> Result<()> {
        check_single_file_target(out)?;
        self.refuse_if_low_memory("exporting a single-file checkpoint")?;
        let name = out.file_name().ok_or_else(|| Error::InvalidRequest(format!("{} names no file", out.display())))?;
        let staging = out.with_file_name(format!(".{}.folder-{}", name.to_string_lossy(), std::process::id()));
        if staging.exists() {
            return Err(Error::InvalidRequest(format!("{} exists (another export running?)", staging.display())));
        }
        self.bake(&staging)?;
        // The text encoder in use — replaced (`--text-encoder`) or hardened in this session — goes into the file, not
        // the base folder's: the checkpoint is the model this engine draws with.
        let replaced = self.opts.text_encoder.is_some() || self.hardened_from.is_some();
        let te_swapped = if replaced {
            let te_dir = staging.join("text_encoder");
            std::fs::remove_dir_all(&te_dir).map_err(|e| Error::io(&te_dir, e))
                .and_then(|_| self.save_text_encoder(&te_dir))
        } else {
            Ok(())
        };
        let written = te_swapped.and_then(|_| {
            crate::compvis::write_checkpoint(&staging, &self.base.unet_config, &self.base.vae_config, out)
        });
        let _ = std::fs::remove_dir_all(&staging);
        written
    }

    /// Audits, against the base weights, the erasures in effect — or, when there are none, the edit `spec`
    /// describes — on the concepts and preserve set of `spec`. The model in use is not changed.
    pub fn audit(&self, spec: &Spec) -> Result<AuditReport> {
        self.refuse_if_low_memory("auditing")?;
        self.refuse_if_baked("audit")?;
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

    /// Attacks the model as loaded — base + erasure files, a replaced (`--text-encoder`) or hardened text encoder —
    /// or, when none of these is in effect, the edit `spec` describes, computed on a copy; on the concepts of
    /// `spec` ([`crate::erase::attack::run`]). The attacks' target images are made by the base weights with the
    /// model's own text encoder (reloaded when it was replaced). When the spec's concepts are shapes-world pairs,
    /// the shapes oracle judges every attacked picture; `opts.templates` left empty means held-out templates: the
    /// shapes world's, or those of the spec's template family.
    pub fn attack(&self, spec: &Spec, opts: &AttackOptions, progress: &mut dyn FnMut(&str, usize, usize),
                  cancelled: &dyn Fn() -> bool) -> Result<AttackReport> {
        self.refuse_if_guarded("attacks (they feed raw conditioning)")?;
        self.refuse_if_low_memory("attacking")?;
        self.refuse_if_bundle("attack")?;
        self.refuse_if_table_offloaded("attacks")?;
        let replaced = self.opts.text_encoder.is_some();
        let attacked = if !self.applied.is_empty() || self.hardened_from.is_some() || replaced {
            self.model.clone()
        } else {
            let mut sd = self.base.clone();
            crate::erase::erase(&mut sd, spec)?;
            sd
        };
        let reference = if replaced {
            let load = LoadOptions { check: self.opts.check, config_dir: self.opts.config_dir.clone(), text_encoder: None,
                                     bundle: self.base.bundle.clone(), loras: self.opts.loras.clone(),
                                     parts: Parts::ALL };
            let own = StableDiffusion::load(&self.opts.model, self.base.device.clone(), &load)?;
            StableDiffusion { text_encoder: own.text_encoder, text_config: own.text_config, ..self.base.clone() }
        } else {
            self.base.clone()
        };
        let oracle = crate::shapes::eval::Erasure::from_spec(spec);
        let mut opts = opts.clone();
        if oracle.is_some() && opts.rewrite.is_none() {
            opts.rewrite = Some(crate::shapes::article);
        }
        if opts.templates.is_empty() {
            opts.templates = match oracle {
                Some(_) => crate::shapes::HELD_OUT_TEMPLATES.iter().map(|t| t.to_string()).collect(),
                None => crate::erase::spec::held_out_templates(&spec.templates_name),
            };
        }
        let judge = |c: usize, rgba: &[u8], w: usize, h: usize| {
            oracle.as_ref().is_some_and(|e| e.shows(&crate::shapes::analyse(rgba, w, h, 4), e.items[c].0))
        };
        crate::erase::attack::run(&reference, &attacked, spec, &opts, oracle.as_ref().map(|_| &judge as Judge),
                                  progress, cancelled)
    }

    /// Hardens the text encoder in use against the concepts of `spec` (AdvUnlearn, [`crate::erase::harden`]) and
    /// puts the hardened one in its place; the previous encoder is the frozen reference. Nothing changes on error.
    pub fn harden(&mut self, spec: &Spec, progress: &mut dyn FnMut(&str, usize, usize),
                  cancelled: &dyn Fn() -> bool) -> Result<HardenReport> {
        self.refuse_if_guarded("hardening (it replaces the text encoder)")?;
        self.refuse_if_low_memory("hardening")?;
        self.refuse_if_bundle("harden")?;
        self.refuse_if_table_offloaded("hardening")?;
        let (te, report) = crate::erase::harden::harden(&self.model, spec, progress, cancelled)?;
        let before = (*self.model.text_encoder).clone();
        self.model.text_encoder = crate::load::Net::new(te);
        self.model.text_encoder_identity = None;
        self.hardened_from = Some((before, spec.clone()));
        Ok(report)
    }

    /// Writes the encoder hardened in this session as a compact delta file (what `--text-encoder FILE` loads onto
    /// the encoder it was trained from).
    pub fn save_hardened_delta(&self, out: &Path) -> Result<()> {
        let (from, spec) = self.hardened_from.as_ref()
            .ok_or_else(|| Error::InvalidRequest("no text encoder was hardened in this session".into()))?;
        crate::erase::harden::save_delta(from, &self.model.text_encoder, spec, out)
    }

    /// Writes the text encoder in use as a diffusers `text_encoder` folder (what `--text-encoder` loads).
    pub fn save_text_encoder(&self, out: &Path) -> Result<()> {
        self.refuse_if_low_memory("exporting the text encoder")?;
        self.refuse_if_bundle("export the text encoder of")?;
        let (_, config) = self.config_paths();
        crate::erase::harden::save_text_encoder(&self.model.text_encoder, &config, out)
    }

    /// The model, its files and configs, the device and the erasures in effect.
    pub fn info(&self) -> Result<EngineInfo> {
        let sd = &self.model;
        // Counted on an unallocated module of each network's config (burn's parameters are lazy: counting them
        // allocates nothing): a network may not be loaded (low-memory engine), and a bundle's packed 4-bit weights
        // hold two values per stored element.
        let dev = sd.dev();
        let parameters = BTreeMap::from([
            ("text_encoder".to_string(), crate::clip::CLIPTextModel::new(&sd.text_config, dev)?.num_params()),
            ("unet".to_string(), crate::unet::UNet2DConditionModel::new(&sd.unet_config, dev)?.num_params()),
            ("vae".to_string(), crate::load::new_vae(&sd.vae_config, dev, sd.bundle.as_deref())?.num_params()),
        ]);
        let mut files = BTreeMap::new();
        for (c, f) in &sd.files {
            let dtypes = MappedSafetensors::open(f).ok().map(|m| m.dtypes());
            files.insert(c.clone(), FileInfo { file: f.clone(), dtypes });
        }
        Ok(EngineInfo {
            model: format!("{:?}", sd.location),
            parameters,
            files,
            text_encoder: serde_json::json!({
                "hidden_size": sd.text_config.hidden_size, "layers": sd.text_config.num_hidden_layers,
                "heads": sd.text_config.num_attention_heads, "act": sd.text_config.hidden_act,
                "vocab": sd.tokenizer.vocab_size()}),
            unet: serde_json::json!({
                "block_out_channels": sd.unet_config.block_out_channels,
                "down_block_types": sd.unet_config.down_block_types,
                "cross_attention_dim": sd.unet_config.cross_attention_dim,
                "sample_size": sd.unet_config.sample_size}),
            vae: serde_json::json!({
                "block_out_channels": sd.vae_config.block_out_channels,
                "scaling_factor": sd.vae_config.scaling_factor,
                "scale_factor": sd.vae_config.scale_factor()}),
            device: sd.device.description.clone(),
            is_gpu: sd.device.is_gpu,
            precision: sd.device.precision,
            erasures: self.applied.clone(),
            loras: sd.loras.clone(),
            bundle: sd.bundle.as_ref().map(|b| b.manifest.clone()),
            signer: sd.bundle.as_ref().and_then(|b| b.signer.clone()),
            guarded: self.is_guarded(),
            low_memory: self.opts.low_memory,
        })
    }

    /// The folder that holds the model's configs, tokenizer and scheduler, and the text encoder's `config.json`.
    fn config_paths(&self) -> (PathBuf, PathBuf) {
        let root = match &self.model.location {
            crate::model::ModelLocation::Folder(d) => d.clone(),
            crate::model::ModelLocation::SingleFile { config_dir, .. } => config_dir.clone(),
        };
        let own = self.model.files.iter().find(|(c, _)| c == "text_encoder").and_then(|(_, f)| f.parent())
            .map(|d| d.join("config.json")).filter(|p| p.is_file());
        let te_config = own.unwrap_or_else(|| root.join("text_encoder").join("config.json"));
        (root, te_config)
    }

    /// Writes the model in use — every erasure in effect baked in, the text encoder in use (replaced or hardened)
    /// — as a bundle ([`crate::bundle`]), quantized and optionally signed.
    pub fn build_bundle(&self, opts: &crate::bundle::BuildOptions, out: &Path,
                        progress: &mut dyn FnMut(&str, usize, usize)) -> Result<crate::bundle::Manifest> {
        self.refuse_if_low_memory("building a bundle")?;
        if self.model.bundle.is_some() {
            return Err(Error::InvalidRequest("build bundles from a model folder or checkpoint, not from a bundle \
                                              (its weights are already quantized)".into()));
        }
        let (root, text_encoder_config) = self.config_paths();
        let text_encoder_source = if self.hardened_from.is_some() {
            "hardened".to_string()
        } else if let Some(te) = &self.opts.text_encoder {
            format!("replaced: {}", te.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default())
        } else {
            "model".to_string()
        };
        let erasures = self.applied.iter().map(|a| (a.source.clone(), crate::bundle::ErasureRecord {
            method: a.method.clone(), concepts: a.concepts.clone(), replacements: a.replacements.clone(), file: None,
        })).collect();
        let src = crate::bundle::Source { sd: &self.model, root, text_encoder_config, text_encoder_source, erasures };
        crate::bundle::build(&src, opts, out, progress)
    }
}

/// Hands the memory freed by the stage that just ended back to the system: glibc keeps freed heap pages for reuse
/// (a network's many mid-sized tensors come from the heap) and the next stage's network is loaded in fresh
/// allocations beside them. Elsewhere (other allocators: Android's, Apple's) a no-op.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `malloc_trim` only returns free heap pages to the system; it takes no pointer.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A low-memory engine's allocator setting, for the whole process (glibc only; elsewhere a no-op): allocations of
/// 1 MiB and more are mapped and unmapped on their own instead of coming from the heap, so the large temporaries of
/// a denoising step go back to the system when freed. glibc's default raises this threshold up to 32 MiB as large
/// blocks are freed, and heap pages that fragment are not returned: measured on full-size SD-1.5 (int8 bundle,
/// 512², one step, `cargo bench --bench bundle`'s child), peak RSS 1576 → 1460 MiB for +3 % step time and +8 % decode
/// time.
fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` sets an allocator parameter; no pointer is involved.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// The checks on a `--bake-single-file` target that need no model (front ends run them before any work).
pub fn check_single_file_target(out: &Path) -> Result<()> {
    if out.extension().and_then(|e| e.to_str()) != Some("safetensors") {
        return Err(Error::InvalidRequest(format!("{}: a single-file checkpoint must end in .safetensors",
                                                 out.display())));
    }
    if out.is_dir() {
        return Err(Error::InvalidRequest(format!("{} is a folder", out.display())));
    }
    Ok(())
}

/// A step callback for front ends: reports `progress(step, total)` after each step and stops with
/// [`Error::Cancelled`] once `cancelled()` is true.
pub fn step_callback<'a>(progress: &'a mut dyn FnMut(usize, usize), cancelled: &'a dyn Fn() -> bool)
    -> impl FnMut(StepEvent) -> Control + 'a {
    move |ev: StepEvent| {
        progress(ev.step, ev.total);
        if cancelled() { Control::Cancel } else { Control::Continue }
    }
}

/// [`Error::Cancelled`] if `cancelled()` already holds: front ends check it before starting work.
pub fn check_cancelled(cancelled: &dyn Fn() -> bool) -> Result<()> {
    if cancelled() { Err(Error::Cancelled) } else { Ok(()) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn engine_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<super::Engine>();
    }
}
