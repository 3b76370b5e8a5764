//! The gradient attacks (#12): reverse-mode gradients through the text encoder and the UNet equal finite
//! differences; the inversion token is spliced exactly where the placeholder is; the optimised-prompt attack yields
//! a typed prompt; embeddings round-trip through their file; on the shapes world the attacks run end to end.

mod common;

use burn::tensor::{Distribution, Tensor, TensorData};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use common::*;
use unsee::device::{DeviceChoice, select};
use unsee::erase::attack::inversion::{self, PLACEHOLDER};
use unsee::erase::attack::loss::{DenoisingLoss, embed_ids, gradient, leaf, scalar};
use unsee::erase::attack::prompt::{self, PromptAttackConfig};
use unsee::erase::attack::{AttackMethod, AttackOptions};
use unsee::erase::spec::Spec;
use unsee::engine::{Engine, EngineOptions};
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::weights::Precision;

fn load(model: &str) -> StableDiffusion {
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    StableDiffusion::load(&model_dir(model), dev, &LoadOptions::default()).unwrap()
}

fn values(t: Tensor<3>) -> Vec<f32> {
    unsee::tensor::to_f32_vec(t).unwrap()
}

/// Seeded unit-variance values (burn's `Tensor::random` draws from a global generator: not reproducible).
fn seeded(shape: [usize; 3], rng: &mut ChaCha8Rng, dev: &burn::tensor::Device) -> Tensor<3> {
    use rand_distr::{Distribution as _, StandardNormal};
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_data(TensorData::new(v, shape), dev)
}

/// d/dh L(e + h·δ) at h = 0 by autodiff (⟨∇L, δ⟩) and by central differences over the token embeddings of a whole
/// prompt: the gradient flows through the UNet's cross-attention and every text-encoder layer. Along δ = ∇L the
/// two must agree to 2 % relative; along seeded random directions (whose derivative can be near 0, where f32
/// differences are noise) to 1 % of ‖∇L‖‖δ‖, the largest derivative any direction of that length can have.
#[test]
fn gradients_through_text_encoder_and_unet_equal_finite_differences() {
    let sd = load("tiny");
    let tokens = sd.tokenizer.encode("a photo of a red circle").unwrap();
    let e = embed_ids(&sd, &tokens.ids);
    let objective = DenoisingLoss::new(&sd).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let size = sd.unet_config.sample_size.unwrap_or(8).min(16);
    let x0 = seeded([4, size, size], &mut rng, sd.dev()).unsqueeze_dim::<4>(0);
    let noised = objective.noise(&x0, 400, &mut rng).unwrap();
    let loss_at = |emb: Tensor<3>| scalar(objective.loss(&noised, &objective.context(emb))).unwrap() as f64;

    let var = leaf(e.clone());
    let loss = objective.loss(&noised, &objective.context(var.clone()));
    let grad = gradient(&loss, &var).unwrap();
    let g = values(grad.clone());
    let g_norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    assert!(g_norm > 0.0, "the gradient is zero");
    // Positions after EOS reach the UNet too (CLIP's causal mask only hides later tokens from earlier ones).
    let mut directions = vec![(grad / g_norm, true)];
    for _ in 0..3 {
        directions.push((seeded(e.dims(), &mut rng, sd.dev()), false));
    }
    for (k, (delta, along_gradient)) in directions.into_iter().enumerate() {
        let dv = values(delta.clone());
        let d_norm = dv.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let analytic: f64 = g.iter().zip(&dv).map(|(a, b)| *a as f64 * *b as f64).sum();
        let h = 1e-2;
        let numeric = (loss_at(e.clone() + delta.clone() * h) - loss_at(e.clone() - delta * h)) / (2.0 * h);
        let err = (analytic - numeric).abs();
        let bound = if along_gradient { 2e-2 * numeric.abs() } else { 1e-2 * g_norm * d_norm };
        eprintln!("direction {k}: autodiff {analytic:.6e}, finite differences {numeric:.6e}, |difference| {err:.2e} \
                   (bound {bound:.2e})");
        assert!(err < bound, "direction {k}: autodiff {analytic} vs finite differences {numeric}");
    }
}

