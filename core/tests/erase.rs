//! The erasure engine: each method satisfies its own optimality conditions, constraints are exact, files and baked
//! weights agree, mismatched files are refused, and UCE equals a PyTorch transcription of the official script.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use unsee::device::{DeviceChoice, select};
use unsee::erase::linalg::{self, M, from_columns};
use unsee::erase::spec::Spec;
use unsee::erase::{Component, Keys, cross_attention_names, erase, file, linear_mut, read_weight};
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::weights::Precision;

fn load(model: &str) -> StableDiffusion {
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    StableDiffusion::load(&model_dir(model), dev, &LoadOptions::default()).unwrap()
}

fn spec(text: &str) -> Spec {
    Spec::parse(text, Path::new("test.toml")).unwrap()
}

fn tmp(name: &str) -> PathBuf {
    tmp_dir("erase", name)
}

fn weights(sd: &mut StableDiffusion, names: &[String]) -> Vec<M> {
    names.iter().map(|n| read_weight(linear_mut(sd, Component::Unet, n).unwrap()).unwrap()).collect()
}

fn rel(a: &M, b: &M) -> f64 {
    linalg::frob(&(a - b)) / linalg::frob(b).max(1e-30)
}

/// Keys of the prompts at the last subject token, as columns.
fn last_keys(sd: &StableDiffusion, prompts: &[String]) -> M {
    let mut keys = Keys::new(sd);
    let cols: Vec<Vec<f64>> = prompts.iter().map(|p| keys.last_token(p).unwrap()).collect();
    from_columns(sd.text_config.hidden_size, &cols)
}

fn null_keys(sd: &StableDiffusion) -> M {
    Keys::new(sd).hidden("", None).unwrap().0
}

const UCE_SPEC: &str = r#"
method = "uce"
preserve = ["Monet", "Rembrandt", "Warhol"]
[[erase]]
concept = "Van Gogh"
replace_with = "art"
[[erase]]
concept = "Picasso"
replace_with = "art"
"#;

#[test]
fn uce_matches_the_official_script_in_pytorch() {
    let mut sd = load("tiny");
    let s = spec(UCE_SPEC);
    let names = cross_attention_names(&sd.unet, &s.targets);
    erase(&mut sd, &s).unwrap();
    let after = weights(&mut sd, &names);
    let g = Golden::load_file(&fixtures().join("tiny/uce_golden.safetensors"));
    let mut worst = 0f64;
    for (n, w) in names.iter().zip(&after) {
        let (shape, v) = g.f32(&format!("{n}.weight"));
        let want = linalg::from_f32(shape[0], shape[1], v);
        worst = worst.max(rel(w, &want));
    }
    eprintln!("UCE vs PyTorch reference: worst relative Frobenius error {worst:.2e}");
    assert!(worst <= 1e-5, "UCE differs from the reference by {worst:.2e}");
}

