//! The `unsee` binary end to end: parity through the CLI, and every kind of bad input giving a clear error and a
//! non-zero exit (never a panic).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use safetensors::{Dtype, SafeTensors};

/// Runs unsee with the random-weight `tiny-sd` as the default model (the parity goldens are computed on it).
fn unsee(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_unsee"))
        .args(args)
        .env("RUST_LOG", "unsee=info,warn")
        .env("UNSEE_MODEL", model_dir("tiny"))
        .output()
        .expect("run unsee")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Runs unsee and asserts it fails cleanly (exit 1 for errors, 2 for usage errors; not a panic) with `needle` in
/// its message.
fn fails_with(args: &[&str], needle: &str) -> String {
    let o = unsee(args);
    let err = stderr(&o);
    assert!(matches!(o.status.code(), Some(1 | 2)), "expected a clean failure for {args:?}, got {:?}:\n{err}", o.status);
    assert!(err.contains(needle), "expected {needle:?} in the error for {args:?}:\n{err}");
    assert!(!err.contains("panicked"), "panic for {args:?}:\n{err}");
    err
}

fn tmp(name: &str) -> PathBuf {
    tmp_dir("cli", name)
}


fn tiny_copy(name: &str) -> PathBuf {
    let d = tmp(name).join("model");
    copy_dir(&model_dir("tiny"), &d);
    d
}

/// Rewrites a safetensors file, letting `edit` change each tensor's (dtype, shape, bytes).
fn rewrite(path: &Path, edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> (Dtype, Vec<usize>, Vec<u8>)) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let edited: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            let (d, s, b) = edit(&n, v.dtype(), v.shape().to_vec(), v.data().to_vec());
            (n, d, s, b)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = edited
        .iter()
        .map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn write_latents(path: &Path, shape: &[usize], v: &[f32]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.to_vec(), &bytes).unwrap();
    safetensors::serialize_to_file(vec![("latents".to_string(), view)], None, path).unwrap();
}

fn read_f32(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let v = st.tensor(name).unwrap();
    (v.shape().to_vec(), v.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect())
}

