//! The parity checks shared by the CPU and wgpu tests.

use burn::tensor::{Device, Tensor};
use unsee::device::{DeviceChoice, select};
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
use unsee::scheduler::SchedulerKind;
use unsee::weights::Precision;

use super::*;

pub fn load(model: &str, device: DeviceChoice) -> StableDiffusion {
    let dev = select(device, Precision::F32).expect("device");
    StableDiffusion::load(&model_dir(model), dev, &LoadOptions::default()).expect("load")
}

/// Text encoder: last hidden state of each golden prompt; on failure, the first diverging layer.
pub fn check_text_encoder(sd: &StableDiffusion, g: &Golden, tol: f32) {
    let dev = sd.dev().clone();
    for i in 0..4 {
        let ids = g.ids(&format!("text.{i}.input_ids"), &dev);
        let mut trace = vec![];
        let hidden = sd.text_encoder.forward_traced(ids, &mut |k, t| trace.push((k, host(t.clone()))));
        let want = g.f32(&format!("text.{i}.hidden")).1;
        let result = compare(&format!("text.{i}.hidden"), &host(hidden), want, tol);
        if let Ok(err) = &result {
            eprintln!("text encoder prompt {i}: ok, max |Δ| = {err:.3e}");
        }
        if let Err(msg) = result {
            let first = trace.iter().find_map(|(k, got)| {
                compare(&format!("text encoder hidden_states[{k}]"), got, g.f32(&format!("text.{i}.trace.{k}")).1, tol)
                    .err()
            });
            panic!("{msg}\ndivergence starts at: {}", first.unwrap_or_else(|| "the final layer norm".into()));
        }
    }
}

pub fn check_unet(sd: &StableDiffusion, g: &Golden, tol: f32) {
    let dev = sd.dev().clone();
    let sample: Tensor<4> = g.tensor("unet.sample", &dev);
    let ctx: Tensor<3> = g.tensor("unet.encoder_hidden_states", &dev);
    for t in [999, 500, 1] {
        let got = host(sd.unet.forward(sample.clone(), t as f64, &ctx));
        let result = compare(&format!("unet noise_pred at t={t}"), &got, g.f32(&format!("unet.t{t}.noise_pred")).1, tol);
        if let Err(msg) = result {
            let mut trace = vec![];
            sd.unet.forward_traced(sample.clone(), 500.0, &ctx, &mut |name, x| trace.push((name.to_string(), host(x.clone()))));
            let first = trace.iter().find_map(|(name, got)| {
                compare(&format!("unet.{name} (t=500)"), got, g.f32(&format!("unet.trace.{name}")).1, tol).err()
            });
            panic!("{msg}\ndivergence starts at: {}", first.unwrap_or_else(|| "none of the traced blocks at t=500".into()));
        }
        eprintln!("unet noise_pred at t={t}: ok, max |Δ| = {:.3e}", result.unwrap());
    }
}

pub fn check_vae(sd: &StableDiffusion, g: &Golden, tol: f32) {
    let dev = sd.dev().clone();
    let decoded = sd.vae.decode(g.tensor("vae.latents", &dev));
    assert_close("vae decode", &host(decoded), g.f32("vae.decoded").1, tol);
    let (mean, logvar) = sd.vae.encode(g.tensor("vae.image", &dev)).expect("a VAE with its encoder");
    assert_close("vae encode mean", &host(mean), g.f32("vae.encoded_mean").1, tol);
    assert_close("vae encode logvar", &host(logvar), g.f32("vae.encoded_logvar").1, tol);
}

/// A complete 10-step run from the golden initial latents, through the public `generate`.
pub fn check_run(sd: &StableDiffusion, g: &Golden, name: &str, kind: SchedulerKind, tol: f32) {
    check_run_with(sd, g, g, name, kind, 10, 7.5, tol);
}

/// A complete run of `steps` steps at `guidance` from `init`'s `run.init_latents`, compared with `g`'s
/// `run.<name>.latents` (sampler noise from `run.<name>.noise`, timesteps `run.<name>.timesteps`).
#[allow(clippy::too_many_arguments)]
pub fn check_run_with(sd: &StableDiffusion, init: &Golden, g: &Golden, name: &str, kind: SchedulerKind, steps: usize,
                      guidance: f64, tol: f32) {
    let dev: Device = sd.dev().clone();
    let init: Tensor<4> = init.tensor("run.init_latents", &dev);
    let [_, _, h, w] = init.dims();
    let f = sd.vae_config.scale_factor();
    let req = GenerateRequest {
        prompt: "a lighthouse at dusk".into(),
        negative_prompt: "blurry".into(),
        steps,
        guidance,
        seed: 0,
        width: Some(w * f),
        height: Some(h * f),
        scheduler: kind,
    };
    let noise_key = format!("run.{name}.noise");
    let recorded: Option<Tensor<4>> = g.tensors.contains_key(&noise_key).then(|| {
        let t: Tensor<5> = g.tensor(&noise_key, &dev);
        let [n, b, c, hh, ww] = t.dims();
        t.reshape([n * b, c, hh, ww])
    });
    let mut noise = |i: usize| recorded.as_ref().unwrap().clone().narrow(0, i, 1);
    let noise_source: Option<&mut dyn FnMut(usize) -> Tensor<4>> =
        if recorded.is_some() { Some(&mut noise) } else { None };
    let inputs = Inputs { init_latents: Some(init), noise: noise_source, ..Default::default() };
    let out = sd.generate(&req, inputs, &mut |_| Control::Continue, Target::Rgba).expect("generate");
    let want_t: Vec<f64> = g.i64(&format!("run.{name}.timesteps")).iter().map(|&t| t as f64).collect();
    let sched = unsee::scheduler::Scheduler::new(kind, &sd.scheduler_config, steps).unwrap();
    assert_eq!(sched.timesteps, want_t, "{name}: timesteps differ from diffusers");
    assert_close(&format!("{name}: final latents after {steps} steps"), &host(out.latents),
                 g.f32(&format!("run.{name}.latents")).1, tol);
}