/// ⟨v*⟩ set to a word's own embedding gives exactly the conditioning of the prompt with that word.
#[test]
fn the_inversion_token_sits_where_the_placeholder_is() {
    let sd = load("tiny");
    let ids = sd.tokenizer.content_ids("circle").unwrap();
    assert_eq!(ids.len(), 1, "`circle` is one CLIP token");
    let v = sd.text_encoder.token_embeddings().select(0, Tensor::from_data(TensorData::new(vec![ids[0] as i64], [1]), sd.dev()))
        .reshape([sd.text_encoder.hidden_size()]);
    let with_v = inversion::context_with(&sd, &format!("a red {PLACEHOLDER} on a table"), &v).unwrap();
    let (plain, _) = sd.encode_prompt("a red circle on a table").unwrap();
    let (a, b) = (values(with_v), values(plain));
    let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "max difference {worst}");
    for bad in ["no placeholder", "<v*> twice <v*>"] {
        assert!(inversion::context_with(&sd, bad, &v).is_err(), "{bad}");
    }
}

#[test]
fn decoded_tokens_are_the_typed_text() {
    let sd = load("tiny");
    for text in ["a red circle", "an image of a purple star, high quality", "café ünïcode 42"] {
        let ids = sd.tokenizer.content_ids(text).unwrap();
        let back = sd.tokenizer.decode(&ids).unwrap();
        assert_eq!(sd.tokenizer.content_ids(&back).unwrap(), ids, "{text:?} → {back:?}");
    }
    assert!(sd.tokenizer.decode(&[u32::MAX]).is_err());
}

/// The prompt attack spends its budget without a judge and returns k vocabulary tokens in front of the prompt;
/// a judge that says yes at once ends it before any optimisation.
#[test]
fn prompt_attack_returns_a_typed_prompt() {
    let sd = load("tiny");
    let size = sd.unet_config.sample_size.unwrap_or(8).min(16);
    let x0 = Tensor::<4>::random([1, 4, size, size], Distribution::Normal(0.0, 1.0), sd.dev());
    let cfg = PromptAttackConfig { tokens: 3, timesteps: 2, iterations: 3, ..Default::default() };
    let mut judged = vec![];
    let out = prompt::attack(&sd, &x0, "a red circle", &cfg, &mut |p| {
        judged.push(p.to_string());
        Ok(None)
    }, &mut |_, _| {}, &|| false).unwrap();
    assert_eq!(out.prefix_ids.len(), 3);
    assert_eq!(out.iterations, 6);
    assert_eq!(judged.len(), 3, "the plain prompt, then one typed prompt per timestep: {judged:?}");
    assert!(out.prompt.ends_with("a red circle") && out.prompt.len() > "a red circle".len(), "{}", out.prompt);
    assert!(out.loss.is_finite() && out.success.is_none());
    let tok = &sd.tokenizer;
    assert!(out.prefix_ids.iter().all(|&i| i != tok.bos && i != tok.eos && i != tok.pad));

    let quick = prompt::attack(&sd, &x0, "a red circle", &cfg, &mut |_| Ok(Some(true)), &mut |_, _| {}, &|| false)
        .unwrap();
    assert_eq!((quick.iterations, quick.success, quick.prompt.as_str()), (0, Some(true), "a red circle"));

    let cancelled = prompt::attack(&sd, &x0, "a red circle", &cfg, &mut |_| Ok(None), &mut |_, _| {}, &|| true);
    assert!(matches!(cancelled, Err(unsee::error::Error::Cancelled)), "{:?}", cancelled.err());
    for bad in [PromptAttackConfig { tokens: 0, ..cfg.clone() }, PromptAttackConfig { lr: f64::NAN, ..cfg.clone() },
                PromptAttackConfig { iterations: 0, ..cfg.clone() }] {
        assert!(prompt::attack(&sd, &x0, "a", &bad, &mut |_| Ok(None), &mut |_, _| {}, &|| false).is_err());
    }
}

