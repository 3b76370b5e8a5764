//! `unsee audit`: how much of each erased concept leaks through, and how far preserved prompts drift, measured on
//! held-out templates the edit never saw.
//!
//! - Key leakage, per erased concept c with replacement r, over every cross-attention projection W and every
//!   position the method uses: ‖W′k′_c − W₀k_r‖ / ‖W₀k_c − W₀k_r‖ (0 = fully turned into the replacement,
//!   1 = untouched). k′ is the key from the (possibly edited) text encoder.
//! - End-to-end leakage: ‖ε′(x_t, t, c) − ε₀(x_t, t, r)‖ / ‖ε₀(x_t, t, c) − ε₀(x_t, t, r)‖ over fixed latents and
//!   timesteps.
//! - Leakage under the embedding attack ([`super::attack`]): the same end-to-end leakage with the concept prompt's
//!   conditioning replaced by RECE's closed-form adversarial embedding c′ for the edited model,
//!   ‖ε′(x_t, t, c′) − ε₀(x_t, t, r)‖ / ‖ε₀(x_t, t, c) − ε₀(x_t, t, r)‖; absent when the edit is not in the UNet.
//! - Drift, per preserved prompt p: ‖W′k′_p − W₀k_p‖ / ‖W₀k_p‖ and ‖ε′(p) − ε₀(p)‖ / ‖ε₀(p)‖.

use burn::tensor::{Tensor, TensorData};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

use super::keys::{Keys, align};
use super::linalg;
use super::matrices::{Component, cross_attention_names, read_matrix};
use super::spec::{Spec, TokenMode, held_out_templates};
use crate::error::Result;
use crate::load::StableDiffusion;

#[derive(Debug, Clone, serde::Serialize)]
pub struct Stat {
    pub mean: f64,
    pub worst: f64,
}

