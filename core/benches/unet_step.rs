//! UNet step and VAE decode time and peak RSS on the CPU, unsee (burn flex) against diffusers/PyTorch measured in
//! the same run.
//!
//! ```text
//! cargo bench --bench unet_step                      # tiny + small, unsee only
//! UNSEE_BENCH_PYTHON=tests/reference/.venv/bin/python \
//! UNSEE_BENCH_SD15=/path/to/sd15-random \
//!   cargo bench --bench unet_step                    # + full-size SD-1.5 (written there if absent) and PyTorch
//! ```
//!
//! One UNet step = one forward on a batch of 2 (classifier-free guidance); one VAE decode = batch 1; f32, at 256²
//! and 512² (latents 32² and 64²). Every configuration runs in its own process (load included), so peak RSS is
//! per configuration. Reported: median over `UNSEE_BENCH_STEPS` (default 3) timed runs after one warm-up run.
//! Part `generate` is one whole generate (load, prompt encoding, `UNSEE_BENCH_GEN_STEPS` DDIM steps with CFG,
//! decode; default 2 steps) against a diffusers `StableDiffusionPipeline` built from the same folder: its time is
//! the whole run and its peak RSS the pipeline's. `UNSEE_BENCH_ONLY` keeps the models whose name contains it;
//! `UNSEE_BENCH_PARTS` is a comma list of `unet`, `vae`, `generate`, and `unet-burn`/`vae-burn` (burn flex's own
//! attention and group norm instead of unsee's CPU kernels, [`unsee::kernels`]; no PyTorch column) (default:
//! `unet,vae`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};

mod common;
use common::{Role, cpu, env, peak_rss_mib, role, run_child, write_random_sd15};

/// A deterministic pseudo-random tensor (no RNG state shared with anything else).
fn wave<const D: usize>(shape: [usize; D], f: f32, device: &burn::tensor::Device) -> Tensor<D> {
    let n = shape.iter().product::<usize>();
    let v: Vec<f32> = (0..n).map(|i| ((i as f32) * f).sin()).collect();
    Tensor::from_data(TensorData::new(v, shape), device)
}

/// Child for `generate`: one whole run from opening the model to the decoded image.
fn generate(model: &Path, size: usize) {
    let t = Instant::now();
    let e = Engine::open(&EngineOptions { model: model.to_path_buf(), device: DeviceChoice::Cpu,
                                          ..EngineOptions::default() }).unwrap();
    let req = GenerateRequest { prompt: "a photograph of an astronaut riding a horse".into(),
                                steps: env("UNSEE_BENCH_GEN_STEPS", 2), guidance: 7.5, seed: 7, width: Some(size),
                                height: Some(size), ..GenerateRequest::default() };
    let g = e.generate(&req, Inputs::default(), &mut |_| Control::Continue, Target::Latents).unwrap();
    let mut rgba = vec![0u8; size * size * 4];
    // Random full-size VAE weights can overflow to Inf; the decode is timed and measured either way.
    let _ = e.model().decode_rgba_into(g.latents, &mut rgba);
    let s = t.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({"median_s": s, "min_s": s, "peak_rss_mib": peak_rss_mib()}));
}

/// Child: load one part, time it, print a JSON line.
fn child(model: &Path, part: &str, size: usize, steps: usize) {
    if part == "generate" {
        return generate(model, size);
    }
    // `unet-burn`/`vae-burn`: the same with burn flex's own ops instead of unsee's kernels (`unsee::kernels`).
    let part = match part.strip_suffix("-burn") {
        Some(p) => {
            unsee::kernels::set_enabled(false);
            p
        }
        None => part,
    };
    let dev = cpu();
    let lat = size / 8;
    let run: Box<dyn Fn()> = if part == "unet" {
        let (unet, cfg) = unsee::load::load_unet(model, &dev).unwrap();
        let x = wave([2, cfg.in_channels, lat, lat], 0.618, &dev.device);
        let ctx = wave([2, 77, cfg.cross_attention_dim], 0.37, &dev.device);
        Box::new(move || {
            let _ = unet.forward(x.clone(), 500.0, &ctx).into_data();
        })
    } else {
        let (vae, cfg) = unsee::load::load_vae(model, &dev).unwrap();
        let z = wave([1, cfg.latent_channels, lat, lat], 0.618, &dev.device);
        Box::new(move || {
            let _ = vae.decode(z.clone()).into_data();
        })
    };
    let time = || {
        let t0 = Instant::now();
        run();
        t0.elapsed().as_secs_f64()
    };
    time();
    let mut times: Vec<f64> = (0..steps).map(|_| time()).collect();
    times.sort_by(f64::total_cmp);
    println!("{}", serde_json::json!({"median_s": times[times.len() / 2], "min_s": times[0],
                                      "peak_rss_mib": peak_rss_mib()}));
}

