//! Attacks on an erased model: ways to get an erased concept back, used to measure how robust an erasure is. What
//! each assumes of the attacker decides what it says about a device:
//!
//! | attack | the attacker… | closed on a device by |
//! |---|---|---|
//! | composition prompts ([`crate::shapes::eval`]) | types text | a robust erasure |
//! | optimised prompt ([`prompt`], UnlearnDiffAtk) | types text found offline with the weights' gradients | a robust erasure |
//! | textual inversion ([`inversion`], concept inversion) | holds the weights and can feed a new token embedding | not exposing raw embeddings |
//! | embedding ([`embedding`], RECE's closed form) | feeds raw conditioning to the UNet | not exposing raw conditioning |
//!
//! The conditioning attack bypasses any text encoder, so a robust text encoder cannot close it; textual
//! inversion goes through the text encoder, so a robust one can resist it, but it needs an input that takes an
//! embedding. Only the typed-prompt attacks stay open to someone who can type but not change the app.
//!
//! [`run`] drives any of them over several concept prompts and seeds and, when a judge (an oracle that reads the
//! concept off a picture) exists, reports the share of attacked generations that show the concept.

pub mod embedding;
pub mod inversion;
pub mod loss;
pub mod prompt;

use std::path::PathBuf;
use std::time::Instant;

pub use embedding::{EMBEDDING_ATTACK_LAMBDA, EmbeddingAttack, adversarial_context};
use inversion::{InversionConfig, InversionTarget, PLACEHOLDER};
use prompt::PromptAttackConfig;

use super::spec::Spec;
use crate::error::{Error, Result};
use crate::load::StableDiffusion;
use burn::tensor::Tensor;

use crate::pipeline::{Control, GenerateRequest, Generated, Inputs, Target};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttackMethod {
    /// UnlearnDiffAtk: optimised prefix tokens, judged as a typed prompt.
    Prompt,
    /// Concept inversion: a learned token embedding ⟨v*⟩.
    Inversion,
    /// RECE's closed-form adversarial conditioning (UNet edits only).
    Embedding,
}

impl AttackMethod {
    pub fn name(self) -> &'static str {
        match self {
            Self::Prompt => "prompt",
            Self::Inversion => "inversion",
            Self::Embedding => "embedding",
        }
    }

    /// What the attacker needs.
    pub fn assumes(self) -> &'static str {
        match self {
            Self::Prompt => "typed text only (found offline with the weights' gradients)",
            Self::Inversion => "the weights, and an input that accepts a token embedding",
            Self::Embedding => "raw conditioning fed to the UNet (bypasses any text encoder)",
        }
    }
}

/// How an attack is run and judged.
#[derive(Debug, Clone)]
pub struct AttackOptions {
    pub method: AttackMethod,
    /// Attacked generations: concept prompts (rotating over the spec's concepts and `templates`) × seeds.
    pub runs: usize,
    pub seed: u64,
    /// DDIM steps and guidance of every generation (target images and judged images).
    pub steps: usize,
    pub guidance: f64,
    /// Prompt templates (`{}` = the concept) of the attacked prompts: held-out ones, not the edit's.
    pub templates: Vec<String>,
    pub prompt: PromptAttackConfig,
    pub inversion: InversionConfig,
    /// Target images of the inversion (base-model images of the concepts on the spec's templates).
    pub inversion_targets: usize,
    /// Inversion: evaluate this saved embedding instead of learning one.
    pub load_embedding: Option<PathBuf>,
    /// Inversion: write the learned embedding here.
    pub save_embedding: Option<PathBuf>,
    /// Keep each run's judged image (RGBA) in the report.
    pub keep_images: bool,
    /// Applied to every filled-in prompt (the shapes world's "a" → "an").
    pub rewrite: Option<fn(&str) -> String>,
}

impl AttackOptions {
    pub fn new(method: AttackMethod, templates: Vec<String>) -> Self {
        Self { method, runs: 12, seed: 0, steps: 20, guidance: 7.5, templates, prompt: PromptAttackConfig::default(),
               inversion: InversionConfig::default(), inversion_targets: 8, load_embedding: None,
               save_embedding: None, keep_images: false, rewrite: None }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !(1..=10_000).contains(&self.runs) {
            return bad(format!("attack runs must be 1 to 10000 (got {})", self.runs));
        }
        if !(1..=10_000).contains(&self.inversion_targets) {
            return bad(format!("inversion targets must be 1 to 10000 (got {})", self.inversion_targets));
        }
        if self.templates.is_empty() || self.templates.iter().any(|t| t.matches("{}").count() != 1) {
            return bad("attack templates must each hold `{}` exactly once".into());
        }
        GenerateRequest { steps: self.steps, guidance: self.guidance, ..Default::default() }.validate()?;
        self.prompt.validate()?;
        self.inversion.validate()
    }
}

