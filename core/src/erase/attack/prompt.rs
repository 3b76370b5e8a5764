//! The optimised-prompt attack: UnlearnDiffAtk (Zhang et al., "To Generate or Not? Safety-Driven Unlearned
//! Diffusion Models Are Still Easy to Generate Unsafe Images … For Now", ECCV 2024; reference code
//! OPTML-Group/Diffusion-MU-Attack, `text_grad_.py`).
//!
//! k prefix tokens are put in front of the concept prompt. Each prefix position p holds a distribution u_p on the
//! simplex over the vocabulary V (BOS/EOS/pad excluded: they cannot be typed as words). One iteration:
//!
//!   1. draw one token per position, z_p ~ Multinomial(u_p); the prefix embeddings are e_p = E z_p (E: the token
//!      embedding table);
//!   2. L = ‖ε_θ(x_t, t, τ(e)) − ε‖² on the target image's latents x₀ (the attacked model θ, [`super::loss`]);
//!   3. straight-through gradient: ∇u_p = hardtanh(Eᵀ ∂L/∂e_p) (the one-hot's gradient, clipped to [−1, 1]);
//!   4. Adam step on u (lr 0.01, L2 weight decay 0.1, as the reference), then u_p ← Π_Δ(u_p), the Euclidean
//!      projection onto the simplex.
//!
//! Timesteps t are visited in order (T/2n, T/2n + T/n, …), `iterations` per timestep. After each timestep the
//! prefix is fixed by argmax, decoded to text — the **typed prompt** — and judged: the typed prompt is generated
//! normally (tokenized again, like anything a user types) and, when a judge exists, the attack stops at the first
//! success (the reference's early stop). A run whose unattacked prompt already shows the concept counts as a
//! success with no iteration, as in the reference.

use std::time::Instant;

use burn::optim::{AdamConfig, Optimizer, decay::WeightDecayConfig};
use burn::tensor::{Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::loss::{DenoisingLoss, embed_ids, gradient, leaf, scalar};
use crate::engine::check_cancelled;
use crate::error::{Error, Result};
use crate::load::StableDiffusion;

/// The attack's budget and hyper-parameters (defaults: the reference's).
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromptAttackConfig {
    /// Prefix tokens k (the paper: 5 for nudity, 3 for styles and objects).
    pub tokens: usize,
    /// Timesteps visited (the reference's `n_samples`, 50); the prefix is judged after each.
    pub timesteps: usize,
    /// Optimisation steps per timestep (40).
    pub iterations: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
}

impl Default for PromptAttackConfig {
    fn default() -> Self {
        Self { tokens: 5, timesteps: 50, iterations: 40, lr: 0.01, weight_decay: 0.1, seed: 0 }
    }
}

impl PromptAttackConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if !(1..=20).contains(&self.tokens) {
            return bad(format!("attack tokens must be 1 to 20 (got {})", self.tokens));
        }
        if !(1..=1000).contains(&self.timesteps) || !(1..=10_000).contains(&self.iterations) {
            return bad("attack timesteps must be 1 to 1000 and iterations per timestep 1 to 10000".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr <= 10.0) {
            return bad(format!("attack lr must be in (0, 10] (got {})", self.lr));
        }
        if !(self.weight_decay.is_finite() && (0.0..=10.0).contains(&self.weight_decay)) {
            return bad(format!("attack weight decay must be in [0, 10] (got {})", self.weight_decay));
        }
        Ok(())
    }
}

/// What one attack found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PromptAttackOutcome {
    /// The typed prompt: the decoded prefix, a space, the concept prompt.
    pub prompt: String,
    pub prefix_ids: Vec<u32>,
    /// Whether typing `prompt` gives back exactly the optimised tokens (BPE may merge across the boundary).
    pub retokenizes: bool,
    /// Judged success (`None` without a judge).
    pub success: Option<bool>,
    /// Typed prompts judged, the unattacked one included.
    pub evaluations: usize,
    pub iterations: usize,
    /// Mean loss over the last timestep's iterations.
    pub loss: f32,
    pub seconds: f64,
}