#[test]
fn generate_from_init_latents_matches_diffusers() {
    let g = Golden::load("tiny");
    let d = tmp("init");
    let init = d.join("init.safetensors");
    let (shape, v) = g.f32("run.init_latents");
    write_latents(&init, shape, v);
    let out_latents = d.join("final.safetensors");
    let png = d.join("x.png");
    let o = unsee(&["generate", "--device", "cpu", "--prompt", "a lighthouse at dusk", "--negative", "blurry",
                    "--steps", "10", "--guidance", "7.5", "--init-latents", init.to_str().unwrap(),
                    "--save-latents", out_latents.to_str().unwrap(), "--out", png.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(summary["timings_s"]["steps"].as_array().unwrap().len(), 10);
    assert!(summary["device"].as_str().unwrap().starts_with("cpu"));
    let (s, got) = read_f32(&out_latents, "latents");
    assert_eq!(s, shape);
    assert_close("CLI ddim final latents", &got, g.f32("run.ddim.latents").1, 1e-3);
    let img = image::open(&png).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    // The decoded image equals diffusers' decode of its own final latents (to 8-bit rounding).
    let want = g.f32("run.ddim.image").1;
    let rgb = img.to_rgb8();
    let mut worst = 0f32;
    for c in 0..3 {
        for p in 0..64 * 64 {
            let w = ((want[c * 64 * 64 + p] / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round();
            worst = worst.max((rgb.as_raw()[p * 3 + c] as f32 - w).abs());
        }
    }
    assert!(worst <= 1.0, "decoded pixels differ from diffusers by up to {worst} levels");
}

#[test]
fn same_seed_same_image_and_seed_changes_it() {
    let d = tmp("seed");
    let run = |seed: &str, out: &str| {
        let p = d.join(out);
        let o = unsee(&["generate", "--device", "cpu", "--prompt", "a red circle", "--steps", "3", "--seed", seed,
                        "--out", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(p).unwrap()
    };
    assert_eq!(run("1", "a.png"), run("1", "b.png"));
    assert_ne!(run("1", "a.png"), run("2", "c.png"));
}

#[test]
fn low_memory_draws_the_same_image_and_refuses_what_needs_every_network() {
    let d = tmp("low-memory");
    let run = |extra: &[&str], out: &str| {
        let p = d.join(out);
        let mut args = vec!["generate", "--device", "cpu", "--prompt", "a red circle", "--steps", "3", "--seed", "4",
                            "--json", "--out", p.to_str().unwrap()];
        args.extend_from_slice(extra);
        let o = unsee(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        (std::fs::read(p).unwrap(), j["low_memory"].as_bool().unwrap())
    };
    assert_eq!(run(&[], "resident.png"), (run(&["--low-memory"], "low.png").0, false));
    assert!(run(&["--low-memory"], "low2.png").1);
    let spec = repo().join("models/specs/shapes-circle.toml");
    fails_with(&["erase", "--low-memory", "--spec", spec.to_str().unwrap(), "--out",
                 d.join("e.safetensors").to_str().unwrap()], "low-memory");
    assert!(!d.join("e.safetensors").exists());
    // `grid --spec` refuses before drawing its first row.
    let err = fails_with(&["grid", "--low-memory", "--device", "cpu", "--prompt", "a red circle", "--steps", "2",
                           "--spec", spec.to_str().unwrap(), "--out", d.join("g.png").to_str().unwrap()], "low-memory");
    assert!(!err.contains("row 1"), "drew before refusing:\n{err}");
    assert!(!d.join("g.png").exists());
}

#[test]
fn encode_writes_the_text_encoder_hidden_states() {
    let g = Golden::load("tiny");
    let d = tmp("encode");
    let out = d.join("enc.safetensors");
    let o = unsee(&["encode", "--device", "cpu", "--prompt", "a lighthouse at dusk", "--prompt", "",
                    "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (s, h0) = read_f32(&out, "prompt.0.hidden");
    assert_eq!(s, vec![77, 32]);
    assert_close("encode prompt 0", &h0, g.f32("text.0.hidden").1, 1e-4);
    assert_close("encode prompt 1", &read_f32(&out, "prompt.1.hidden").1, g.f32("text.1.hidden").1, 1e-4);
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor("prompt.0.input_ids").unwrap();
    assert_eq!((ids.dtype(), ids.shape()), (Dtype::I64, &[77usize][..]));
    let ids: Vec<i64> = ids.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap())).collect();
    assert_eq!(ids, g.i64("text.0.input_ids"));
}

#[test]
fn info_describes_the_model() {
    let o = unsee(&["info", "--device", "cpu"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["unet"]["block_out_channels"], serde_json::json!([32, 64]));
    assert!(v["parameters"]["unet"].as_u64().unwrap() > 100_000);
    assert_eq!(v["text_encoder"]["vocab"], 49408);
    assert!(v["files"]["unet"]["dtypes"]["f32"].as_u64().unwrap() > 0);
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let d = tmp("long");
    let long = "word ".repeat(100);
    let o = unsee(&["encode", "--device", "cpu", "--prompt", &long, "--out", d.join("e.safetensors").to_str().unwrap()]);
    assert!(o.status.success());
    let err = stderr(&o);
    assert!(err.contains("the last 25 token(s) were dropped"), "{err}");
}

#[test]
fn bad_requests_are_refused() {
    fails_with(&["generate", "--prompt", "x", "--scheduler", "plms"], "unknown scheduler");
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--width", "100"], "multiple of 8");
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--steps", "0"], "at least 1");
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--guidance", "NaN", "--steps", "1"], "guidance");
    fails_with(&["generate", "--device", "tpu", "--prompt", "x"], "unknown device");
    fails_with(&["generate", "--precision", "f8", "--prompt", "x"], "unknown precision");
    fails_with(&["grid", "--device", "cpu", "--prompt", "x", "--scale", "0"], "--scale 1..=64");
    fails_with(&["grid", "--device", "cpu", "--prompt", "x", "--columns", "0"], "--columns must be at least 1");
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--model", "/nonexistent/model"], "model not found");
}

#[test]
fn init_latents_of_the_wrong_shape_are_refused() {
    let d = tmp("badlat");
    let p = d.join("l.safetensors");
    write_latents(&p, &[1, 4, 4, 4], &[0.0; 64]);
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--steps", "1", "--init-latents", p.to_str().unwrap()],
               "init latents have shape");
}

#[test]
fn missing_component_is_named() {
    let m = tiny_copy("missing");
    std::fs::remove_dir_all(m.join("vae")).unwrap();
    fails_with(&["info", "--device", "cpu", "--model", m.to_str().unwrap()], "`vae`");
}

#[test]
fn truncated_weights_are_reported_as_corrupt() {
    let m = tiny_copy("trunc");
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    fails_with(&["info", "--device", "cpu", "--model", m.to_str().unwrap()], "corrupt or unreadable safetensors");
    std::fs::write(&f, b"this is not a safetensors file").unwrap();
    fails_with(&["info", "--device", "cpu", "--model", m.to_str().unwrap()], "corrupt or unreadable safetensors");
}

#[test]
fn nan_weights_are_detected() {
    let m = tiny_copy("nan");
    rewrite(&m.join("vae/diffusion_pytorch_model.safetensors"), |name, d, s, mut b| {
        if name == "decoder.conv_in.weight" {
            b[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        }
        (d, s, b)
    });
    fails_with(&["info", "--device", "cpu", "--model", m.to_str().unwrap()], "decoder.conv_in.weight");
}

#[test]
fn mismatched_tensors_are_all_listed() {
    let m = tiny_copy("shape");
    rewrite(&m.join("unet/diffusion_pytorch_model.safetensors"), |name, d, mut s, b| {
        if name == "conv_in.bias" {
            s = vec![2, 16];
        }
        (d, s, b)
    });
    // Rename one tensor and drop nothing: one unexpected + one missing + one mis-shaped, all in one message.
    let f = m.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (if n == "conv_out.bias" { "conv_out.bias_typo".to_string() } else { n }, v))
        .collect();
    let out = safetensors::serialize(views, None).unwrap();
    std::fs::write(&f, out).unwrap();
    let err = fails_with(&["info", "--device", "cpu", "--model", m.to_str().unwrap()], "weights of unet");
    assert!(err.contains("missing:    conv_out.bias"), "{err}");
    assert!(err.contains("unexpected: conv_out.bias_typo"), "{err}");
    assert!(err.contains("conv_in.bias") && err.contains("[2, 16]") && err.contains("[32]"), "{err}");
}

#[test]
fn pickle_checkpoints_are_refused_not_executed() {
    let d = tmp("pickle");
    let p = d.join("model.ckpt");
    std::fs::write(&p, b"\x80\x04\x95 not really a pickle").unwrap();
    fails_with(&["info", "--device", "cpu", "--model", p.to_str().unwrap()], "never executed");
    let m = tiny_copy("pickle-folder");
    std::fs::rename(m.join("unet/diffusion_pytorch_model.safetensors"), m.join("unet/diffusion_pytorch_model.bin"))
        .unwrap();
    fails_with(&["info", "--device", "cpu", "--model", m.to_str().unwrap()], "Convert it to safetensors");
}

#[test]
fn gpu_request_without_adapter_is_a_clear_error() {
    // Restrict wgpu to a graphics API this machine cannot have, so no adapter exists.
    let api = if cfg!(target_os = "macos") { "dx12" } else { "metal" };
    let o = Command::new(env!("CARGO_BIN_EXE_unsee"))
        .args(["generate", "--device", "gpu", "--prompt", "x", "--steps", "1"])
        .env("WGPU_BACKEND", api)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("no wgpu adapter found"), "{}", stderr(&o));
}

/// `unsee generate --prompt "Van Gogh"` on the CPU with `extra` arguments; returns the RGB pixels.
fn generate_rgb(out: &std::path::Path, steps: &str, extra: &[&str]) -> Vec<u8> {
    let mut args = vec!["generate", "--device", "cpu", "--prompt", "Van Gogh", "--steps", steps, "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = unsee(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    image::open(out).unwrap().to_rgb8().into_raw()
}

#[test]
fn erase_then_generate_with_the_erasure_and_audit() {
    let d = tmp("erase");
    let spec = d.join("spec.toml");
    std::fs::write(&spec, "method = \"uce\"\npreserve = [\"Monet\"]\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n").unwrap();
    let file = d.join("vg.safetensors");
    let baked = d.join("baked");
    let o = unsee(&["erase", "--device", "cpu", "--spec", spec.to_str().unwrap(), "--out", file.to_str().unwrap(),
                    "--bake", baked.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["matrices"], 12);
    // Generating with the erasure file equals generating with the baked folder, and differs from the base model.
    let generate = |extra: &[&str], out: &str| generate_rgb(&d.join(out), "3", extra);
    let with_file = generate(&["--erasure", file.to_str().unwrap()], "f.png");
    let with_bake = generate(&["--model", baked.to_str().unwrap()], "b.png");
    let base = generate(&[], "base.png");
    let max_diff = with_file.iter().zip(&with_bake).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
    assert!(max_diff <= 1, "erasure file and baked folder differ by {max_diff} levels");
    assert_ne!(with_file, base, "the erasure changed nothing");
    // Applying it to another model is refused.
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--steps", "1", "--model",
                 model_dir("small").to_str().unwrap(), "--erasure", file.to_str().unwrap()], "erasure mismatch");
    // Audit of the file.
    let o = unsee(&["audit", "--device", "cpu", "--spec", spec.to_str().unwrap(), "--erasure", file.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["concepts"][0]["concept"], "Van Gogh");
    assert!(report["overall_key_leakage"]["mean"].as_f64().unwrap().is_finite());
    assert!(report["preserved"][0]["key_drift"]["mean"].as_f64().unwrap() >= 0.0);
    // A bad spec names its line.
    std::fs::write(&spec, "method = \"uce\"\n[[erase]]\nconcept = \"\"\n").unwrap();
    fails_with(&["erase", "--device", "cpu", "--spec", spec.to_str().unwrap(), "--out", file.to_str().unwrap()],
               "spec.toml:3: empty concept");
}

#[test]
fn ready_made_specs_parse_and_run() {
    for spec in ["art-styles", "objects", "explicit", "shapes-circle"] {
        let p = repo().join("models/specs").join(format!("{spec}.toml"));
        let o = unsee(&["audit", "--device", "cpu", "--spec", p.to_str().unwrap(), "--json"]);
        assert!(o.status.success(), "{spec}: {}", stderr(&o));
        let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert!(!report["concepts"].as_array().unwrap().is_empty());
    }
}

#[test]
fn every_method_runs_from_the_cli_on_both_reference_models() {
    let d = tmp("methods");
    for model in ["tiny", "small"] {
        for method in ["uce", "time", "speed", "rece", "erasepro", "erasepro-text"] {
            let spec = d.join(format!("{method}.toml"));
            let preserve = if method == "time" { "" } else { "preserve = [\"Monet\"]\n" };
            std::fs::write(&spec, format!("method = \"{method}\"\n{preserve}[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n")).unwrap();
            let out = d.join(format!("{model}-{method}.safetensors"));
            let m = model_dir(model);
            let o = unsee(&["erase", "--device", "cpu", "--model", m.to_str().unwrap(), "--spec", spec.to_str().unwrap(),
                            "--out", out.to_str().unwrap()]);
            assert!(o.status.success(), "{model}/{method}: {}", stderr(&o));
            let o = unsee(&["audit", "--device", "cpu", "--model", m.to_str().unwrap(), "--spec", spec.to_str().unwrap(),
                            "--erasure", out.to_str().unwrap(), "--json"]);
            assert!(o.status.success(), "{model}/{method} audit: {}", stderr(&o));
            let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            let leak = r["overall_key_leakage"]["mean"].as_f64().unwrap();
            assert!(leak.is_finite(), "{model}/{method}: leakage {leak}");
            if method != "time" {
                assert!(r["overall_key_drift"]["mean"].as_f64().unwrap().is_finite());
            }
            // The embedding attack applies to UNet edits only.
            let attack = &r["overall_attack_noise_leakage"];
            if method == "erasepro-text" {
                assert!(attack.is_null(), "{model}/{method}: {attack}");
            } else {
                assert!(attack["mean"].as_f64().unwrap().is_finite(), "{model}/{method}: {attack}");
            }
        }
    }
}

#[test]
fn erased_text_encoder_plugs_into_the_base_model() {
    // erasepro-text's baked text_encoder/ used with --text-encoder on the base model equals the baked folder.
    let d = tmp("text-encoder");
    let spec = d.join("spec.toml");
    std::fs::write(&spec, "method = \"erasepro-text\"\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n").unwrap();
    let baked = d.join("baked");
    let o = unsee(&["erase", "--device", "cpu", "--spec", spec.to_str().unwrap(), "--out",
                    d.join("e.safetensors").to_str().unwrap(), "--bake", baked.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let generate = |extra: &[&str], out: &str| generate_rgb(&d.join(out), "2", extra);
    let plugged = generate(&["--text-encoder", baked.join("text_encoder").to_str().unwrap()], "p.png");
    let whole = generate(&["--model", baked.to_str().unwrap()], "w.png");
    let base = generate(&[], "b.png");
    assert_eq!(plugged, whole);
    assert_ne!(plugged, base, "the erased text encoder changed nothing");
    // A text encoder of another width is refused; a missing one is "not found".
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--steps", "1", "--text-encoder",
                 model_dir("small").join("text_encoder").to_str().unwrap(), "--out", "x.png"], "cross-attention expects");
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--steps", "1", "--text-encoder",
                 d.join("nope").to_str().unwrap(), "--out", "x.png"], "model not found");
}

/// Without `--model` (and without UNSEE_MODEL) unsee uses the embedded shapes model; `grid` draws the prompts
/// before and after an erasure, and the oracle reads a circle in every image of the first row and none in the second.
#[test]
fn default_model_is_the_shapes_model_and_grid_shows_the_erasure() {
    let d = tmp("grid");
    let spec = repo().join("models/specs/shapes-circle.toml");
    let out = d.join("grid.png");
    let o = Command::new(env!("CARGO_BIN_EXE_unsee"))
        .args(["grid", "--device", "cpu", "--guidance", "4", "--scale", "2", "--spec", spec.to_str().unwrap(),
               "--prompt", "an image of a red circle", "--prompt", "a rendering of a blue circle",
               "--out", out.to_str().unwrap()])
        .env_remove("UNSEE_MODEL")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let img = image::open(&out).unwrap().to_rgb8();
    // 2 rows × 2 columns of 64×64 cells (32×32 images at scale 2), 2-pixel gaps, 6 more between the models.
    assert_eq!((img.width(), img.height()), (2 * 64 + 2, 2 * 64 + 2 + 6));
    let cell = |r: u32, c: u32| {
        let sub = image::imageops::crop_imm(&img, c * 66, r * 72, 64, 64).to_image();
        let small = image::imageops::resize(&sub, 32, 32, image::imageops::FilterType::Nearest);
        unsee::shapes::analyse(small.as_raw(), 32, 32, 3)
    };
    use unsee::shapes::Shape;
    for c in 0..2 {
        let (before, after) = (cell(0, c), cell(1, c));
        assert!(before.iter().any(|d| d.shape == Shape::Circle), "column {c}: no circle before erasure: {before:?}");
        assert!(!after.iter().any(|d| d.shape == Shape::Circle), "column {c}: a circle after erasure: {after:?}");
        eprintln!("column {c}: before {:?}, after {:?}", before.iter().map(|d| d.shape).collect::<Vec<_>>(),
                  after.iter().map(|d| d.shape).collect::<Vec<_>>());
    }
    let info = Command::new(env!("CARGO_BIN_EXE_unsee")).args(["info", "--device", "cpu"]).env_remove("UNSEE_MODEL")
        .output().unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("shapes-sd"), "{}", stderr(&info));
}

/// `unsee serve` from the command line: it says where it listens and answers there; a bad address is a usage
/// error, a zero queue or a taken port a clean error.
#[test]
fn serve_starts_and_refuses_bad_options() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_unsee"))
        .args(["serve", "--device", "cpu", "--addr", "127.0.0.1:0"])
        .env("UNSEE_MODEL", model_dir("tiny"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let mut addr = None;
    for line in std::io::BufReader::new(err).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.split("serving on http://").nth(1) {
            addr = Some(rest.split_whitespace().next().unwrap().to_string());
            break;
        }
    }
    let addr: std::net::SocketAddr = addr.expect("no 'serving on' line").parse().unwrap();
    let r = common::http::get(addr, "/sdapi/v1/sd-models");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()[0]["model_name"], "tiny-sd");
    // the same port again: taken
    fails_with(&["serve", "--device", "cpu", "--addr", &addr.to_string()], "Address already in use");
    child.kill().unwrap();
    let _ = child.wait();

    let o = unsee(&["serve", "--addr", "localhost-ish"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    fails_with(&["serve", "--device", "cpu", "--queue", "0"], "at least 1");
    let spec = common::repo().join("models/specs/objects.toml");
    fails_with(&["erase", "--spec", &spec.display().to_string(), "--out", &tmp("bsf").join("e.safetensors").display().to_string(),
                 "--bake-single-file", &tmp("bsf").join("model.ckpt").display().to_string()], "must end in .safetensors");
}

/// `unsee attack` on the default shapes model with a small budget: it prints what it found and the oracle's share,
/// writes the pictures and the embedding; bad options are refused before any work. `audit --attack` adds the
/// section; `convert` writes a text encoder the model loads.
#[test]
fn attack_audit_and_convert_from_the_cli() {
    let d = tmp("attack");
    let spec = repo().join("models/specs/shapes-circle.toml");
    let spec = spec.to_str().unwrap();
    let shapes = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_unsee")).args(args).env_remove("UNSEE_MODEL").output().unwrap()
    };
    let o = shapes(&["attack", "--device", "cpu", "--spec", spec, "--method", "prompt", "--runs", "2",
                     "--timesteps", "2", "--iterations", "3", "--guidance", "4", "--out", d.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.contains("judged by the shapes oracle") && out.contains("circle"), "{out}");
    assert!(d.join("run-00.png").is_file() && d.join("run-01.png").is_file());

    let emb = d.join("v.safetensors");
    let o = shapes(&["attack", "--device", "cpu", "--spec", spec, "--method", "inversion", "--runs", "2",
                     "--inversion-steps", "5", "--inversion-targets", "2", "--guidance", "4", "--json",
                     "--save-embedding", emb.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["method"], "inversion");
    assert_eq!(report["runs"].as_array().unwrap().len(), 2);
    assert!(emb.is_file());

    fails_with(&["attack", "--spec", spec, "--method", "prompt", "--save-embedding", "x.safetensors"],
               "go with --method inversion");
    fails_with(&["attack", "--spec", spec, "--runs", "0"], "runs must be");
    fails_with(&["attack", "--spec", spec, "--tokens", "0"], "tokens must be");
    fails_with(&["attack", "--spec", spec, "--method", "nonsense"], "invalid value");
    fails_with(&["attack", "--spec", spec, "--out", "/nonexistent-folder"], "not a folder");
    fails_with(&["attack", "--spec", spec, "--method", "inversion", "--load-embedding", spec], "corrupt or unreadable");

    let o = shapes(&["audit", "--device", "cpu", "--spec", spec, "--attack", "embedding", "--attack-runs", "2",
                     "--attack-guidance", "4"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("| embedding | raw conditioning"), "{out}");

    // convert: a checkpoint that is not a PyTorch file is refused; a generated AdvUnlearn-layout one converts.
    fails_with(&["convert", "--checkpoint", spec, "--out", d.join("te").to_str().unwrap()], "not a PyTorch checkpoint");
    let ck = d.join("ckpt");
    let status = Command::new("python3").arg(repo().join("tests/reference/make_torch_checkpoints.py"))
        .arg(model_dir("tiny").join("text_encoder")).arg(&ck).status().unwrap();
    assert!(status.success());
    let te = d.join("te");
    let delta = d.join("te-delta.safetensors");
    let o = unsee(&["convert", "--device", "cpu", "--checkpoint", ck.join("hf").to_str().unwrap(),
                    "--out", te.to_str().unwrap(), "--delta", delta.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(te.join("model.safetensors").is_file() && te.join("config.json").is_file());
    let o = unsee(&["info", "--device", "cpu", "--text-encoder", delta.to_str().unwrap()]);
    assert!(o.status.success(), "the fp16 delta loads: {}", stderr(&o));
    fails_with(&["convert", "--checkpoint", ck.join("evil-system.pt").to_str().unwrap(),
                 "--out", d.join("evil").to_str().unwrap()], "system");
    assert!(!d.join("evil").exists(), "nothing is written for a refused checkpoint");
}