/// One attacked generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttackRun {
    /// The erased concept it targets.
    pub concept: String,
    /// The concept prompt attacked (before any prefix or placeholder).
    pub target: String,
    /// What was generated: the typed prompt (prompt attack), the prompt with ⟨v*⟩ (inversion) or the prompt whose
    /// conditioning was replaced (embedding).
    pub prompt: String,
    pub seed: u64,
    /// The oracle's verdict (`None` without a judge).
    pub success: Option<bool>,
    /// Prompt attack: optimisation steps, typed prompts judged, and whether the typed text tokenizes back to the
    /// optimised tokens.
    pub iterations: Option<usize>,
    pub evaluations: Option<usize>,
    pub retokenizes: Option<bool>,
    pub seconds: f64,
    #[serde(skip)]
    pub image: Option<Image>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AttackReport {
    pub method: AttackMethod,
    pub assumes: &'static str,
    pub runs: Vec<AttackRun>,
    /// Runs the judge read as the concept, of those judged.
    pub hits: Option<usize>,
    pub of: usize,
    /// Inversion: the learned (or loaded) embedding's file, and the training loss.
    pub embedding_file: Option<PathBuf>,
    pub inversion_loss: Option<f32>,
    pub inversion_seconds: Option<f64>,
    pub seconds: f64,
}

impl AttackReport {
    /// Success rate in % (`None` without a judge).
    pub fn success_pct(&self) -> Option<f64> {
        self.hits.map(|h| 100.0 * h as f64 / self.of.max(1) as f64)
    }
}

/// Decides whether a picture (RGBA, width, height) shows concept number `concept` of the spec.
pub type Judge<'a> = &'a dyn Fn(usize, &[u8], usize, usize) -> bool;

/// A judged picture: width, height, RGBA.
type Image = (usize, usize, Vec<u8>);

fn generate(sd: &StableDiffusion, req: &GenerateRequest, context: Option<Tensor<3>>, target: Target,
            cancelled: &dyn Fn() -> bool) -> Result<Generated> {
    sd.generate(req, Inputs { context, cancelled: Some(cancelled), ..Default::default() }, &mut |_| Control::Continue,
                target)
}

fn request(prompt: &str, seed: u64, o: &AttackOptions) -> GenerateRequest {
    GenerateRequest { prompt: prompt.to_string(), steps: o.steps, guidance: o.guidance, seed, ..Default::default() }
}

