//! Schedulers, configured from `scheduler/scheduler_config.json` exactly as diffusers reads it:
//! DDIM (η = 0), Euler ancestral, DPM-Solver++(2M) with optional Karras sigmas, and the latent consistency
//! model's multistep sampler (LCM: Luo et al., 2023, "Latent Consistency Models"; diffusers' `LCMScheduler`) for
//! 2–8-step sampling with an LCM-distilled UNet or an LCM-LoRA.
//!
//! Per-step coefficients are computed on the host in f64; the tensors stay on the device.

use burn::tensor::Tensor;
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum SchedulerKind {
    Ddim,
    EulerAncestral,
    DpmSolverPP2M { karras: bool },
    Lcm,
}

impl SchedulerKind {
    /// Every scheduler, in the order their names are listed.
    pub const ALL: [SchedulerKind; 5] = [
        Self::Ddim,
        Self::EulerAncestral,
        Self::DpmSolverPP2M { karras: false },
        Self::DpmSolverPP2M { karras: true },
        Self::Lcm,
    ];

    /// The name the CLI, the JNI path and the files use (the one table of scheduler names).
    pub fn name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::EulerAncestral => "euler-a",
            Self::DpmSolverPP2M { karras: false } => "dpmpp-2m",
            Self::DpmSolverPP2M { karras: true } => "dpmpp-2m-karras",
            Self::Lcm => "lcm",
        }
    }

    /// The name AUTOMATIC1111's API and UI give this sampler (`unsee serve`'s `/sdapi/v1/samplers`).
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIM",
            Self::EulerAncestral => "Euler a",
            Self::DpmSolverPP2M { karras: false } => "DPM++ 2M",
            Self::DpmSolverPP2M { karras: true } => "DPM++ 2M Karras",
            Self::Lcm => "LCM",
        }
    }

    /// Other spellings accepted for a name.
    fn aliases(self) -> &'static [&'static str] {
        match self {
            Self::Ddim => &[],
            Self::EulerAncestral => &["euler_a", "euler-ancestral"],
            Self::DpmSolverPP2M { karras: false } => &["dpm++2m", "dpmpp_2m"],
            Self::DpmSolverPP2M { karras: true } => &["dpmpp_2m_karras"],
            Self::Lcm => &[],
        }
    }
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL.into_iter().find(|k| k.name() == s || k.aliases().contains(&s)).ok_or_else(|| {
            let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
            format!("unknown scheduler {s:?}: expected one of {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn d_train() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_original_steps() -> usize {
    50
}
fn d_timestep_scaling() -> f64 {
    10.0
}

/// `beta_schedule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    #[default]
    Linear,
    ScaledLinear,
    SquaredcosCapV2,
}

/// `prediction_type`: what the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
    VPrediction,
}

/// `timestep_spacing`: how the inference timesteps are laid over the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// `scheduler_config.json`. Keys a scheduler class does not know are ignored, as in diffusers' `from_config`;
/// `timestep_spacing` falls back to each class's own default when absent (DDIM: leading, others: linspace).
/// Unknown values of the enumerated keys are refused when the config is read.
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default)]
    pub beta_schedule: BetaSchedule,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default)]
    pub prediction_type: PredictionType,
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub thresholding: bool,
    /// LCM: the length of the distillation schedule the inference timesteps are taken from.
    #[serde(default = "d_original_steps")]
    pub original_inference_steps: usize,
    /// LCM: the timestep scale of the consistency boundary condition (c_skip, c_out).
    #[serde(default = "d_timestep_scaling")]
    pub timestep_scaling: f64,
}

impl Default for SchedulerConfig {
    /// SD-1.5's released settings.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            rescale_betas_zero_snr: false,
            thresholding: false,
            original_inference_steps: 50,
            timestep_scaling: 10.0,
        }
    }
}

