//! Hostile files, specs and requests (issue #16): one regression test per class of problem an adversarial pass
//! found. Each must give a clean, typed error (exit 1, usage errors 2) — no panic, no abort, no hang, no silent
//! success, nothing lost.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn unsee_in(args: &[&str], env: &[(&str, &Path)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_unsee"));
    c.args(args).env("RUST_LOG", "unsee=info,warn").env("UNSEE_MODEL", model_dir("tiny"));
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run unsee")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// Asserts a clean failure (exit 1 or 2, no panic) whose message contains `needle`.
fn refused(o: Output, what: &str, needle: &str) {
    let err = stderr(&o);
    assert!(matches!(o.status.code(), Some(1 | 2)), "{what}: expected a clean failure, got {:?}:\n{err}", o.status);
    assert!(!err.contains("panicked") && !err.contains("internal error"), "{what}: panic:\n{err}");
    assert!(err.contains(needle), "{what}: expected {needle:?} in:\n{err}");
}

fn fails_with(args: &[&str], needle: &str) {
    refused(unsee_in(args, &[]), &format!("{args:?}"), needle);
}

fn tmp(name: &str) -> PathBuf {
    tmp_dir("hostile", name)
}

/// A copy of `tiny-sd` with `edit` applied to the JSON file `rel`.
fn tiny_with(name: &str, rel: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let d = tmp(name).join("model");
    copy_dir(&model_dir("tiny"), &d);
    let p = d.join(rel);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, serde_json::to_string_pretty(&v).unwrap()).unwrap();
    d
}

fn info_fails(model: &Path, needle: &str) {
    fails_with(&["info", "--device", "cpu", "--model", model.to_str().unwrap()], needle);
}

fn generate_fails(model: &Path, extra: &[&str], needle: &str) {
    let out = model.parent().unwrap().join("out.png");
    let mut args = vec!["generate", "--device", "cpu", "--prompt", "x", "--steps", "2", "--model",
                        model.to_str().unwrap(), "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    fails_with(&args, needle);
    assert!(!out.exists(), "an image was written");
}

const SPEC: &str = "method = \"uce\"\npreserve = [\"Monet\"]\n[[erase]]\nconcept = \"Van Gogh\"\nreplace_with = \"art\"\n";

/// Class 1: a forged or corrupt preservation-Gram cache entry is recomputed, never trusted.
#[test]
fn a_forged_gram_cache_entry_is_not_trusted() {
    let d = tmp("gram");
    let cache = d.join("cache");
    let spec = d.join("spec.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let erase = |out: &Path| {
        let o = unsee_in(&["erase", "--device", "cpu", "--spec", spec.to_str().unwrap(), "--out", out.to_str().unwrap()],
                         &[("UNSEE_CACHE_DIR", &cache)]);
        assert!(o.status.success(), "{}", stderr(&o));
        // The factors (metadata order varies between writes).
        let bytes = std::fs::read(out).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut t: Vec<(String, Vec<u8>)> = st.tensors().into_iter().map(|(n, v)| (n, v.data().to_vec())).collect();
        t.sort();
        t
    };
    let first = erase(&d.join("a.safetensors"));
    let entries: Vec<PathBuf> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
    assert!(!entries.is_empty(), "nothing was cached");
    // A right-sized forgery of every entry: the erasure must come out the same (not a silent no-op).
    for e in &entries {
        let len = std::fs::metadata(e).unwrap().len() as usize;
        std::fs::write(e, vec![0u8; len]).unwrap();
    }
    assert!(erase(&d.join("b.safetensors")) == first, "a forged cache entry changed the erasure");
    // The cache folder is private.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o077, 0);
    }
}