/// Attacks `attacked` on the concepts of `spec`, with target images from `base`. `progress(stage, done, total)`.
pub fn run(base: &StableDiffusion, attacked: &StableDiffusion, spec: &Spec, o: &AttackOptions, judge: Option<Judge>,
           progress: &mut dyn FnMut(&str, usize, usize), cancelled: &dyn Fn() -> bool) -> Result<AttackReport> {
    o.validate()?;
    if spec.erase.is_empty() {
        return Err(Error::InvalidSpec("the spec names no concept to attack".into()));
    }
    let start = Instant::now();
    let concepts: Vec<&str> = spec.erase.iter().map(|e| e.concept.as_str()).collect();
    let fill = |template: &str, concept: &str| {
        let text = Spec::fill(template, concept);
        o.rewrite.map_or(text.clone(), |f| f(&text))
    };
    // The r-th attacked prompt: concept r mod n, template rotating once every concept had its turn.
    let pick = |r: usize| {
        let c = r % concepts.len();
        (c, fill(&o.templates[(r / concepts.len()) % o.templates.len()], concepts[c]))
    };
    let latents = |sd: &StableDiffusion, text: &str, seed: u64| -> Result<Tensor<4>> {
        Ok(generate(sd, &request(text, seed, o), None, Target::Latents, cancelled)?.latents)
    };
    // Generates with the attacked model and asks the judge about concept `c`.
    let judged = |c: usize, text: &str, seed: u64, context: Option<Tensor<3>>| -> Result<(Option<bool>, Image)> {
        let g = generate(attacked, &request(text, seed, o), context, Target::Rgba, cancelled)?;
        Ok((judge.map(|j| j(c, &g.rgba, g.width, g.height)), (g.width, g.height, g.rgba)))
    };
    let mut runs = vec![];
    let (mut embedding_file, mut inversion_loss, mut inversion_seconds) = (None, None, None);
    match o.method {
        AttackMethod::Prompt => {
            for r in 0..o.runs {
                let (c, text) = pick(r);
                let seed = o.seed + r as u64;
                let t0 = Instant::now();
                let x0 = latents(base, &text, seed)?;
                let mut last = None;
                let cfg = PromptAttackConfig { seed: o.seed.wrapping_mul(1_000_003).wrapping_add(r as u64), ..o.prompt.clone() };
                let out = prompt::attack(attacked, &x0, &text, &cfg, &mut |typed| {
                    let (ok, img) = judged(c, typed, seed, None)?;
                    last = Some(img);
                    Ok(ok)
                }, &mut |d, n| progress(&format!("run {}/{}", r + 1, o.runs), d, n), cancelled)?;
                runs.push(AttackRun { concept: concepts[c].to_string(), target: text.clone(), prompt: out.prompt, seed, success: out.success,
                                      iterations: Some(out.iterations), evaluations: Some(out.evaluations),
                                      retokenizes: Some(out.retokenizes), seconds: t0.elapsed().as_secs_f64(),
                                      image: last.filter(|_| o.keep_images) });
            }
        }
        AttackMethod::Inversion => {
            let v = match &o.load_embedding {
                Some(path) => {
                    embedding_file = Some(path.clone());
                    inversion::load_embedding(attacked, path)?
                }
                None => {
                    let mut targets = vec![];
                    for i in 0..o.inversion_targets {
                        let c = i % concepts.len();
                        let template = &spec.templates[(i / concepts.len()) % spec.templates.len()];
                        let seed = o.seed + 50_000 + i as u64;
                        progress("target images", i, o.inversion_targets);
                        let x0 = latents(base, &fill(template, concepts[c]), seed)?;
                        targets.push(InversionTarget { prompt: fill(template, PLACEHOLDER), x0 });
                    }
                    let init = inversion::init_from(attacked, concepts[0])?;
                    let cfg = InversionConfig { seed: o.seed, ..o.inversion.clone() };
                    let inv = inversion::invert(attacked, &targets, init, &cfg,
                                                &mut |d, n| progress("inversion", d, n), cancelled)?;
                    inversion_loss = Some(inv.loss);
                    inversion_seconds = Some(inv.seconds);
                    if let Some(path) = &o.save_embedding {
                        inversion::save_embedding(&inv.embedding, path)?;
                        embedding_file = Some(path.clone());
                    }
                    inv.embedding
                }
            };
            for r in 0..o.runs {
                let c = r % concepts.len();
                let text = fill(&o.templates[r % o.templates.len()], PLACEHOLDER);
                let seed = o.seed + r as u64;
                let t0 = Instant::now();
                let ctx = inversion::context_with(attacked, &text, &v)?;
                let (success, img) = judged(c, &text, seed, Some(ctx))?;
                runs.push(AttackRun { concept: concepts[c].to_string(), target: text.clone(), prompt: text, seed, success,
                                      iterations: None,
                                      evaluations: None, retokenizes: None, seconds: t0.elapsed().as_secs_f64(),
                                      image: Some(img).filter(|_| o.keep_images) });
                progress("judging", r + 1, o.runs);
            }
        }
        AttackMethod::Embedding => {
            let attack = EmbeddingAttack::new(base, attacked, EMBEDDING_ATTACK_LAMBDA)?.ok_or_else(|| {
                Error::InvalidRequest("the embedding attack needs a UNet edit; this model's cross-attention equals \
                                       the base's (a text-encoder edit is attacked with --method prompt or inversion)".into())
            })?;
            for r in 0..o.runs {
                let (c, text) = pick(r);
                let seed = o.seed + r as u64;
                let t0 = Instant::now();
                let ctx = attack.context(attacked, &text)?;
                let (success, img) = judged(c, &text, seed, Some(ctx))?;
                runs.push(AttackRun { concept: concepts[c].to_string(), target: text.clone(), prompt: text, seed, success,
                                      iterations: None,
                                      evaluations: None, retokenizes: None, seconds: t0.elapsed().as_secs_f64(),
                                      image: Some(img).filter(|_| o.keep_images) });
                progress("judging", r + 1, o.runs);
            }
        }
    }
    let hits = judge.map(|_| runs.iter().filter(|r| r.success == Some(true)).count());
    Ok(AttackReport { method: o.method, assumes: o.method.assumes(), of: runs.len(), runs, hits, embedding_file,
                      inversion_loss, inversion_seconds, seconds: start.elapsed().as_secs_f64() })
}