#[test]
fn uce_satisfies_its_normal_equations_for_ten_concepts() {
    let concepts = ["Van Gogh", "Picasso", "Dali", "Klimt", "Hokusai", "Turner", "Vermeer", "Goya", "Munch", "Kahlo"];
    let mut text = String::from("method = \"uce\"\npreserve = [\"Monet\", \"Rembrandt\"]\ntemplates = \"art\"\n");
    for c in concepts {
        text.push_str(&format!("[[erase]]\nconcept = \"{c}\"\nreplace_with = \"art\"\n"));
    }
    let s = spec(&text);
    let mut sd = load("tiny");
    let names = cross_attention_names(&sd.unet, &s.targets);
    let before = weights(&mut sd, &names);
    // The keys as the engine encodes them (batched: equal to one-prompt encoding to f32 rounding, which the
    // 1e-9 check below would see); the prompts are the spec's, in the engine's order.
    let fill = |items: &[&str], t: &[String]| -> Vec<String> {
        items.iter().flat_map(|c| t.iter().map(move |t| Spec::fill(t, c))).collect()
    };
    let erase_prompts = fill(&concepts, &s.templates);
    let preserve_prompts = fill(&["Monet", "Rembrandt"], &s.templates);
    assert_eq!(preserve_prompts, unsee::erase::gram::preserve_prompts(&s));
    let d = sd.text_config.hidden_size;
    let mut keys = Keys::new(&sd);
    let (ke, kg) = unsee::erase::keys::erase_pairs(&mut keys, &s, d).unwrap();
    assert_eq!(ke.ncols(), erase_prompts.len());
    keys.prefetch(&preserve_prompts, unsee::erase::spec::TokenMode::Last).unwrap();
    let kp = from_columns(d, &preserve_prompts.iter().map(|p| keys.last_token(p).unwrap()).collect::<Vec<_>>());
    // And they are the prompts' keys (one-prompt encoding, to f32 rounding).
    let guide_prompts: Vec<String> = s.templates.iter().cycle().take(erase_prompts.len())
        .map(|t| Spec::fill(t, "art").trim().to_string()).collect();
    for (got, prompts) in [(&ke, &erase_prompts), (&kg, &guide_prompts), (&kp, &preserve_prompts)] {
        assert!(rel(got, &last_keys(&sd, prompts)) < 1e-6);
    }
    let edit = erase(&mut sd, &s).unwrap();
    let on_device = weights(&mut sd, &names);
    // The normal equations are checked on the f64 solution; the device weights equal it to f32 rounding.
    let after: Vec<M> = before.iter().zip(&edit.deltas).map(|(w0, d)| w0 + d.dense()).collect();
    for (a, b) in after.iter().zip(&on_device) {
        assert!(rel(b, a) < 1e-6);
    }
    for (w0, w) in before.iter().zip(&after) {
        // ∇ = λ(W − W₀) + Σ_E (W k_e − W₀ k_g) k_eᵀ + Σ_P (W k_p − W₀ k_p) k_pᵀ = 0
        let grad = (w - w0) * s.lambda + (w * &ke - w0 * &kg) * ke.transpose() + (w * &kp - w0 * &kp) * kp.transpose();
        let scale = linalg::frob(&((w0 * &kg) * ke.transpose())).max(1.0);
        assert!(linalg::frob(&grad) / scale < 1e-9, "normal equations violated: {:.2e}", linalg::frob(&grad) / scale);
        assert!(rel(w, w0) > 1e-3, "the edit did nothing");
    }
}

#[test]
fn pin_unconditional_leaves_null_text_keys_exactly_unchanged() {
    // The small model's width (96) exceeds the 77 null-text keys, so the pin can be exact (as on SD-1.x's 768).
    for method in ["uce", "time", "rece", "erasepro", "speed"] {
        let mut sd = load("small");
        let text = format!("method = \"{method}\"\npin_unconditional = true\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n");
        let s = spec(&text);
        let names = cross_attention_names(&sd.unet, &s.targets);
        let before = weights(&mut sd, &names);
        let null = null_keys(&sd);
        let edit = erase(&mut sd, &s).unwrap();
        assert!(edit.warnings.is_empty(), "{method}: {:?}", edit.warnings);
        let after: Vec<M> = before.iter().zip(&edit.deltas).map(|(w0, d)| w0 + d.dense()).collect();
        let mut worst = 0f64;
        for (w0, w) in before.iter().zip(&after) {
            worst = worst.max(linalg::frob(&((w - w0) * &null)) / linalg::frob(&(w0 * &null)));
            assert!(rel(w, w0) > 1e-4, "{method}: the edit did nothing");
        }
        eprintln!("{method}: null-text outputs moved by {worst:.2e} (relative)");
        assert!(worst < 1e-6, "{method}: null-text keys changed by {worst:.2e}");
    }
}

