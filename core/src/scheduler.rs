//! Schedulers, configured from `scheduler/scheduler_config.json` exactly as diffusers reads it:
//! DDIM (η = 0), Euler ancestral, and DPM-Solver++(2M) with optional Karras sigmas.
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
}

impl std::str::FromStr for SchedulerKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "ddim" => Ok(Self::Ddim),
            "euler-a" | "euler_a" | "euler-ancestral" => Ok(Self::EulerAncestral),
            "dpmpp-2m" | "dpm++2m" | "dpmpp_2m" => Ok(Self::DpmSolverPP2M { karras: false }),
            "dpmpp-2m-karras" | "dpmpp_2m_karras" => Ok(Self::DpmSolverPP2M { karras: true }),
            _ => Err(format!("unknown scheduler {s:?}: expected ddim, euler-a, dpmpp-2m or dpmpp-2m-karras")),
        }
    }
}

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ddim => "ddim",
            Self::EulerAncestral => "euler-a",
            Self::DpmSolverPP2M { karras: false } => "dpmpp-2m",
            Self::DpmSolverPP2M { karras: true } => "dpmpp-2m-karras",
        })
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
fn d_schedule() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_eps() -> String {
    "epsilon".into()
}

/// `scheduler_config.json`. Keys a scheduler class does not know are ignored, as in diffusers' `from_config`;
/// `timestep_spacing` falls back to each class's own default when absent (DDIM: leading, others: linspace).
#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_train")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_schedule")]
    pub beta_schedule: String,
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
    #[serde(default = "d_eps")]
    pub prediction_type: String,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    #[serde(default)]
    pub thresholding: bool,
}

impl Default for SchedulerConfig {
    /// SD-1.5's released settings.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            trained_betas: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            clip_sample_range: 1.0,
            prediction_type: "epsilon".into(),
            timestep_spacing: None,
            rescale_betas_zero_snr: false,
            thresholding: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Prediction {
    Epsilon,
    V,
}

impl SchedulerConfig {
    /// ᾱ_t for t = 0..T-1.
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>> {
        let n = self.num_train_timesteps;
        let betas: Vec<f64> = if let Some(b) = &self.trained_betas {
            b.clone()
        } else {
            match self.beta_schedule.as_str() {
                "linear" => linspace(self.beta_start, self.beta_end, n),
                "scaled_linear" => {
                    linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n).into_iter().map(|b| b * b).collect()
                }
                "squaredcos_cap_v2" => (0..n)
                    .map(|i| {
                        let f = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                        (1.0 - f((i + 1) as f64 / n as f64) / f(i as f64 / n as f64)).min(0.999)
                    })
                    .collect(),
                other => return Err(Error::invalid_model("scheduler_config.json", format!("beta_schedule {other}"))),
            }
        };
        let mut acc = 1.0;
        Ok(betas.iter().map(|b| {
            acc *= 1.0 - b;
            acc
        }).collect())
    }

    fn validate(&self) -> Result<Prediction> {
        if self.rescale_betas_zero_snr || self.thresholding {
            return Err(Error::invalid_model("scheduler_config.json",
                "rescale_betas_zero_snr and thresholding are not supported"));
        }
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::V),
            other => Err(Error::invalid_model("scheduler_config.json", format!("prediction_type {other}"))),
        }
    }

    fn spacing(&self, default: &str) -> Result<String> {
        let s = self.timestep_spacing.clone().unwrap_or_else(|| default.to_string());
        match s.as_str() {
            "leading" | "trailing" | "linspace" => Ok(s),
            _ => Err(Error::invalid_model("scheduler_config.json", format!("timestep_spacing {s}"))),
        }
    }
}

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