impl SchedulerConfig {
    /// ᾱ_t for t = 0..T-1.
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>> {
        let n = self.num_train_timesteps;
        let betas: Vec<f64> = if let Some(b) = &self.trained_betas {
            b.clone()
        } else {
            match self.beta_schedule {
                BetaSchedule::Linear => linspace(self.beta_start, self.beta_end, n),
                BetaSchedule::ScaledLinear => {
                    linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
                }
                BetaSchedule::SquaredcosCapV2 => (0..n)
                    .map(|i| {
                        let f = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                        (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)
                    })
                    .collect(),
            }
        };
        let mut acc = 1.0;
        Ok(betas.iter().map(|b| {
            acc *= 1.0 - b;
            acc
        }).collect())
    }

    /// Checks every value before anything is allocated from it (called at load and by [`Scheduler::new`]).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::invalid_model("scheduler_config.json", m));
        for (name, x) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            if !(x.is_finite() && x > 0.0 && x < 1.0) {
                return bad(format!("{name} = {x} must be in (0, 1)"));
            }
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return bad(format!("clip_sample_range = {} must be a finite number > 0", self.clip_sample_range));
        }
        if self.rescale_betas_zero_snr || self.thresholding {
            return bad("rescale_betas_zero_snr and thresholding are not supported".into());
        }
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&self.num_train_timesteps) {
            return bad(format!("num_train_timesteps {} is not in 2..={MAX_TRAIN_TIMESTEPS}", self.num_train_timesteps));
        }
        if !(1..=self.num_train_timesteps).contains(&self.original_inference_steps) {
            return bad(format!("original_inference_steps {} is not in 1..=num_train_timesteps ({})",
                               self.original_inference_steps, self.num_train_timesteps));
        }
        if !(self.timestep_scaling.is_finite() && self.timestep_scaling > 0.0) {
            return bad(format!("timestep_scaling = {} must be a finite number > 0", self.timestep_scaling));
        }
        if let Some(b) = &self.trained_betas
            && (b.len() != self.num_train_timesteps || b.iter().any(|x| !(*x > 0.0 && *x < 1.0)))
        {
            return bad(format!("trained_betas must hold num_train_timesteps ({}) values in (0, 1)",
                               self.num_train_timesteps));
        }
        Ok(())
    }
}

/// The largest `num_train_timesteps` accepted (SD uses 1000); larger values are refused before anything is
/// allocated.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n).map(|i| a + (b - a) * i as f64 / (n - 1) as f64).collect()
}

/// numpy's `round` (half to even), used by diffusers' timestep grids.
fn round_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 { 2.0 * (x / 2.0).round() } else { r }
}

/// How a grid's `linspace` points become timesteps.
#[derive(Clone, Copy)]
enum Rounding {
    /// `.round()` (half to even).
    Even,
    /// `np.linspace(..., dtype=float32)`: the timesteps themselves are f32 values (Euler).
    F32,
}

/// diffusers' `set_timesteps` grids, descending, `steps` long. DPM-Solver lays `steps + 1` points (`extra` = 1)
/// and drops the last; the others lay `steps`.
fn timestep_grid(spacing: TimestepSpacing, n_train: usize, steps: usize, extra: usize, offset: f64,
                 rounding: Rounding) -> Vec<f64> {
    let points = steps + extra;
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = n_train / points;
            (0..points).rev().take(steps).map(|i| round_even((i * ratio) as f64) + offset).collect()
        }
        TimestepSpacing::Trailing => {
            let r = n_train as f64 / steps as f64;
            (0..steps).map(|i| round_even(n_train as f64 - i as f64 * r) - 1.0).collect()
        }
        TimestepSpacing::Linspace => linspace(0.0, (n_train - 1) as f64, points)
            .into_iter()
            .rev()
            .take(steps)
            .map(|t| match rounding {
                Rounding::Even => round_even(t),
                Rounding::F32 => t as f32 as f64,
            })
            .collect(),
    }
}

/// `np.interp(x, arange(len(ys)), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] * (1.0 - w) + ys[i + 1] * w
}