#[test]
fn erasepro_meets_its_constraint_exactly_with_minimum_norm() {
    let mut sd = load("small");
    let s = spec("method = \"erasepro\"\ntemplates = \"art\"\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n");
    let names = cross_attention_names(&sd.unet, &s.targets);
    let before = weights(&mut sd, &names);
    let x = last_keys(&sd, &s.templates.iter().map(|t| Spec::fill(t, "Van Gogh")).collect::<Vec<_>>());
    let y = last_keys(&sd, &s.templates.iter().map(|t| Spec::fill(t, "art").trim().to_string()).collect::<Vec<_>>());
    let null = null_keys(&sd);
    let edit = erase(&mut sd, &s).unwrap();
    let after: Vec<M> = before.iter().zip(&edit.deltas).map(|(w0, d)| w0 + d.dense()).collect();
    for (w0, w) in before.iter().zip(&after) {
        let r = rel(&(w * &x), &(w0 * &y));
        assert!(r < 1e-5, "W X ≠ W₀ Y: {r:.2e}");
        assert!(linalg::frob(&((w - w0) * &null)) / linalg::frob(&(w0 * &null)) < 1e-6);
        // Minimum norm: ΔW lies in the row space spanned by the constraint keys (X and the null keys).
        let z = linalg::hcat(&x, &linalg::orth_basis(&null, 1e-7, "t").unwrap());
        let proj = &z * linalg::sym_pinv(&(z.transpose() * &z), 1e-10, "t").unwrap() * z.transpose();
        let dw = w - w0;
        assert!(rel(&(&dw * &proj), &dw) < 1e-5, "ΔW is not minimum-norm");
    }
    assert!(edit.residuals.iter().all(|(_, r)| *r < 1e-6));
}