/// A denoising schedule: which timesteps the UNet sees and how a noise prediction updates the sample.
pub struct Scheduler {
    pub kind: SchedulerKind,
    /// Timesteps passed to the UNet, in order.
    pub timesteps: Vec<f64>,
    pub init_noise_sigma: f64,
    prediction: Prediction,
    alphas_cumprod: Vec<f64>,
    /// σ per step plus the final σ (Euler ancestral, DPM-Solver).
    sigmas: Vec<f64>,
    /// DDIM: ᾱ used after the last step; gap between consecutive timesteps.
    final_alpha_cumprod: f64,
    step_ratio: usize,
    clip_sample: Option<f64>,
    /// DPM-Solver: previous data predictions (x₀), most recent last.
    model_outputs: Vec<Tensor<4>>,
    lower_order_nums: usize,
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
        let prediction = cfg.validate()?;
        let ac = cfg.alphas_cumprod()?;
        let train_sigmas: Vec<f64> = ac.iter().map(|a| ((1.0 - a) / a).sqrt()).collect();
        let mut s = Self {
            kind,
            timesteps: vec![],
            init_noise_sigma: 1.0,
            prediction,
            alphas_cumprod: ac.clone(),
            sigmas: vec![],
            final_alpha_cumprod: if cfg.set_alpha_to_one { 1.0 } else { ac[0] },
            step_ratio: n_train / steps,
            clip_sample: cfg.clip_sample.then_some(cfg.clip_sample_range),
            model_outputs: vec![],
            lower_order_nums: 0,
        };
        let off = cfg.steps_offset as f64;
        match kind {
            SchedulerKind::Ddim => {
                let spacing = cfg.spacing("leading")?;
                s.timesteps = match spacing.as_str() {
                    "leading" => (0..steps).rev().map(|i| round_even((i * (n_train / steps)) as f64) + off).collect(),
                    "trailing" => {
                        let r = n_train as f64 / steps as f64;
                        (0..steps).map(|i| round_even(n_train as f64 - i as f64 * r) - 1.0).collect()
                    }
                    _ => linspace(0.0, (n_train - 1) as f64, steps).into_iter().rev().map(round_even).collect(),
                };
            }
            SchedulerKind::EulerAncestral => {
                let spacing = cfg.spacing("linspace")?;
                s.timesteps = match spacing.as_str() {
                    "leading" => (0..steps).rev().map(|i| round_even((i * (n_train / steps)) as f64) + off).collect(),
                    "trailing" => {
                        let r = n_train as f64 / steps as f64;
                        (0..steps).map(|i| round_even(n_train as f64 - i as f64 * r) - 1.0).collect()
                    }
                    // np.linspace(..., dtype=float32): the timesteps themselves are f32 values.
                    _ => linspace(0.0, (n_train - 1) as f64, steps).into_iter().rev().map(|t| t as f32 as f64).collect(),
                };
                s.sigmas = s.timesteps.iter().map(|&t| interp(t, &train_sigmas) as f32 as f64).collect();
                s.sigmas.push(0.0);
                let max = s.sigmas.iter().cloned().fold(0.0, f64::max);
                s.init_noise_sigma = if spacing == "leading" { (max * max + 1.0).sqrt() } else { max };
            }
            SchedulerKind::DpmSolverPP2M { karras } => {
                let spacing = cfg.spacing("linspace")?;
                let last = n_train; // lambda_min_clipped = -inf
                let mut ts: Vec<f64> = match spacing.as_str() {
                    "linspace" => {
                        let g = linspace(0.0, (last - 1) as f64, steps + 1);
                        g.into_iter().rev().take(steps).map(round_even).collect()
                    }
                    "leading" => {
                        let r = last / (steps + 1);
                        (1..=steps).rev().map(|i| (i * r) as f64 + off).collect()
                    }
                    _ => {
                        let r = n_train as f64 / steps as f64;
                        (0..steps).map(|i| round_even(last as f64 - i as f64 * r) - 1.0).collect()
                    }
                };
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
                s.sigmas = sigmas.into_iter().map(|x| x as f32 as f64).collect();
                s.sigmas.push(0.0); // final_sigmas_type = "zero"
                s.timesteps = ts;
            }
        }
        Ok(s)
    }

    pub fn needs_noise(&self) -> bool {
        matches!(self.kind, SchedulerKind::EulerAncestral)
    }

    /// The UNet input for step `i` (Euler: x / √(σ²+1); others: unchanged).
    pub fn scale_model_input(&self, sample: Tensor<4>, i: usize) -> Tensor<4> {
        match self.kind {
            SchedulerKind::EulerAncestral => {
                let sigma = self.sigmas[i];
                sample / ((sigma * sigma + 1.0).sqrt() as f32)
            }
            _ => sample,
        }
    }

    /// One denoising update from step `i` to `i+1`. `noise` (same shape as `sample`) is required by ancestral
    /// samplers and ignored otherwise.
    pub fn step(&mut self, model_output: Tensor<4>, i: usize, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        match self.kind {
            SchedulerKind::Ddim => self.ddim_step(model_output, i, sample),
            SchedulerKind::EulerAncestral => self.euler_a_step(model_output, i, sample, noise),
            SchedulerKind::DpmSolverPP2M { .. } => self.dpm_step(model_output, i, sample),
        }
    }

    /// DDIM (Song et al., 2021) with η = 0.
    fn ddim_step(&self, eps: Tensor<4>, i: usize, x: Tensor<4>) -> Tensor<4> {
        let t = self.timesteps[i] as i64;
        let prev_t = t - self.step_ratio as i64;
        let a_t = self.alphas_cumprod[t as usize];
        let a_prev = if prev_t >= 0 { self.alphas_cumprod[prev_t as usize] } else { self.final_alpha_cumprod };
        let b_t = 1.0 - a_t;
        let (mut x0, eps) = match self.prediction {
            Prediction::Epsilon => ((x - eps.clone() * b_t.sqrt() as f32) / a_t.sqrt() as f32, eps),
            Prediction::V => (
                x.clone() * a_t.sqrt() as f32 - eps.clone() * b_t.sqrt() as f32,
                eps * a_t.sqrt() as f32 + x * b_t.sqrt() as f32,
            ),
        };
        if let Some(r) = self.clip_sample {
            x0 = x0.clamp(-r as f32, r as f32);
        }
        x0 * a_prev.sqrt() as f32 + eps * (1.0 - a_prev).sqrt() as f32
    }

    /// Euler ancestral (Karras et al., 2022, with the ancestral noise of k-diffusion).
    fn euler_a_step(&self, out: Tensor<4>, i: usize, x: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        let sigma = self.sigmas[i];
        let x0 = match self.prediction {
            Prediction::Epsilon => x.clone() - out * sigma as f32,
            Prediction::V => {
                out * (-sigma / (sigma * sigma + 1.0).sqrt()) as f32 + x.clone() / (sigma * sigma + 1.0) as f32
            }
        };
        let (s_from, s_to) = (sigma, self.sigmas[i + 1]);
        let sigma_up = (s_to * s_to * (s_from * s_from - s_to * s_to) / (s_from * s_from)).sqrt();
        let sigma_down = (s_to * s_to - sigma_up * sigma_up).sqrt();
        let derivative = (x.clone() - x0) / sigma as f32;
        let prev = x + derivative * (sigma_down - sigma) as f32;
        match noise {
            Some(n) if sigma_up > 0.0 => prev + n * sigma_up as f32,
            _ => prev,
        }
    }

    fn alpha_sigma(sigma: f64) -> (f64, f64) {
        let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
        (alpha, sigma * alpha)
    }

    /// DPM-Solver++(2M) (Lu et al., 2022), midpoint form, first order at the first and last steps
    /// (`lower_order_final`, `final_sigmas_type = "zero"`).
    fn dpm_step(&mut self, out: Tensor<4>, i: usize, x: Tensor<4>) -> Tensor<4> {
        let n = self.timesteps.len();
        let (alpha_s0, sigma_s0) = Self::alpha_sigma(self.sigmas[i]);
        let x0 = match self.prediction {
            Prediction::Epsilon => (x.clone() - out * sigma_s0 as f32) / alpha_s0 as f32,
            Prediction::V => x.clone() * alpha_s0 as f32 - out * sigma_s0 as f32,
        };
        self.model_outputs.push(x0.clone());
        if self.model_outputs.len() > 2 {
            self.model_outputs.remove(0);
        }
        let lower_order_final = i == n - 1; // final σ is zero
        let lower_order_second = i + 2 == n && n < 15;
        let (alpha_t, sigma_t) = Self::alpha_sigma(self.sigmas[i + 1]);
        let result = if self.sigmas[i + 1] == 0.0 {
            // λ_t = ∞: the first-order update reduces to the data prediction.
            x0
        } else {
            let lambda = |a: f64, s: f64| a.ln() - s.ln();
            let lambda_t = lambda(alpha_t, sigma_t);
            let lambda_s0 = lambda(alpha_s0, sigma_s0);
            let h = lambda_t - lambda_s0;
            let c_x = sigma_t / sigma_s0;
            let c_d = alpha_t * ((-h).exp() - 1.0);
            if self.lower_order_nums < 1 || lower_order_final {
                x * c_x as f32 - x0 * c_d as f32
            } else {
                let _ = lower_order_second; // order 2 is the maximum here, so the "second to last" rule changes nothing
                let (alpha_s1, sigma_s1) = Self::alpha_sigma(self.sigmas[i - 1]);
                let lambda_s1 = lambda(alpha_s1, sigma_s1);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let m0 = x0;
                let m1 = self.model_outputs[0].clone();
                let d1 = (m0.clone() - m1) / r0 as f32;
                x * c_x as f32 - m0 * c_d as f32 - d1 * (0.5 * c_d) as f32
            }
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        result
    }
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
    fn zero_steps_is_an_error() {
        assert!(Scheduler::new(SchedulerKind::Ddim, &SchedulerConfig::default(), 0).is_err());
    }

    #[test]
    fn unknown_scheduler_name_is_an_error() {
        assert!("plms".parse::<SchedulerKind>().is_err());
    }
}