/// What each scheduler keeps between steps.
enum State {
    /// DDIM: ᾱ used after the last step, gap between consecutive timesteps, x₀ clipping.
    Ddim { final_alpha_cumprod: f64, step_ratio: usize, clip_sample: Option<f64> },
    /// Euler ancestral: σ per step plus the final σ.
    EulerAncestral { sigmas: Vec<f64> },
    /// DPM-Solver++(2M): σ per step plus the final σ, previous data predictions (x₀, most recent last).
    DpmSolverPP2M { sigmas: Vec<f64>, model_outputs: Vec<Tensor<4>>, lower_order_nums: usize },
    /// LCM: the boundary-condition scale and x₀ clipping.
    Lcm { timestep_scaling: f64, clip_sample: Option<f64> },
}

/// A denoising schedule: which timesteps the UNet sees and how a noise prediction updates the sample.
pub struct Scheduler {
    pub kind: SchedulerKind,
    /// Timesteps passed to the UNet, in order.
    pub timesteps: Vec<f64>,
    pub init_noise_sigma: f64,
    prediction: PredictionType,
    alphas_cumprod: Vec<f64>,
    state: State,
}

impl Scheduler {
    pub fn new(kind: SchedulerKind, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        if steps == 0 {
            return Err(Error::InvalidRequest("steps must be at least 1".into()));
        }
        let n_train = cfg.num_train_timesteps;
        if steps > n_train {
            return Err(Error::InvalidRequest(format!("steps ({steps}) cannot exceed num_train_timesteps ({n_train})")));
        }
        cfg.validate()?;
        if cfg.rescale_betas_zero_snr || cfg.thresholding {
            return Err(Error::invalid_model("scheduler_config.json",
                "rescale_betas_zero_snr and thresholding are not supported"));
        }
        let ac = cfg.alphas_cumprod()?;
        let train_sigmas: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let off = cfg.steps_offset as f64;
        let (timesteps, init_noise_sigma, state) = match kind {
            SchedulerKind::Ddim => {
                let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
                let timesteps = timestep_grid(spacing, n_train, steps, 0, off, Rounding::Even);
                let state = State::Ddim {
                    final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
                    step_ratio: n_train / steps,
                    clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range),
                };
                (timesteps, 1.0, state)
            }
            SchedulerKind::EulerAncestral => {
                let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
                let timesteps = timestep_grid(spacing, n_train, steps, 0, off, Rounding::F32);
                let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp(t, &train_sigmas) as f32 as f64).collect();
                sigmas.push(0.0);
                let max = sigmas.iter().cloned().fold(0.0, f64::max);
                let init = if spacing == TimestepSpacing::Leading { (max * max + 1.0).sqrt() } else { max };
                (timesteps, init, State::EulerAncestral { sigmas })
            }
            SchedulerKind::DpmSolverPP2M { karras } => {
                // lambda_min_clipped = -inf: the grid spans all training timesteps.
                let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
                let mut ts = timestep_grid(spacing, n_train, steps, 1, off, Rounding::Even);
                let sigmas: Vec<f64> = if karras {
                    let (smin, smax) = (train_sigmas[0], train_sigmas[n_train - 1]);
                    let rho = 7.0;
                    let ks: Vec<f64> = linspace(0.0, 1.0, steps)
                        .into_iter()
                        .map(|r| (smax.powf(1.0 / rho) + r * (smin.powf(1.0 / rho) - smax.powf(1.0 / rho))).powf(rho))
                        .collect();
                    let log_sigmas: Vec<f64> = train_sigmas.iter().map(|s| s.ln()).collect();
                    ts = ks.iter().map(|&sg| sigma_to_t(sg, &log_sigmas).round()).collect();
                    ks
                } else {
                    ts.iter().map(|&t| interp(t, &train_sigmas)).collect()
                };
                // diffusers stores σ as float32.
                let mut sigmas: Vec<f64> = sigmas.into_iter().map(|x| x as f32 as f64).collect();
                sigmas.push(0.0); // final_sigmas_type = "zero"
                (ts, 1.0, State::DpmSolverPP2M { sigmas, model_outputs: vec![], lower_order_nums: 0 })
            }
            SchedulerKind::Lcm => {
                // The distillation schedule: every k-th training timestep, k = T / original_steps (19, 39, ..., 999
                // for SD), then `steps` of them at evenly spaced indices from the top.
                let original = cfg.original_inference_steps;
                if steps > original {
                    return Err(Error::InvalidRequest(format!(
                        "LCM takes at most original_inference_steps ({original}) steps, not {steps}")));
                }
                let k = n_train / original;
                let origin: Vec<f64> = (1..=original).rev().map(|i| (i * k) as f64 - 1.0).collect();
                // np.floor(np.linspace(0, original, steps, endpoint=False)): j·(original/steps) in f64, as numpy
                // computes it (exact integer division differs for some lengths, e.g. 38 of 1000).
                let step = original as f64 / steps as f64;
                let timesteps = (0..steps).map(|j| origin[((j as f64 * step).floor() as usize).min(original - 1)]).collect();
                let state = State::Lcm {
                    timestep_scaling: cfg.timestep_scaling,
                    clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range),
                };
                (timesteps, 1.0, state)
            }
        };
        // `leading` spacing plus `steps_offset` can step past the schedule (e.g. 1000 steps of 1000 with offset 1).
        if let Some(t) = timesteps.iter().find(|&&t| !(t >= 0.0 && t < n_train as f64)) {
            return Err(Error::InvalidRequest(format!(
                "{steps} steps put timestep {t} outside the model's schedule (0..{n_train}, steps_offset {}); use fewer \
                 steps", cfg.steps_offset
            )));
        }
        Ok(Self { kind, timesteps, init_noise_sigma, prediction: cfg.prediction_type, alphas_cumprod: ac, state })
    }

    /// Whether step `i` takes fresh noise (ancestral samplers every step; LCM every step but the last).
    pub fn needs_noise(&self, i: usize) -> bool {
        match self.state {
            State::EulerAncestral { .. } => true,
            State::Lcm { .. } => i + 1 < self.timesteps.len(),
            _ => false,
        }
    }

    /// The UNet input for step `i` (Euler: x / √(σ²+1); others: unchanged).
    pub fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        match &self.state {
            State::EulerAncestral { sigmas } => {
                let sigma = sigmas[i];
                sample / ((sigma * sigma + 1.0).sqrt() as f32)
            }
            _ => sample,
        }
    }

    /// One denoising update from step `i` to `i+1`. `noise` (same shape as `sample`) is required by ancestral
    /// samplers and ignored otherwise.
    pub fn step(&mut self, model_output: Tensor<4>, i: usize, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        let n = self.timesteps.len();
        let t = self.timesteps[i];
        let prediction = self.prediction;
        match &mut self.state {
            State::Ddim { final_alpha_cumprod, step_ratio, clip_sample } => {
                ddim_step(&self.alphas_cumprod, prediction, *final_alpha_cumprod, *step_ratio, *clip_sample,
                          model_output, t, sample)
            }
            State::EulerAncestral { sigmas } => euler_a_step(sigmas, prediction, model_output, i, sample, noise),
            State::DpmSolverPP2M { sigmas, model_outputs, lower_order_nums } => {
                dpm_step(sigmas, model_outputs, lower_order_nums, prediction, model_output, i, n, sample)
            }
            State::Lcm { timestep_scaling, clip_sample } => {
                let prev_t = if i + 1 < n { self.timesteps[i + 1] } else { t };
                lcm_step(&self.alphas_cumprod, prediction, *timestep_scaling, *clip_sample, model_output, t, prev_t,
                         sample, noise)
            }
        }
    }
}

