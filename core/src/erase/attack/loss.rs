//! What the gradient attacks minimise: the attacked model's denoising loss on latents of images that show the
//! concept,
//!
//!   L(c) = ‖ε_θ(x_t, t, c) − ε‖²,  x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε,  ε ~ N(0, I),
//!
//! (the v-prediction target √ᾱ_t ε − √(1 − ᾱ_t) x₀ for v-prediction models), with x₀ the latents of a target image
//! made by the *base* model. The conditioning c is the text encoder's output on token embeddings that contain the
//! attacker's variables; gradients reach them through burn's reverse-mode autodiff (`Tensor::autodiff`): the
//! model's weights stay plain tensors (constants of the graph, no copy), only the attacker's variables are leaves.

use burn::tensor::{DType, Tensor, TensorData};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{Error, Result};
use crate::load::StableDiffusion;
use crate::scheduler::PredictionType;

/// A leaf of the autodiff graph holding `t`'s values: the attacker's variable.
pub fn leaf<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    t.detach().autodiff().require_grad()
}

/// The gradient of `loss` with respect to `leaf` (a fresh graph per call: burn cannot retain one).
pub fn gradient<const D: usize>(loss: &Tensor<1>, leaf: &Tensor<D>) -> Result<Tensor<D>> {
    if !loss.is_tracked() {
        return Err(Error::Internal("the attack's loss does not depend on its variable".into()));
    }
    let grads = loss.backward();
    leaf.grad(&grads).ok_or_else(|| Error::Internal("the attack's variable received no gradient".into()))
}

/// `x` read back as one f32.
pub fn scalar(x: Tensor<1>) -> Result<f32> {
    let v = crate::tensor::to_f32_vec(x)?;
    match v.as_slice() {
        [x] if x.is_finite() => Ok(*x),
        [_] => Err(Error::NonFiniteOutput("attack loss".into())),
        _ => Err(Error::Internal("a loss must be a scalar".into())),
    }
}

/// The denoising objective of one attacked model.
pub struct DenoisingLoss<'a> {
    pub sd: &'a StableDiffusion,
    alphas_cumprod: Vec<f64>,
}

/// One noised sample: the model input and what the model should predict.
pub struct Noised {
    pub x_t: Tensor<4>,
    pub target: Tensor<4>,
    pub t: usize,
}

impl<'a> DenoisingLoss<'a> {
    pub fn new(sd: &'a StableDiffusion) -> Result<Self> {
        Ok(Self { sd, alphas_cumprod: sd.scheduler_config.alphas_cumprod()? })
    }

    /// Training timesteps `0..num_train_timesteps`.
    pub fn train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// `x0` (`[b, c, h, w]`) noised to training timestep `t` with noise drawn from `rng`.
    pub fn noise(&self, x0: &Tensor<4>, t: usize, rng: &mut ChaCha8Rng) -> Result<Noised> {
        let a = *self.alphas_cumprod.get(t).ok_or_else(|| {
            Error::InvalidRequest(format!("timestep {t} is beyond the model's {} training steps", self.alphas_cumprod.len()))
        })?;
        let shape = x0.dims();
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
        let eps = Tensor::<4>::from_data(TensorData::new(v, shape), &x0.device()).cast(x0.dtype());
        let x_t = x0.clone() * a.sqrt() + eps.clone() * (1.0 - a).sqrt();
        let target = match self.sd.scheduler_config.prediction_type {
            PredictionType::Epsilon => eps,
            PredictionType::VPrediction => eps * a.sqrt() - x0.clone() * (1.0 - a).sqrt(),
        };
        Ok(Noised { x_t, target, t })
    }

    /// A uniformly drawn training timestep.
    pub fn random_timestep(&self, rng: &mut ChaCha8Rng) -> usize {
        rng.random_range(0..self.alphas_cumprod.len())
    }

    /// Mean squared error of the attacked model's prediction on `n` under the conditioning `context`
    /// (`[b, 77, hidden]`, differentiable), in f32.
    pub fn loss(&self, n: &Noised, context: &Tensor<3>) -> Tensor<1> {
        let pred = self.sd.unet.forward(n.x_t.clone(), n.t as f64, context);
        let d = (pred - n.target.clone()).cast(DType::F32);
        (d.clone() * d).mean()
    }

    /// The conditioning for token embeddings `inputs_embeds` (`[b, s, hidden]`).
    pub fn context(&self, inputs_embeds: Tensor<3>) -> Tensor<3> {
        self.sd.text_encoder.forward_embeds(inputs_embeds)
    }
}

/// Token embeddings `[1, len, hidden]` of `ids` (constants).
pub fn embed_ids(sd: &StableDiffusion, ids: &[u32]) -> Tensor<3> {
    let ids = crate::tensor::token_ids(ids, sd.dev());
    sd.text_encoder.token_embed(ids)
}