/// Class 2: values that used to panic (indexing, division by zero, mismatched widths) are clean errors.
#[test]
fn bad_config_values_and_requests_are_errors_not_panics() {
    // 1,000 steps of a 1,000-step schedule with steps_offset 1 reach timestep 1000.
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--steps", "1000", "--out",
                 tmp("steps").join("x.png").to_str().unwrap()], "outside the model's schedule");
    info_fails(&tiny_with("groups", "unet/config.json", |v| v["norm_num_groups"] = 0.into()), "norm_num_groups");
    info_fails(&tiny_with("heads-len", "unet/config.json", |v| v["num_attention_heads"] = serde_json::json!([2])),
               "num_attention_heads");
    info_fails(&tiny_with("heads0", "unet/config.json", |v| v["attention_head_dim"] = 0.into()), "attention_head_dim");
    info_fails(&tiny_with("te-heads0", "text_encoder/config.json", |v| v["num_attention_heads"] = 0.into()),
               "num_attention_heads");
    info_fails(&tiny_with("betas", "scheduler/scheduler_config.json", |v| v["trained_betas"] = serde_json::json!([0.1, 0.2])),
               "trained_betas");
    info_fails(&tiny_with("te-width", "unet/config.json", |v| v["cross_attention_dim"] = 48.into()), "cross-attention");
    info_fails(&tiny_with("eos", "text_encoder/config.json", |v| v["vocab_size"] = 49407.into()), "vocab_size");
    info_fails(&tiny_with("maxlen", "tokenizer/tokenizer_config.json", |v| v["model_max_length"] = 100.into()),
               "positions");
    // A length with no room for a prompt is an error, not a silent fall-back to 77 (transformers' "no limit"
    // sentinel, int(1e30), still means CLIP's 77).
    info_fails(&tiny_with("maxlen0", "tokenizer/tokenizer_config.json", |v| v["model_max_length"] = 0.into()),
               "model_max_length");
    let dir = tiny_with("tok-dir", "tokenizer/tokenizer_config.json", |_| {});
    std::fs::remove_file(dir.join("tokenizer/tokenizer_config.json")).unwrap();
    std::fs::create_dir(dir.join("tokenizer/tokenizer_config.json")).unwrap();
    info_fails(&dir, "not a regular file");
    info_fails(&tiny_with("maxlen-str", "tokenizer/tokenizer_config.json", |v| v["model_max_length"] = "77".into()),
               "model_max_length");
    info_fails(&tiny_with("latent", "vae/config.json", |v| v["latent_channels"] = 3.into()), "latent");
    // 10,000 concepts with TIME (77 keys each).
    let d = tmp("time");
    let mut spec = String::from("method = \"time\"\n");
    for i in 0..10_000 {
        spec.push_str(&format!("[[erase]]\nconcept = \"thing {i}\"\n"));
    }
    std::fs::write(d.join("spec.toml"), spec).unwrap();
    fails_with(&["erase", "--device", "cpu", "--spec", d.join("spec.toml").to_str().unwrap(), "--out",
                 d.join("e.safetensors").to_str().unwrap()], "keys: more than");
}

/// Class 3: counts that used to abort the process on allocation are refused before allocating.
#[test]
fn huge_counts_are_refused_before_allocating() {
    info_fails(&tiny_with("lpb", "unet/config.json", |v| v["layers_per_block"] = 1_000_000_000u64.into()),
               "layers_per_block");
    info_fails(&tiny_with("vae-lpb", "vae/config.json", |v| v["layers_per_block"] = 1_000_000_000u64.into()),
               "layers_per_block");
    info_fails(&tiny_with("layers", "text_encoder/config.json", |v| v["num_hidden_layers"] = 1_000_000_000u64.into()),
               "num_hidden_layers");
    info_fails(&tiny_with("timesteps", "scheduler/scheduler_config.json",
                          |v| v["num_train_timesteps"] = 1_000_000_000_000u64.into()), "num_train_timesteps");
    fails_with(&["grid", "--device", "cpu", "--prompt", "x", "--seeds", "1000000000000"], "images per model");
    fails_with(&["generate", "--device", "cpu", "--prompt", "x", "--width", "4096", "--height", "4096", "--steps", "20"],
               "budget");

}