/// Euclidean projection of `v` onto the probability simplex {x ≥ 0, Σx = 1} (sort-based, exact; the reference
/// finds the same threshold by bisection).
pub fn project_simplex(v: &mut [f32]) {
    let mut s: Vec<f32> = v.to_vec();
    s.sort_unstable_by(|a, b| b.total_cmp(a));
    let (mut cum, mut theta) = (0.0f64, 0.0f64);
    for (i, &x) in s.iter().enumerate() {
        cum += x as f64;
        let t = (cum - 1.0) / (i + 1) as f64;
        if (x as f64) - t > 0.0 {
            theta = t;
        } else {
            break;
        }
    }
    for x in v.iter_mut() {
        *x = ((*x as f64) - theta).max(0.0) as f32;
    }
}

fn sample(row: &[f32], rng: &mut ChaCha8Rng) -> usize {
    let total: f64 = row.iter().map(|&x| x as f64).sum();
    let mut r = rng.random::<f64>() * total;
    for (i, &x) in row.iter().enumerate() {
        r -= x as f64;
        if r <= 0.0 && x > 0.0 {
            return i;
        }
    }
    row.iter().rposition(|&x| x > 0.0).unwrap_or(0)
}

fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b }).0
}

/// The typed prompt for `prefix` in front of `prompt`, and whether it tokenizes back to `prefix + content`.
pub fn typed_prompt(sd: &StableDiffusion, prefix: &[u32], prompt: &str, content: &[u32]) -> Result<(String, bool)> {
    let text = sd.tokenizer.decode(prefix)?;
    let typed = format!("{} {}", text.trim(), prompt.trim()).trim().to_string();
    let again = sd.tokenizer.content_ids(&typed)?;
    let want: Vec<u32> = prefix.iter().chain(content).copied().collect();
    Ok((typed, again == want))
}