fn torch(python: &str, repo: &Path, model: &Path, part: &str, size: usize, steps: usize, threads: usize)
    -> Option<serde_json::Value> {
    let o = Command::new(python)
        .env("UNSEE_BENCH_GEN_STEPS", env("UNSEE_BENCH_GEN_STEPS", 2usize).to_string())
        .args([repo.join("tests/reference/bench_torch.py").to_str().unwrap(), model.to_str().unwrap(),
               &size.to_string(), &steps.to_string(), &threads.to_string(), part])
        .output().ok()?;
    let v = String::from_utf8_lossy(&o.stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok());
    if v.is_none() {
        eprintln!("{} {part} {size}: PyTorch run failed:\n{}", model.display(), String::from_utf8_lossy(&o.stderr));
    }
    v
}

fn main() {
    match role() {
        Role::List => return,
        Role::Child(a) => return child(Path::new(&a[0]), &a[1], a[2].parse().unwrap(), a[3].parse().unwrap()),
        Role::Parent => {}
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let steps: usize = env("UNSEE_BENCH_STEPS", 3);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut models = vec![("tiny", repo.join("models/tiny-sd")), ("small", repo.join("tests/fixtures/small-sd"))];
    if let Ok(p) = std::env::var("UNSEE_BENCH_SD15") {
        let p = PathBuf::from(p);
        if !p.join("unet/diffusion_pytorch_model.safetensors").is_file() {
            write_random_sd15(&p);
        }
        models.push(("sd15 (random)", p));
    }
    let only: String = env("UNSEE_BENCH_ONLY", String::new());
    let parts: String = env("UNSEE_BENCH_PARTS", "unet,vae".to_string());
    let python = std::env::var("UNSEE_BENCH_PYTHON").ok();

    println!("UNet step (batch 2) and VAE decode (batch 1), f32, CPU, {threads} threads, median of {steps} after 1 \
              warm-up; generate: one whole run of {} DDIM steps\n", env("UNSEE_BENCH_GEN_STEPS", 2usize));
    println!("| model | part | size | unsee ms | unsee peak RSS MiB | PyTorch ms | PyTorch peak RSS MiB \
              | PyTorch time / unsee time | unsee RSS / PyTorch RSS |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, dir) in models.iter().filter(|(n, _)| n.contains(only.as_str())) {
        for part in parts.split(',').filter(|p| ["unet", "vae", "generate", "unet-burn", "vae-burn"].contains(p)) {
            for size in [256usize, 512] {
                let r = match run_child(&[dir.to_str().unwrap(), part, &size.to_string(), &steps.to_string()]) {
                    Ok(r) => r,
                    Err(status) => {
                        println!("| {name} | {part} | {size}² | failed: {status} | | | | | |");
                        continue;
                    }
                };
                let (rust_s, rust_rss) = (r["median_s"].as_f64().unwrap(), r["peak_rss_mib"].as_f64().unwrap());
                let t = python.as_deref().filter(|_| !part.ends_with("-burn"))
                    .and_then(|py| torch(py, &repo, dir, part, size, steps, threads));
                let (t_ms, t_rss, ratio, rss_ratio) = match t {
                    Some(t) => {
                        let (ts, trss) = (t["median_s"].as_f64().unwrap(), t["peak_rss_mib"].as_f64().unwrap());
                        (format!("{:.1}", ts * 1e3), format!("{trss:.0}"), format!("{:.2}", ts / rust_s),
                         format!("{:.2}", rust_rss / trss))
                    }
                    None => ("–".into(), "–".into(), "–".into(), "–".into()),
                };
                println!("| {name} | {part} | {size}² | {:.1} | {rust_rss:.0} | {t_ms} | {t_rss} | {ratio} | {rss_ratio} |",
                         rust_s * 1e3);
            }
        }
    }
}