impl Stat {
    fn of(v: &[f64], worst_is_max: bool) -> Self {
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        let worst = if worst_is_max { v.iter().cloned().fold(f64::MIN, f64::max) } else { v.iter().cloned().fold(f64::MAX, f64::min) };
        Stat { mean, worst }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ConceptReport {
    pub concept: String,
    pub replacement: String,
    pub key_leakage: Stat,
    pub noise_leakage: Stat,
    /// End-to-end leakage under the embedding attack (`None` for text-encoder edits, which it does not apply to).
    pub attack_noise_leakage: Option<Stat>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DriftReport {
    pub prompt: String,
    pub key_drift: Stat,
    pub noise_drift: Stat,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct AuditReport {
    pub held_out_templates: Vec<String>,
    pub timesteps: Vec<f64>,
    pub concepts: Vec<ConceptReport>,
    pub preserved: Vec<DriftReport>,
    pub overall_key_leakage: Stat,
    pub overall_noise_leakage: Stat,
    pub overall_attack_noise_leakage: Option<Stat>,
    pub overall_key_drift: Option<Stat>,
    pub overall_noise_drift: Option<Stat>,
}

/// Host snapshot of what the audit compares: projections, keys (per prompt, at the used positions) and noise
/// predictions.
struct Snapshot {
    weights: Vec<linalg::M>,
    keys: Vec<linalg::M>,
    noise: Vec<Vec<f32>>,
}

const TIMESTEPS: [f64; 3] = [800.0, 500.0, 200.0];

fn snapshot(sd: &StableDiffusion, names: &[String], prompts: &[(String, Vec<usize>)]) -> Result<Snapshot> {
    let weights = names.iter().map(|n| read_matrix(sd, Component::Unet, n)).collect::<Result<_>>()?;
    let mut keys_out = vec![];
    let mut keys = Keys::new(sd);
    for (p, positions) in prompts {
        let (h, _) = keys.hidden(p, None)?;
        keys_out.push(linalg::M::from_fn(h.nrows(), positions.len(), |i, j| h[(i, positions[j])]));
    }
    drop(keys);
    // Noise predictions on fixed latents, conditioned on each prompt.
    let mut noise = vec![];
    for (p, _) in prompts {
        let (ctx, _) = sd.encode_prompt(p)?;
        noise.push(noise_prediction(sd, ctx)?);
    }
    Ok(Snapshot { weights, keys: keys_out, noise })
}

/// The UNet's noise predictions for `ctx` on the audit's fixed latents, at every audit timestep.
fn noise_prediction(sd: &StableDiffusion, ctx: Tensor<3>) -> Result<Vec<f32>> {
    let lat = sd.unet_config.sample_size.unwrap_or(8).min(16);
    let c = sd.unet_config.in_channels;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1234);
    let x: Vec<f32> = (0..c * lat * lat).map(|_| StandardNormal.sample(&mut rng)).collect();
    let x = Tensor::<4>::from_data(TensorData::new(x, [1, c, lat, lat]), sd.dev()).cast(sd.device.precision.dtype());
    let ctx = ctx.cast(sd.device.precision.dtype());
    let mut all = vec![];
    for &t in &TIMESTEPS {
        all.extend(crate::tensor::to_f32_vec(sd.unet.forward(x.clone(), t, &ctx))?);
    }
    Ok(all)
}

fn l2(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// Audits the edit that `apply` performs on `sd` (which must hold the base weights when called).
pub fn audit(sd: &mut StableDiffusion, spec: &Spec, apply: impl FnOnce(&mut StableDiffusion) -> Result<()>)
    -> Result<AuditReport> {
    let names = cross_attention_names(&sd.unet, &["to_k".to_string(), "to_v".to_string()]);
    let templates = held_out_templates(&spec.templates_name);
    // Prompts and the positions compared: the last subject token for `last`; the aligned tail otherwise.
    let mut prompts: Vec<(String, Vec<usize>)> = vec![];
    let mut pairs = vec![]; // (concept prompt index, replacement prompt index)
    for item in &spec.erase {
        for t in &templates {
            let c = Spec::fill(t, &item.concept);
            let r = Spec::fill(t, &item.replace_with).trim().to_string();
            let (tc, tr) = (sd.tokenizer.encode(&c)?, sd.tokenizer.encode(&r)?);
            let map: Vec<(usize, usize)> = match spec.token_mode {
                TokenMode::Last => vec![(tc.eos_position - 1, tr.eos_position - 1)],
                TokenMode::Tail => {
                    let n = (77 - tc.eos_position + 1).min(77 - tr.eos_position + 1);
                    (0..n).map(|i| (tc.eos_position - 1 + i, tr.eos_position - 1 + i)).collect()
                }
                TokenMode::All => align(&tc, &tr),
            };
            prompts.push((c, map.iter().map(|m| m.0).collect()));
            prompts.push((r, map.iter().map(|m| m.1).collect()));
            pairs.push((prompts.len() - 2, prompts.len() - 1));
        }
    }
    let n_pairs = prompts.len();
    for p in &spec.preserve {
        for t in &templates {
            let q = Spec::fill(t, p);
            let tq = sd.tokenizer.encode(&q)?;
            prompts.push((q, vec![tq.eos_position - 1]));
        }
    }

    let before = snapshot(sd, &names, &prompts)?;
    let base = sd.clone(); // shares the tensors until the edit replaces some
    apply(sd)?;
    let after = snapshot(sd, &names, &prompts)?;
    // Only UNet edits can be attacked this way (`None` otherwise).
    let attack = super::attack::EmbeddingAttack::new(&base, sd, super::attack::EMBEDDING_ATTACK_LAMBDA)?;
    drop(base);
    let attacked = attack.is_some();

    let per_template = templates.len();
    let mut concepts = vec![];
    for (ci, item) in spec.erase.iter().enumerate() {
        let (mut kl, mut nl, mut al) = (vec![], vec![], vec![]);
        for &(c, r) in &pairs[ci * per_template..(ci + 1) * per_template] {
            for (w0, w1) in before.weights.iter().zip(&after.weights) {
                let (kc0, kc1, kr) = (&before.keys[c], &after.keys[c], &before.keys[r]);
                let (o_c0, o_c1, o_r) = (w0 * kc0, w1 * kc1, w0 * kr);
                for j in 0..kc0.ncols() {
                    let den = l2((0..o_c0.nrows()).map(|i| o_c0[(i, j)] - o_r[(i, j)]));
                    if den > 1e-9 {
                        kl.push(l2((0..o_c1.nrows()).map(|i| o_c1[(i, j)] - o_r[(i, j)])) / den);
                    }
                }
            }
            let (e0c, e1c, e0r) = (&before.noise[c], &after.noise[c], &before.noise[r]);
            let den = l2(e0c.iter().zip(e0r).map(|(a, b)| (a - b) as f64));
            if den > 1e-9 {
                nl.push(l2(e1c.iter().zip(e0r).map(|(a, b)| (a - b) as f64)) / den);
                if let Some(attack) = &attack {
                    let e1a = noise_prediction(sd, attack.context(sd, &prompts[c].0)?)?;
                    al.push(l2(e1a.iter().zip(e0r).map(|(a, b)| (a - b) as f64)) / den);
                }
            }
        }
        concepts.push(ConceptReport {
            concept: item.concept.clone(),
            replacement: item.replace_with.clone(),
            key_leakage: Stat::of(&kl, true),
            noise_leakage: Stat::of(&nl, true),
            attack_noise_leakage: attacked.then(|| Stat::of(&al, true)),
        });
    }
    let mut preserved = vec![];
    for (pi, p) in spec.preserve.iter().enumerate() {
        let (mut kd, mut nd) = (vec![], vec![]);
        for q in n_pairs + pi * per_template..n_pairs + (pi + 1) * per_template {
            for (w0, w1) in before.weights.iter().zip(&after.weights) {
                let (o0, o1) = (w0 * &before.keys[q], w1 * &after.keys[q]);
                let den = linalg::frob(&o0);
                if den > 1e-12 {
                    kd.push(linalg::frob(&(&o1 - &o0)) / den);
                }
            }
            let (e0, e1) = (&before.noise[q], &after.noise[q]);
            nd.push(l2(e1.iter().zip(e0).map(|(a, b)| (a - b) as f64)) / l2(e0.iter().map(|&a| a as f64)).max(1e-12));
        }
        preserved.push(DriftReport { prompt: p.clone(), key_drift: Stat::of(&kd, true), noise_drift: Stat::of(&nd, true) });
    }
    let all = |f: &dyn Fn(&ConceptReport) -> &Stat| {
        let v: Vec<&Stat> = concepts.iter().map(f).collect();
        Stat { mean: v.iter().map(|s| s.mean).sum::<f64>() / v.len() as f64, worst: v.iter().map(|s| s.worst).fold(f64::MIN, f64::max) }
    };
    let all_drift = |f: &dyn Fn(&DriftReport) -> &Stat| {
        (!preserved.is_empty()).then(|| {
            let v: Vec<&Stat> = preserved.iter().map(f).collect();
            Stat { mean: v.iter().map(|s| s.mean).sum::<f64>() / v.len() as f64, worst: v.iter().map(|s| s.worst).fold(f64::MIN, f64::max) }
        })
    };
    Ok(AuditReport {
        held_out_templates: templates,
        timesteps: TIMESTEPS.to_vec(),
        overall_key_leakage: all(&|c| &c.key_leakage),
        overall_noise_leakage: all(&|c| &c.noise_leakage),
        overall_attack_noise_leakage: attacked.then(|| {
            all(&|c| c.attack_noise_leakage.as_ref().expect("set for every concept when attacked"))
        }),
        overall_key_drift: all_drift(&|d| &d.key_drift),
        overall_noise_drift: all_drift(&|d| &d.noise_drift),
        concepts,
        preserved,
    })
}

impl AuditReport {
    /// A plain-text table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!("held-out templates: {:?}\n\n", self.held_out_templates));
        let attack = |a: &Option<Stat>| match a {
            Some(a) => format!("{:>8.3} / {:<8.3}", a.mean, a.worst),
            None => format!("{:>8} / {:<8}", "n/a", "n/a"),
        };
        s.push_str("erased concept → replacement        key leakage (mean / worst)   noise leakage (mean / worst)   \
                    under embedding attack\n");
        for c in &self.concepts {
            let label = format!("{} → {:?}", c.concept, c.replacement);
            s.push_str(&format!("{label:<36} {:>8.3} / {:<8.3}            {:>8.3} / {:<8.3}           {}\n",
                                c.key_leakage.mean, c.key_leakage.worst, c.noise_leakage.mean, c.noise_leakage.worst,
                                attack(&c.attack_noise_leakage)));
        }
        s.push_str(&format!("{:<36} {:>8.3} / {:<8.3}            {:>8.3} / {:<8.3}           {}\n", "overall",
                            self.overall_key_leakage.mean, self.overall_key_leakage.worst,
                            self.overall_noise_leakage.mean, self.overall_noise_leakage.worst,
                            attack(&self.overall_attack_noise_leakage)));
        if !self.preserved.is_empty() {
            s.push_str("\npreserved prompt                     key drift (mean / worst)     noise drift (mean / worst)\n");
            for d in &self.preserved {
                s.push_str(&format!("{:<36} {:>8.3} / {:<8.3}            {:>8.3} / {:<8.3}\n", d.prompt,
                                    d.key_drift.mean, d.key_drift.worst, d.noise_drift.mean, d.noise_drift.worst));
            }
        }
        s.push_str("\nleakage: 0 = turned into the replacement, 1 = untouched; drift: relative change.\n");
        s
    }
}