/// DDIM (Song et al., 2021) with η = 0.
#[allow(clippy::too_many_arguments)]
fn ddim_step(alphas_cumprod: &[f64], prediction: PredictionType, final_alpha_cumprod: f64, step_ratio: usize,
             clip_sample: Option<f64>, eps: Tensor<4>, t: f64, x: Tensor<4>) -> Tensor<4> {
    let t = t as i64;
    let prev_t = t - step_ratio as i64;
    let a_t = alphas_cumprod[t as usize];
    let a_prev = if prev_t >= 0 { alphas_cumprod[prev_t as usize] } else { final_alpha_cumprod };
    let b_t = 1.0 - a_t;
    let (mut x0, eps) = match prediction {
        PredictionType::Epsilon => ((x - eps.clone() * b_t.sqrt() as f32) / a_t.sqrt() as f32, eps),
        PredictionType::VPrediction => (
            x.clone() * a_t.sqrt() as f32 - eps.clone() * b_t.sqrt() as f32,
            eps * a_t.sqrt() as f32 + x * b_t.sqrt() as f32,
        ),
    };
    if let Some(r) = clip_sample {
        x0 = x0.clamp(-r as f32, r as f32);
    }
    x0 * a_prev.sqrt() as f32 + eps * (1.0 - a_prev).sqrt() as f32
}