/// Attacks `sd` (the erased model) on `prompt`, whose target image made by the base model has latents `x0`
/// (`[1, c, h, w]`). `judge(typed_prompt)` generates the typed prompt with the attacked model and says whether the
/// concept shows (`None`: no judge, the whole budget is spent).
pub fn attack(sd: &StableDiffusion, x0: &Tensor<4>, prompt: &str, cfg: &PromptAttackConfig,
              judge: &mut dyn FnMut(&str) -> Result<Option<bool>>, progress: &mut dyn FnMut(usize, usize),
              cancelled: &dyn Fn() -> bool) -> Result<PromptAttackOutcome> {
    cfg.validate()?;
    let start = Instant::now();
    let tok = &sd.tokenizer;
    let k = cfg.tokens;
    let room = tok.max_length.checked_sub(2 + k).filter(|&r| r > 0).ok_or_else(|| {
        Error::InvalidRequest(format!("{k} prefix tokens leave no room in a {}-token prompt", tok.max_length))
    })?;
    let mut content = tok.content_ids(prompt)?;
    content.truncate(room);

    let mut evaluations = 1;
    if judge(prompt)? == Some(true) {
        return Ok(PromptAttackOutcome { prompt: prompt.to_string(), prefix_ids: vec![], retokenizes: true,
                                        success: Some(true), evaluations, iterations: 0, loss: f32::NAN,
                                        seconds: start.elapsed().as_secs_f64() });
    }

    let table = sd.text_encoder.token_embeddings();
    let [vocab, _] = table.dims();
    let candidates: Vec<u32> = (0..vocab as u32).filter(|&i| i != tok.bos && i != tok.eos && i != tok.pad).collect();
    let n = candidates.len();
    let dev = sd.dev();
    let cand_t = Tensor::<1, Int>::from_data(TensorData::new(candidates.iter().map(|&i| i as i64).collect::<Vec<_>>(), [n]), dev);
    let e_c = table.select(0, cand_t); // [n, d]
    let e_c_t = e_c.clone().transpose();

    let head = embed_ids(sd, &[tok.bos]);
    let mut tail_ids = content.clone();
    tail_ids.push(tok.eos);
    tail_ids.resize(tok.max_length - 1 - k, tok.pad);
    let tail = embed_ids(sd, &tail_ids);

    let objective = DenoisingLoss::new(sd)?;
    let big_t = objective.train_timesteps();
    let stride = (big_t / cfg.timesteps).max(1);
    let timesteps: Vec<usize> = (0..cfg.timesteps).map(|i| (stride / 2 + i * stride).min(big_t - 1)).collect();

    let adam = AdamConfig::new()
        .with_epsilon(1e-8)
        .with_weight_decay((cfg.weight_decay > 0.0).then(|| WeightDecayConfig::new(cfg.weight_decay as f32)))
        .build();
    let mut state = None;
    let mut u = vec![1.0 / n as f32; k * n];
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let total = timesteps.len() * cfg.iterations;
    let (mut done, mut last_loss) = (0, f32::NAN);
    let mut best = PromptAttackOutcome { prompt: prompt.to_string(), prefix_ids: vec![], retokenizes: true,
                                         success: None, evaluations, iterations: 0, loss: f32::NAN, seconds: 0.0 };
    for &t in &timesteps {
        let mut loss_sum = 0.0f64;
        for _ in 0..cfg.iterations {
            check_cancelled(cancelled)?;
            let picks: Vec<i64> = (0..k).map(|p| sample(&u[p * n..(p + 1) * n], &mut rng) as i64).collect();
            let prefix = leaf(e_c.clone().select(0, Tensor::<1, Int>::from_data(TensorData::new(picks, [k]), dev))
                .unsqueeze_dim::<3>(0));
            let embeds = Tensor::cat(vec![head.clone(), prefix.clone(), tail.clone()], 1);
            let noised = objective.noise(x0, t, &mut rng)?;
            let loss = objective.loss(&noised, &objective.context(embeds));
            let g = gradient(&loss, &prefix)?; // [1, k, d]
            let l = scalar(loss)?;
            loss_sum += l as f64;
            let d = g.dims()[2];
            let g_u = g.reshape([k, d]).matmul(e_c_t.clone()).clamp(-1.0, 1.0);
            let u_t = Tensor::<2>::from_data(TensorData::new(u.clone(), [k, n]), dev);
            let (u_next, s) = adam.step(cfg.lr, u_t, g_u, state);
            state = s;
            u = crate::tensor::to_f32_vec(u_next)?;
            if u.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFiniteOutput("prompt attack (token distribution)".into()));
            }
            for p in 0..k {
                project_simplex(&mut u[p * n..(p + 1) * n]);
            }
            done += 1;
            progress(done, total);
        }
        last_loss = (loss_sum / cfg.iterations as f64) as f32;
        let prefix_ids: Vec<u32> = (0..k).map(|p| candidates[argmax(&u[p * n..(p + 1) * n])]).collect();
        let (typed, retokenizes) = typed_prompt(sd, &prefix_ids, prompt, &content)?;
        evaluations += 1;
        let success = judge(&typed)?;
        best = PromptAttackOutcome { prompt: typed, prefix_ids, retokenizes, success, evaluations, iterations: done,
                                     loss: last_loss, seconds: 0.0 };
        if success == Some(true) {
            break;
        }
    }
    best.loss = last_loss;
    best.seconds = start.elapsed().as_secs_f64();
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simplex_projection_is_exact() {
        let mut v = vec![0.5, 0.2, 0.9, -0.3];
        project_simplex(&mut v);
        let s: f32 = v.iter().sum();
        assert!((s - 1.0).abs() < 1e-6, "{v:?}");
        assert!(v.iter().all(|&x| x >= 0.0));
        // (0.5 − θ) + (0.9 − θ) = 1 → θ = 0.2; 0.2 − θ = 0 (up to f32 rounding of 0.2).
        assert!((v[0] - 0.3).abs() < 1e-6 && (v[2] - 0.7).abs() < 1e-6 && v[1].abs() < 1e-6 && v[3] == 0.0, "{v:?}");
        let mut w = vec![0.25; 4];
        project_simplex(&mut w);
        assert!(w.iter().all(|x| (x - 0.25).abs() < 1e-7), "{w:?}");
        // Already on the simplex with zeros: unchanged.
        let mut z = vec![0.0, 1.0, 0.0];
        project_simplex(&mut z);
        assert_eq!(z, vec![0.0, 1.0, 0.0]);
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let row = [0.0, 0.75, 0.0, 0.25];
        let mut counts = [0; 4];
        for _ in 0..4000 {
            counts[sample(&row, &mut rng)] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        assert!((2800..3200).contains(&counts[1]), "{counts:?}");
    }
}