#[test]
fn speed_leaves_preserved_keys_unchanged() {
    let mut sd = load("small");
    // No filtering or augmentation and a tiny threshold: the whole span of the preserved keys is protected.
    let s = spec(r#"
method = "speed"
preserve = ["Monet", "Rembrandt", "Warhol", "a cat", "a house"]
filter = false
augment = 0
null_threshold = 1e-9
[[erase]]
concept = "Van Gogh"
replace_with = "art"
"#);
    let names = cross_attention_names(&sd.unet, &s.targets);
    assert!(names.iter().all(|n| n.ends_with("to_v")), "SPEED edits to_v only by default");
    let before = weights(&mut sd, &names);
    let kp = last_keys(&sd, &s.preserve);
    let ke = last_keys(&sd, &["Van Gogh".to_string()]);
    let edit = erase(&mut sd, &s).unwrap();
    let after: Vec<M> = before.iter().zip(&edit.deltas).map(|(w0, d)| w0 + d.dense()).collect();
    for (w0, w) in before.iter().zip(&after) {
        let drift = linalg::frob(&((w - w0) * &kp)) / linalg::frob(&(w0 * &kp));
        assert!(drift < 1e-6, "preserved keys moved by {drift:.2e}");
        assert!(linalg::frob(&((w - w0) * &ke)) > 1e-3 * linalg::frob(&(w0 * &ke)), "the concept was not edited");
    }
}

#[test]
fn time_moves_the_concept_towards_the_replacement() {
    for method in ["time"] {
        let mut sd = load("tiny");
        let s = spec(&format!("method = \"{method}\"\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n"));
        let names = cross_attention_names(&sd.unet, &s.targets);
        let before = weights(&mut sd, &names);
        let kc = last_keys(&sd, &["Van Gogh".to_string()]);
        let kr = last_keys(&sd, &["art".to_string()]);
        erase(&mut sd, &s).unwrap();
        let after = weights(&mut sd, &names);
        let (mut gap0, mut gap1) = (0.0, 0.0);
        for (w0, w) in before.iter().zip(&after) {
            gap0 += linalg::frob(&(w0 * &kc - w0 * &kr));
            gap1 += linalg::frob(&(w * &kc - w0 * &kr));
        }
        eprintln!("{method}: concept→replacement gap {gap0:.3} → {gap1:.3}");
        assert!(gap1 < 0.5 * gap0, "{method}: the concept did not move towards the replacement");
    }
}

/// RECE's defining property: after its rounds, the embedding that best regenerates the concept in the edited model
/// (closed form, the same λ_reg) regenerates it worse than after the plain UCE edit it starts from.
#[test]
fn rece_rounds_make_the_concept_harder_to_regenerate() {
    let recovery = |rounds: usize| -> f64 {
        let mut sd = load("small");
        let s = spec(&format!("method = \"rece\"\nrounds = {rounds}\n[[erase]]\nconcept = \"Van Gogh\"\n"));
        let names = cross_attention_names(&sd.unet, &s.targets);
        let w0 = weights(&mut sd, &names);
        let c = Keys::new(&sd).hidden("Van Gogh", None).unwrap().0;
        let edit = erase(&mut sd, &s).unwrap();
        let w: Vec<M> = w0.iter().zip(&edit.deltas).map(|(a, d)| a + d.dense()).collect();
        let d = c.nrows();
        let mut a = M::identity(d, d) * s.lambda_reg;
        let mut b = M::zeros(d, d);
        for (wc, wo) in w.iter().zip(&w0) {
            a += wc.transpose() * wc;
            b += wc.transpose() * wo;
        }
        let adv = linalg::spd_solve(&a, &(&b * &c), "t").unwrap();
        let (mut num, mut den) = (0.0, 0.0);
        for (wc, wo) in w.iter().zip(&w0) {
            num += linalg::frob(&(wc * &adv - wo * &c)).powi(2);
            den += linalg::frob(&(wo * &c)).powi(2);
        }
        (num / den).sqrt()
    };
    let (base, after) = (recovery(0), recovery(2));
    eprintln!("RECE: best regeneration error {base:.4} (UCE only) → {after:.4} (2 rounds)");
    assert!(after > base * 1.05, "RECE rounds did not make the concept harder to regenerate");
}

#[test]
fn erasure_file_and_baked_folder_agree_and_mismatches_are_refused() {
    let d = tmp("file");
    let mut sd = load("tiny");
    let s = spec(UCE_SPEC);
    let names = cross_attention_names(&sd.unet, &s.targets);
    let edit = erase(&mut sd, &s).unwrap();
    let edited = weights(&mut sd, &names);
    let path = d.join("vangogh.safetensors");
    file::save(&edit, &path).unwrap();
    let baked = d.join("baked");
    file::bake(&sd, &edit.deltas, &baked).unwrap();

    // Base + erasure file.
    let mut applied = load("tiny");
    let info = file::apply_file(&mut applied, &path).unwrap();
    assert_eq!(info.concepts, vec!["Van Gogh", "Picasso"]);
    assert_eq!(info.method, "uce");
    // The baked folder.
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let mut from_bake = StableDiffusion::load(&baked, dev, &LoadOptions::default()).unwrap();
    for ((a, b), c) in weights(&mut applied, &names).iter().zip(weights(&mut from_bake, &names)).zip(&edited) {
        assert!(rel(a, c) < 1e-6, "file vs in-memory edit: {:.2e}", rel(a, c));
        assert!(rel(&b, c) < 1e-6, "baked vs in-memory edit: {:.2e}", rel(&b, c));
    }

    // Applying it twice: the weights no longer match its base.
    let err = file::apply_file(&mut applied, &path).unwrap_err().to_string();
    assert!(err.contains("erasure mismatch"), "{err}");
    // Another model.
    let mut small = load("small");
    let err = file::apply_file(&mut small, &path).unwrap_err().to_string();
    assert!(err.contains("erasure mismatch"), "{err}");
    // The same UNet with another text encoder.
    let mut other_te = load("tiny");
    let fc = &mut other_te.text_encoder.text_model.final_layer_norm;
    fc.gamma = burn::module::Param::from_tensor(fc.gamma.val() * 1.01);
    let err = file::apply_file(&mut other_te, &path).unwrap_err().to_string();
    assert!(err.contains("another text encoder"), "{err}");
}

#[test]
fn erasepro_text_erases_in_the_text_encoder_and_pins_the_null_prompt() {
    let mut sd = load("small");
    let s = spec("method = \"erasepro-text\"\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n");
    let mut keys = Keys::new(&sd);
    let (null0, _) = keys.hidden("", None).unwrap();
    let (art0, _) = keys.hidden("art", None).unwrap();
    let (vg0, tvg) = keys.hidden("Van Gogh", None).unwrap();
    drop(keys);
    let edit = erase(&mut sd, &s).unwrap();
    assert!(edit.warnings.is_empty(), "{:?}", edit.warnings);
    assert_eq!(edit.deltas.len(), sd.text_config.num_hidden_layers);
    assert!(edit.deltas.iter().all(|d| d.component == Component::TextEncoder));
    let mut keys = Keys::new(&sd);
    let (null1, _) = keys.hidden("", None).unwrap();
    let (vg1, _) = keys.hidden("Van Gogh", None).unwrap();
    let (art1, _) = keys.hidden("art", None).unwrap();
    drop(keys);
    assert!(rel(&null1, &null0) < 1e-5, "the null prompt changed: {:.2e}", rel(&null1, &null0));
    // The concept's last subject token now encodes like the replacement's (the final layer norm follows the last
    // edited layer, so compare after it).
    let p = tvg.eos_position - 1;
    let col = |m: &M, j: usize| M::from_fn(m.nrows(), 1, |i, _| m[(i, j)]);
    let before = linalg::frob(&(col(&vg0, p) - col(&art0, 1)));
    let after = linalg::frob(&(col(&vg1, p) - col(&art0, 1)));
    eprintln!("erasepro-text: |h(Van Gogh) - h(art)| {before:.3} → {after:.3}; residuals {:?}", edit.residuals);
    assert!(after < 0.05 * before, "the concept still encodes differently from the replacement");
    // Other prompts are not pinned by the method, but a single-concept edit should leave them mostly alone.
    eprintln!("erasepro-text: 'art' moved by {:.3} (relative)", rel(&art1, &art0));
}

/// The embedding attack (RECE's closed form, `erase::attack`): conditioning on c′ reproduces the base model's
/// keys/values of the concept prompt better than the prompt itself does on the erased model, `c′` solves its normal
/// equations, `generate` conditioned on the plain hidden states equals `generate` from the prompt, and a model without a UNet
/// edit is refused.
#[test]
fn embedding_attack_recovers_base_keys_and_context_generation_matches() {
    use unsee::erase::attack::{EMBEDDING_ATTACK_LAMBDA, adversarial_context};
    use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
    let base = load("tiny");
    let mut sd = base.clone();
    let s = spec(UCE_SPEC);
    erase(&mut sd, &s).unwrap();
    let prompt = "a painting by Van Gogh";
    let adv = adversarial_context(&base, &sd, prompt, EMBEDDING_ATTACK_LAMBDA).unwrap();
    let names = cross_attention_names(&sd.unet, &["to_k".to_string(), "to_v".to_string()]);
    let (w0, w1) = (weights(&mut base.clone(), &names), weights(&mut sd.clone(), &names));
    let to_m = |t: burn::tensor::Tensor<3>| {
        let [_, n, d] = t.dims();
        let v = host(t);
        M::from_fn(d, n, |i, j| v[j * d + i] as f64)
    };
    let c = to_m(sd.encode_prompt(prompt).unwrap().0);
    let a = to_m(adv);
    let (mut err_plain, mut err_adv) = (0.0, 0.0);
    let mut grad = &a * EMBEDDING_ATTACK_LAMBDA;
    for (wb, we) in w0.iter().zip(&w1) {
        err_plain += linalg::frob(&(we * &c - wb * &c)).powi(2);
        err_adv += linalg::frob(&(we * &a - wb * &c)).powi(2);
        grad += we.transpose() * (we * &a - wb * &c);
    }
    eprintln!("keys/values error vs base: prompt {err_plain:.4e}, adversarial embedding {err_adv:.4e}");
    assert!(err_adv < 0.5 * err_plain, "the attack does not bring the keys back");
    assert!(linalg::frob(&grad) < 1e-6 * linalg::frob(&a).max(1.0), "c′ does not solve its normal equations");

    let req = GenerateRequest { prompt: prompt.into(), steps: 3, guidance: 5.0, seed: 3, ..Default::default() };
    let plain = sd.generate(&req, Inputs::default(), &mut |_| Control::Continue, Target::Rgba).unwrap();
    let (ctx, _) = sd.encode_prompt(prompt).unwrap();
    let with_context = |c| Inputs { context: Some(c), ..Default::default() };
    let via_ctx = sd.generate(&req, with_context(ctx), &mut |_| Control::Continue, Target::Rgba).unwrap();
    assert_eq!(plain.rgba, via_ctx.rgba);
    let bad = burn::tensor::Tensor::<3>::zeros([1, 5, 32], sd.dev());
    assert!(sd.generate(&req, with_context(bad), &mut |_| Control::Continue, Target::Rgba).is_err());

    let err = adversarial_context(&base, &base, prompt, EMBEDDING_ATTACK_LAMBDA).unwrap_err();
    assert!(err.to_string().contains("needs a UNet edit"), "{err}");
}