/// Euler ancestral (Karras et al., 2022, with the ancestral noise of k-diffusion).
fn euler_a_step(sigmas: &[f64], prediction: PredictionType, out: Tensor<4>, i: usize, x: Tensor<4>,
                noise: Option<Tensor<4>>) -> Tensor<4> {
    let sigma = sigmas[i];
    let x0 = match prediction {
        PredictionType::Epsilon => x.clone() - out * sigma as f32,
        PredictionType::VPrediction => {
            out * (-sigma / (sigma * sigma + 1.0).sqrt()) as f32 + x.clone() / (sigma * sigma + 1.0) as f32
        }
    };
    let (s_from, s_to) = (sigma, sigmas[i + 1]);
    let sigma_up = (s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from)).sqrt();
    let sigma_down = (s_to * s_to - sigma_up * sigma_up).sqrt();
    let derivative = (x.clone() - x0) / sigma as f32;
    let prev = x + derivative * (sigma_down - sigma) as f32;
    match noise {
        Some(n) if sigma_up > 0.0 => prev + n * sigma_up as f32,
        _ => prev,
    }
}

/// One LCM multistep update: the consistency function f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂₀(x_t, t), with the
/// boundary condition c_skip = σ_d²/((s·t)² + σ_d²), c_out = s·t/√((s·t)² + σ_d²) (σ_d = 0.5, s =
/// `timestep_scaling`), then re-noised to the next timestep: x_prev = √ᾱ_prev·f + √(1-ᾱ_prev)·z (no noise after the
/// last step, where the denoised sample is the result).
#[allow(clippy::too_many_arguments)]
fn lcm_step(alphas_cumprod: &[f64], prediction: PredictionType, timestep_scaling: f64, clip_sample: Option<f64>,
            out: Tensor<4>, t: f64, prev_t: f64, x: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
    let a_t = alphas_cumprod[t as usize];
    let b_t = 1.0 - a_t;
    let sigma_data = 0.5f64;
    let scaled = t * timestep_scaling;
    let c_skip = sigma_data * sigma_data / (scaled * scaled + sigma_data * sigma_data);
    let c_out = scaled / (scaled * scaled + sigma_data * sigma_data).sqrt();
    let mut x0 = match prediction {
        PredictionType::Epsilon => (x.clone() - out * b_t.sqrt() as f32) / a_t.sqrt() as f32,
        PredictionType::VPrediction => x.clone() * a_t.sqrt() as f32 - out * b_t.sqrt() as f32,
    };
    if let Some(r) = clip_sample {
        x0 = x0.clamp(-r as f32, r as f32);
    }
    let denoised = x0 * c_out as f32 + x * c_skip as f32;
    match noise {
        Some(z) => {
            let a_prev = alphas_cumprod[prev_t as usize];
            denoised * a_prev.sqrt() as f32 + z * (1.0 - a_prev).sqrt() as f32
        }
        None => denoised,
    }
}

fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// DPM-Solver++(2M) (Lu et al., 2022), midpoint form, first order at the first and last steps
/// (`lower_order_final`, `final_sigmas_type = "zero"`; order 2 is the maximum here, so the "second to last" rule
/// changes nothing).
#[allow(clippy::too_many_arguments)]
fn dpm_step(sigmas: &[f64], model_outputs: &mut Vec<Tensor<4>>, lower_order_nums: &mut usize,
            prediction: PredictionType, out: Tensor<4>, i: usize, n: usize, x: Tensor<4>) -> Tensor<4> {
    let (alpha_s0, sigma_s0) = alpha_sigma(sigmas[i]);
    let x0 = match prediction {
        PredictionType::Epsilon => (x.clone() - out * sigma_s0 as f32) / alpha_s0 as f32,
        PredictionType::VPrediction => x.clone() * alpha_s0 as f32 - out * sigma_s0 as f32,
    };
    model_outputs.push(x0.clone());
    if model_outputs.len() > 2 {
        model_outputs.remove(0);
    }
    let lower_order_final = i == n - 1; // final σ is zero
    let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
    let result = if sigmas[i + 1] == 0.0 {
        // λ_t = ∞: the first-order update reduces to the data prediction.
        x0
    } else {
        let lambda = |a: f64, s: f64| a.ln() - s.ln();
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let c_x = sigma_t / sigma_s0;
        let c_d = alpha_t * ((-h).exp() - 1.0);
        if *lower_order_nums < 1 || lower_order_final {
            x * c_x as f32 - x0 * c_d as f32
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(sigmas[i - 1]);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let r0 = (lambda_s0 - lambda_s1) / h;
            let m0 = x0;
            let m1 = model_outputs[0].clone();
            let d1 = (m0.clone() - m1) / r0 as f32;
            x * c_x as f32 - m0 * c_d as f32 - d1 * (0.5 * c_d) as f32
        }
    };
    if *lower_order_nums < 2 {
        *lower_order_nums += 1;
    }
    result
}

/// diffusers' `_sigma_to_t`: the (fractional) training timestep whose σ is `sigma`, by log-linear interpolation.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas.iter().rposition(|&l| ls - l >= 0.0).unwrap_or(0).min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddim_leading_timesteps_match_diffusers() {
        let s = Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::default(), 10).unwrap();
        assert_eq!(s.timesteps, vec![901.0, 801.0, 701.0, 601.0, 501.0, 401.0, 301.0, 201.0, 101.0, 1.0]);
    }

    #[test]
    fn dpm_linspace_timesteps_match_diffusers() {
        // np.linspace(0, 999, 11).round()[::-1][:-1]
        let s = Scheduler::new(SchedulerKind::DpmSolverPP2M { karras: false }, &SchedulerConfig::default(), 10).unwrap();
        assert_eq!(s.timesteps, vec![999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0]);
    }

    #[test]
    fn timesteps_beyond_the_schedule_are_an_error() {
        // Leading spacing with steps_offset 1: 1000 steps would reach timestep 1000.
        let e = Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::default(), 1000).err().unwrap();
        assert!(e.to_string().contains("outside the model's schedule"), "{e}");
        assert!(Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::default(), 999).is_ok());
        let cfg = SchedulerConfig { trained_betas: Some(vec![0.01; 3]), ..Default::default() };
        assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 10).is_err());
        let cfg = SchedulerConfig { num_train_timesteps: 1_000_000_000_000, ..Default::default() };
        assert!(Scheduler::new(SchedulerKind::Ddim, &cfg, 10).is_err());
    }

    #[test]
    fn lcm_timesteps_match_diffusers() {
        // LCMScheduler.set_timesteps(n) with original_inference_steps = 50 on SD's 1000 training steps.
        let ts = |n| Scheduler::new(SchedulerKind::Lcm, &SchedulerConfig::default(), n).unwrap().timesteps;
        assert_eq!(ts(4), vec![999.0, 759.0, 499.0, 259.0]);
        assert_eq!(ts(1), vec![999.0]);
        assert_eq!(ts(8), vec![999.0, 879.0, 759.0, 639.0, 499.0, 379.0, 259.0, 139.0]);
        assert!(Scheduler::new(SchedulerKind::Lcm, &SchedulerConfig::default(), 51).is_err());
        let cfg = SchedulerConfig { original_inference_steps: 0, ..Default::default() };
        assert!(Scheduler::new(SchedulerKind::Lcm, &cfg, 4).is_err());
    }

    #[test]
    fn zero_steps_is_an_error() {
        assert!(Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::default(), 0).is_err());
    }

    #[test]
    fn unknown_scheduler_name_is_an_error() {
        assert!("plms".parse::<SchedulerKind>().is_err());
    }
}