/// Class 4: outputs are atomic, and `--bake` neither copies a folder into itself nor opens a FIFO.
#[test]
fn outputs_are_atomic_and_bake_refuses_loops_and_fifos() {
    let d = tmp("atomic");
    let spec = d.join("spec.toml");
    std::fs::write(&spec, SPEC).unwrap();
    let out = d.join("e.safetensors");
    std::fs::write(&out, b"the previous file").unwrap();
    // A failing run (a mismatched erasure) leaves the previous file as it was.
    let bogus = d.join("bogus.safetensors");
    std::fs::write(&bogus, b"not safetensors").unwrap();
    refused(unsee_in(&["erase", "--device", "cpu", "--spec", spec.to_str().unwrap(), "--erasure",
                       bogus.to_str().unwrap(), "--out", out.to_str().unwrap()], &[]), "bad --erasure", "safetensors");
    assert_eq!(std::fs::read(&out).unwrap(), b"the previous file");
    // A bake into the model's own folder is refused, and nothing is left behind.
    let model = d.join("model");
    copy_dir(&model_dir("tiny"), &model);
    let inside = model.join("baked");
    refused(unsee_in(&["erase", "--device", "cpu", "--model", model.to_str().unwrap(), "--spec", spec.to_str().unwrap(),
                       "--out", d.join("x.safetensors").to_str().unwrap(), "--bake", inside.to_str().unwrap()], &[]),
            "bake inside", "inside the model folder");
    assert!(!inside.exists());
    // A FIFO in the model folder is refused, not opened (which would hang).
    #[cfg(unix)]
    {
        let fifo = model.join("unet").join("pipe");
        assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let baked = d.join("baked");
        refused(unsee_in(&["erase", "--device", "cpu", "--model", model.to_str().unwrap(), "--spec",
                           spec.to_str().unwrap(), "--out", d.join("y.safetensors").to_str().unwrap(), "--bake",
                           baked.to_str().unwrap()], &[]), "bake with a FIFO", "not a regular file");
        assert!(!baked.exists(), "a partial bake was left behind");
        assert!(std::fs::read_dir(&d).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().contains("baking")));
    }
}

/// Class 5: inputs that used to give a black image with exit 0 are refused, and NaN output is an error.
#[test]
fn no_silent_black_images() {
    generate_fails(&tiny_with("scaling0", "vae/config.json", |v| v["scaling_factor"] = 0.0.into()), &[],
                   "scaling_factor");
    generate_fails(&tiny_with("betas1", "scheduler/scheduler_config.json", |v| v["beta_end"] = 1.5.into()), &[],
                   "beta_end");
    generate_fails(&model_dir("tiny"), &["--guidance", "1e300"], "guidance");
    // A scaling factor that passes validation but overflows the decoder's input: NaN/Inf output is an error.
    generate_fails(&tiny_with("scaling-huge", "vae/config.json", |v| v["scaling_factor"] = 1e30.into()), &[],
                   "scaling_factor");
    generate_fails(&tiny_with("scaling-tiny", "vae/config.json", |v| v["scaling_factor"] = 1e-38.into()), &[],
                   "NaN or Inf");
    let d = tmp("latents");
    let p = d.join("l.safetensors");
    let mut v = vec![0.0f32; 4 * 8 * 8];
    v[0] = 3e38;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 4, 8, 8], &bytes).unwrap();
    safetensors::serialize_to_file(vec![("latents".to_string(), view)], None, &p).unwrap();
    generate_fails(&model_dir("tiny"), &["--init-latents", p.to_str().unwrap()], "magnitude");
}

/// Class 6: a spec reads only regular, small files inside its own folder.
#[test]
fn a_spec_reads_only_small_regular_files_in_its_folder() {
    let d = tmp("specfiles");
    let run = |name: &str, line: &str| {
        let spec = d.join(format!("{name}.toml"));
        std::fs::write(&spec, format!("method = \"uce\"\n{line}\n[[erase]]\nconcept = \"x\"\n")).unwrap();
        unsee_in(&["audit", "--device", "cpu", "--spec", spec.to_str().unwrap()], &[])
    };
    refused(run("abs", "preserve_file = \"/etc/passwd\""), "absolute", "relative path inside");
    refused(run("up", "templates = \"../spec.toml\""), "parent", "relative path inside");
    std::fs::write(d.join("big.txt"), "a {}\n".repeat(300_000)).unwrap();
    refused(run("big", "templates = \"big.txt\""), "big", "larger than");
    #[cfg(unix)]
    {
        assert!(Command::new("mkfifo").arg(d.join("fifo")).status().unwrap().success());
        refused(run("fifo", "preserve_file = \"fifo\""), "fifo", "not a regular file");
        std::os::unix::fs::symlink("/etc/hostname", d.join("link.txt")).unwrap();
        refused(run("link", "preserve_file = \"link.txt\""), "symlink out", "leads outside");
    }
}