/// A learned embedding survives its file; wrong widths and shapes are refused.
#[test]
fn inversion_embeddings_round_trip_and_mismatches_are_refused() {
    let sd = load("tiny");
    let dir = tmp_dir("attack", "embedding");
    let d = sd.text_encoder.hidden_size();
    let v = Tensor::<1>::random([d], Distribution::Normal(0.0, 1.0), sd.dev());
    let path = dir.join("v.safetensors");
    inversion::save_embedding(&v, &path).unwrap();
    let back = inversion::load_embedding(&sd, &path).unwrap();
    assert_eq!(unsee::tensor::to_f32_vec(v).unwrap(), unsee::tensor::to_f32_vec(back).unwrap());
    let wide = Tensor::<1>::random([d + 1], Distribution::Normal(0.0, 1.0), sd.dev());
    inversion::save_embedding(&wide, &path).unwrap();
    let err = inversion::load_embedding(&sd, &path).unwrap_err().to_string();
    assert!(err.contains("needs [1, "), "{err}");
    std::fs::write(&path, b"not safetensors").unwrap();
    assert!(inversion::load_embedding(&sd, &path).is_err());
}

fn shapes_engine() -> Engine {
    Engine::open(&EngineOptions { model: repo().join("models").join("shapes-sd"), ..EngineOptions::default() }).unwrap()
}

/// End to end on the shapes world, with small budgets: every method runs through the engine, is judged by the
/// oracle, and the inversion's embedding file reproduces its verdicts.
#[test]
fn attacks_run_end_to_end_on_the_shapes_world() {
    let engine = shapes_engine();
    let spec = Spec::from_file(&repo().join("models/specs/shapes-circle.toml")).unwrap();
    let dir = tmp_dir("attack", "shapes");
    let mut o = AttackOptions::new(AttackMethod::Prompt, vec![]);
    (o.runs, o.guidance, o.prompt.timesteps, o.prompt.iterations) = (2, 4.0, 2, 5);
    let r = engine.attack(&spec, &o, &mut |_, _, _| {}, &|| false).unwrap();
    assert_eq!((r.of, r.runs.len()), (2, 2));
    assert!(r.hits.is_some(), "the shapes oracle judges shapes concepts");
    assert!(r.runs.iter().all(|run| run.prompt.contains("circle") && run.success.is_some()));

    o.method = AttackMethod::Inversion;
    (o.inversion.steps, o.inversion_targets) = (20, 4);
    o.save_embedding = Some(dir.join("v.safetensors"));
    let learned = engine.attack(&spec, &o, &mut |_, _, _| {}, &|| false).unwrap();
    assert!(learned.inversion_loss.unwrap().is_finite());
    assert!(learned.runs.iter().all(|run| run.prompt.contains(PLACEHOLDER)));
    o.save_embedding = None;
    o.load_embedding = Some(dir.join("v.safetensors"));
    let replay = engine.attack(&spec, &o, &mut |_, _, _| {}, &|| false).unwrap();
    let verdicts = |r: &unsee::erase::attack::AttackReport| r.runs.iter().map(|x| x.success).collect::<Vec<_>>();
    assert_eq!(verdicts(&learned), verdicts(&replay), "a saved embedding reproduces the finding");

    o.method = AttackMethod::Embedding;
    o.load_embedding = None;
    let emb = engine.attack(&spec, &o, &mut |_, _, _| {}, &|| false).unwrap();
    assert_eq!(emb.of, 2);

    // erasepro-text edits the text encoder only: the conditioning attack does not apply and says so.
    let text_spec = Spec::parse_inline(&std::fs::read_to_string(repo().join("models/specs/shapes-circle.toml")).unwrap()
        .replace("method = \"uce\"", "method = \"erasepro-text\"").replace("templates = \"shapes-templates.txt\"", ""));
    let err = engine.attack(&text_spec.unwrap(), &o, &mut |_, _, _| {}, &|| false).unwrap_err().to_string();
    assert!(err.contains("needs a UNet edit"), "{err}");
}