/// Class 7: an erasure file cannot claim what it does not do: altered claims, zero factors and absurd magnitudes
/// are refused.
#[test]
fn erasure_files_cannot_lie_about_what_they_do() {
    use unsee::device::{DeviceChoice, select};
    use unsee::erase::{erase, file, spec::Spec};
    use unsee::load::{LoadOptions, StableDiffusion};
    let d = tmp("claims");
    let dev = select(DeviceChoice::Cpu, unsee::weights::Precision::F32).unwrap();
    let base = StableDiffusion::load(&model_dir("tiny"), dev, &LoadOptions::default()).unwrap();
    let mut sd = base.clone();
    let edit = erase(&mut sd, &Spec::parse(SPEC, Path::new("spec.toml")).unwrap()).unwrap();
    let good = d.join("good.safetensors");
    file::save(&edit, &good).unwrap();
    file::apply_file(&mut base.clone(), &good).unwrap();

    // The same factors claiming another concept.
    let bytes = std::fs::read(&good).unwrap();
    let (n, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut md = meta.metadata().clone().unwrap();
    md.insert("concepts".into(), "[\"nudity\"]".into());
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let lie = d.join("lie.safetensors");
    safetensors::serialize_to_file(st.tensors(), Some(md), &lie).unwrap();
    let _ = n;
    let e = file::apply_file(&mut base.clone(), &lie).unwrap_err();
    assert!(matches!(e, unsee::Error::InvalidErasureFile { .. }) && e.to_string().contains("factors_sha256"), "{e}");

    // Factors of a 60,000 × 60,000 matrix (a 29 GB product) in a tiny file: refused before any product is formed.
    let col = vec![0u8; 60_000 * 4];
    let views = vec![
        ("unet.m.R".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![60_000, 1], &col).unwrap()),
        ("unet.m.X".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![60_000, 1], &col).unwrap()),
    ];
    let meta = std::collections::HashMap::from([
        ("format".to_string(), "unsee-erasure".to_string()), ("version".to_string(), "2".to_string()),
        ("base_hashes".to_string(), "{\"unet.m\": \"x\"}".to_string()),
    ]);
    let big = d.join("big.safetensors");
    safetensors::serialize_to_file(views, Some(meta), &big).unwrap();
    let e = file::load(&big).unwrap_err();
    assert!(e.to_string().contains("larger than any unsee edits"), "{e}");

    // Zero factors (a well-formed file that does nothing) and factors ×1e30.
    for (name, scale, needle) in [("zero", 0.0, "empty, zero"), ("huge", 1e20, "× the matrix")] {
        let mut scaled = edit.clone();
        for delta in &mut scaled.deltas {
            delta.r = &delta.r * scale;
        }
        let p = d.join(format!("{name}.safetensors"));
        file::save(&scaled, &p).unwrap();
        let e = file::apply_file(&mut base.clone(), &p).unwrap_err();
        assert!(matches!(e, unsee::Error::InvalidErasureFile { .. }) && e.to_string().contains(needle), "{name}: {e}");
    }
}

/// `--bake` with several erasures in effect writes all of them (summed per matrix), equal to applying the files.
#[test]
fn bake_writes_every_erasure_in_effect() {
    use unsee::engine::{Engine, EngineOptions};
    use unsee::erase::spec::Spec;
    let d = tmp("bake-all");
    let mut engine = Engine::open(&EngineOptions {
        model: model_dir("tiny"), device: unsee::device::DeviceChoice::Cpu, ..Default::default()
    }).unwrap();
    let a = Spec::parse(SPEC, Path::new("a.toml")).unwrap();
    let b = Spec::parse("method = \"uce\"\n[[erase]]\nconcept = \"Monet\"\nreplace_with = \"art\"\n",
                        Path::new("b.toml")).unwrap();
    engine.erase(&a, None).unwrap();
    engine.erase(&b, None).unwrap();
    let out = d.join("baked");
    engine.bake(&out).unwrap();
    let baked = Engine::open(&EngineOptions { model: out, device: unsee::device::DeviceChoice::Cpu, ..Default::default() })
        .unwrap();
    let names = unsee::erase::cross_attention_names(&engine.model().unet, &["to_k".into(), "to_v".into()]);
    let base = Engine::open(&EngineOptions { model: model_dir("tiny"), device: unsee::device::DeviceChoice::Cpu,
                                             ..Default::default() }).unwrap();
    let (mut worst, mut moved): (f64, f64) = (0.0, 0.0);
    for n in &names {
        let read = |e: &Engine| unsee::erase::read_matrix(e.model(), unsee::erase::Component::Unet, n).unwrap();
        let (want, got) = (read(&engine), read(&baked));
        worst = worst.max(unsee::erase::linalg::frob(&(&want - &got)));
        moved = moved.max(unsee::erase::linalg::frob(&(&read(&base) - &want)));
    }
    assert!(moved > 1e-3, "the erasures changed nothing");
    assert!(worst < 1e-4, "the baked weights differ from the engine's by {worst:e} (an erasure was lost?)");
}

/// Cancellation is honoured inside a step (between the UNet's blocks), not only between steps.
#[test]
fn cancellation_stops_a_step_part_way() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use unsee::device::{DeviceChoice, select};
    use unsee::load::{LoadOptions, StableDiffusion};
    use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
    let dev = select(DeviceChoice::Cpu, unsee::weights::Precision::F32).unwrap();
    let sd = StableDiffusion::load(&model_dir("tiny"), dev, &LoadOptions::default()).unwrap();
    let asked = AtomicUsize::new(0);
    let cancelled = || asked.fetch_add(1, Ordering::SeqCst) >= 2; // yes after the second block of step 1
    let mut steps = 0;
    let req = GenerateRequest { prompt: "x".into(), steps: 3, ..Default::default() };
    let r = sd.generate(&req, Inputs { cancelled: Some(&cancelled), ..Default::default() },
                        &mut |_| { steps += 1; Control::Continue }, Target::Rgba);
    assert!(matches!(r, Err(unsee::Error::Cancelled)), "{:?}", r.err());
    assert_eq!(steps, 0, "the first step completed");
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    // Above the work budget: refused, unless forced (then it starts, and is cancelled at once here).
    let huge = GenerateRequest { width: Some(1024), height: Some(1024), steps: 300, ..req.clone() };
    let r = sd.generate(&huge, Inputs::default(), &mut |_| Control::Continue, Target::Latents);
    assert!(r.err().unwrap().to_string().contains("budget"));
    let always = || true;
    let r = sd.generate(&huge, Inputs { cancelled: Some(&always), over_budget: true, ..Default::default() },
                        &mut |_| Control::Continue, Target::Latents);
    assert!(matches!(r, Err(unsee::Error::Cancelled)), "{:?}", r.err());
    // Never cancelled: the same result as without the check.
    let never = || false;
    let a = sd.generate(&req, Inputs { cancelled: Some(&never), ..Default::default() }, &mut |_| Control::Continue,
                        Target::Rgba).unwrap();
    let b = sd.generate(&req, Inputs::default(), &mut |_| Control::Continue, Target::Rgba).unwrap();
    assert_eq!(a.rgba, b.rgba);
}

/// Errors name the real cause: a config that is a FIFO or a folder is "not a regular file" (not a missing
/// component, and never opened: a FIFO would block), an `--erasure` or `--lora` that is a folder likewise (not
/// "No such device" from mapping it), and a missing LoRA is a LoRA error (not "model not found").
#[cfg(unix)]
#[test]
fn errors_name_the_real_cause() {
    let d = tmp("causes");
    let model = d.join("model");
    copy_dir(&model_dir("tiny"), &model);
    let config = model.join("unet").join("config.json");
    std::fs::remove_file(&config).unwrap();
    assert!(Command::new("mkfifo").arg(&config).status().unwrap().success());
    info_fails(&model, "not a regular file");
    std::fs::remove_file(&config).unwrap();
    std::fs::create_dir(&config).unwrap();
    info_fails(&model, "not a regular file");
    let folder = d.join("folder.safetensors");
    std::fs::create_dir_all(&folder).unwrap();
    let out = d.join("x.png");
    let generate = |flag: &str, value: &Path| {
        vec!["generate".to_string(), "--device".into(), "cpu".into(), "--prompt".into(), "x".into(), "--steps".into(),
             "1".into(), flag.into(), value.to_str().unwrap().into(), "--out".into(), out.to_str().unwrap().into()]
    };
    for flag in ["--erasure", "--lora"] {
        let args = generate(flag, &folder);
        fails_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), "not a regular file");
    }
    let args = generate("--lora", &d.join("absent.safetensors"));
    fails_with(&args.iter().map(String::as_str).collect::<Vec<_>>(), "not a usable LoRA: no such file");
    assert!(!out.exists());
}
