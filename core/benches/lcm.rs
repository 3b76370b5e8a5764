//! Few-step sampling (#15): a full generate with 20 DDIM steps on the base model against 4 LCM steps with an
//! LCM-LoRA-shaped LoRA merged, measured in the same run, each in its own process (load, merge, denoise, decode,
//! peak RSS).
//!
//! The model is full-size SD-1.5 with random weights (`models/sd15-config`, written once to `$UNSEE_LCM_DIR`,
//! default a temp folder); the LoRA has LCM-LoRA's shape — rank 64 on every Linear and Conv2d of the UNet's blocks,
//! kohya names — with random values, so the timings are real and the pictures are not.
//!
//! With `UNSEE_BENCH_PYTHON` (a Python with tests/reference/requirements.txt and peft), each run is also timed in
//! diffusers (`tests/reference/bench_torch.py ... staged`: the same model, scheduler, steps, guidance, size and LoRA,
//! f32, the same thread count) in the same bench run.
//!
//! ```text
//! UNSEE_BENCH_PYTHON=tests/reference/.venv/bin/python \
//!   cargo bench --profile dev --bench lcm    # UNSEE_LCM_SIZE (512), UNSEE_LCM_DIR
//! ```

mod common;

use std::path::{Path, PathBuf};
use std::time::Instant;

use common::{Role, env, peak_rss_mib, role, run_child, write_random_sd15};
use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::lora::LoraSpec;
use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
use unsee::scheduler::SchedulerKind;
use unsee::weights::OwnedTensor;

const RANK: usize = 64;

/// A kohya LoRA of rank 64 on every Linear/Conv2d weight inside the UNet's down, mid and up blocks (what LCM-LoRA
/// for SD-1.5 adapts), N(0, 0.01²) factors from a fixed seed. Returns (file, adapted layers, LoRA parameters).
fn write_lcm_shaped_lora(model: &Path, out: &Path) -> (usize, usize) {
    use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot};
    use rand::{Rng, SeedableRng};
    let cfg = unsee::model::read_config(model, "unet", "config.json").unwrap();
    let unet = unsee::unet::UNet2DConditionModel::new(&cfg, &common::cpu().device).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(15);
    let mut tensors = vec![];
    let (mut layers, mut params) = (0, 0);
    for t in unet.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true) {
        let shape = t.shape.as_slice().to_vec();
        let Some(path) = t.name.strip_suffix(".weight") else { continue };
        if !(matches!(shape.len(), 2 | 4) && ["down_blocks.", "mid_block.", "up_blocks."].iter().any(|p| path.starts_with(p))) {
            continue;
        }
        let key = format!("lora_unet_{}", path.replace('.', "_"));
        let fan_in: usize = shape[1..].iter().product();
        let mut random = |n: usize| (0..n).map(|_| (rng.random::<f32>() - 0.5) * 0.035).collect::<Vec<f32>>();
        let mut down_shape = vec![RANK];
        down_shape.extend_from_slice(&shape[1..]);
        let up_shape = if shape.len() == 4 { vec![shape[0], RANK, 1, 1] } else { vec![shape[0], RANK] };
        tensors.push(OwnedTensor::f32(format!("{key}.lora_down.weight"), down_shape, &random(RANK * fan_in)));
        tensors.push(OwnedTensor::f32(format!("{key}.lora_up.weight"), up_shape, &random(shape[0] * RANK)));
        tensors.push(OwnedTensor::f32(format!("{key}.alpha"), vec![], &[RANK as f32 / 8.0]));
        layers += 1;
        params += RANK * (fan_in + shape[0]);
    }
    // LCM-LoRA ships in f16.
    let tensors: Vec<OwnedTensor> = tensors.into_iter().map(|t| {
        let v: Vec<u8> = t.bytes.chunks_exact(4)
            .flat_map(|b| half::f16::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]])).to_le_bytes()).collect();
        OwnedTensor { dtype: safetensors::Dtype::F16, bytes: v, ..t }
    }).collect();
    unsee::weights::write_safetensors(out, &tensors, None).unwrap();
    (layers, params)
}

/// The child: open (with the LoRA when given), one generate, a JSON line on stdout.
fn child(model: &Path, lora: Option<&Path>, scheduler: SchedulerKind, steps: usize, guidance: f64, size: usize) {
    let t = Instant::now();
    let e = Engine::open(&EngineOptions {
        model: model.to_path_buf(), device: DeviceChoice::Cpu,
        loras: lora.map(|p| vec![LoraSpec { path: p.to_path_buf(), scale: 1.0 }]).unwrap_or_default(),
        ..EngineOptions::default()
    }).unwrap();
    let load_s = t.elapsed().as_secs_f64();
    let req = GenerateRequest { prompt: "a photograph of an astronaut riding a horse".into(), steps, guidance, seed: 7,
                                width: Some(size), height: Some(size), scheduler, ..GenerateRequest::default() };
    let t = Instant::now();
    let g = e.generate(&req, Inputs::default(), &mut |_| Control::Continue, Target::Latents).unwrap();
    let denoise_s = t.elapsed().as_secs_f64();
    let (w, h) = e.model().image_size(&req).unwrap();
    let mut rgba = vec![0u8; w * h * 4];
    let t = Instant::now();
    // Random full-size VAE weights can overflow; the decode is timed either way.
    let decoded = e.decode_rgba_into(g.latents, &mut rgba).is_ok();
    let decode_s = t.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({"load_s": load_s, "denoise_s": denoise_s, "decode_s": decode_s,
                                      "decoded": decoded, "peak_rss_mib": peak_rss_mib()}));
}

fn main() {
    match role() {
        Role::List => return,
        Role::Child(a) => {
            let lora = (a[1] != "-").then(|| PathBuf::from(&a[1]));
            child(Path::new(&a[0]), lora.as_deref(), a[2].parse().unwrap(), a[3].parse().unwrap(),
                  a[4].parse().unwrap(), a[5].parse().unwrap());
            return;
        }
        Role::Parent => {}
    }
    let dir = std::env::var("UNSEE_LCM_DIR").map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("unsee-lcm-bench"));
    let model = dir.join("sd15-random");
    if !model.join("unet/diffusion_pytorch_model.safetensors").is_file() {
        let t = Instant::now();
        write_random_sd15(&model);
        eprintln!("wrote the random SD-1.5 in {:.0}s", t.elapsed().as_secs_f64());
    }
    let lora = dir.join("lcm-shaped-lora.safetensors");
    let (layers, params) = write_lcm_shaped_lora(&model, &lora);
    let size = env("UNSEE_LCM_SIZE", 512usize);
    println!("## full generate, full-size SD-1.5 (random weights), CPU f32, {size}², one process each\n");
    println!("LoRA: rank {RANK}, {layers} UNet layers, {:.1} M parameters, {:.0} MB (f16)\n", params as f64 / 1e6,
             std::fs::metadata(&lora).unwrap().len() as f64 / 1e6);
    let python = std::env::var("UNSEE_BENCH_PYTHON").ok();
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    println!("| run | load s (LoRA merge incl.) | denoise s | VAE decode s | total s | total vs DDIM-20 | peak RSS MiB \
              | PyTorch load / denoise / decode s | PyTorch total s | speed vs PyTorch | PyTorch peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    let mut reference = None;
    for (name, with_lora, sched, steps, guidance) in [
        ("DDIM, 20 steps, guidance 7.5, base model", false, "ddim", 20, 7.5),
        ("LCM, 4 steps, guidance 1.5 (CFG), LoRA merged", true, "lcm", 4, 1.5),
        ("LCM, 4 steps, guidance 1 (no CFG), LoRA merged", true, "lcm", 4, 1.0),
    ] {
        let lora_arg = if with_lora { lora.to_str().unwrap().to_string() } else { "-".into() };
        let args = [model.to_str().unwrap(), &lora_arg, sched, &steps.to_string(), &guidance.to_string(),
                    &size.to_string()];
        let j = match run_child(&args) {
            Ok(j) => j,
            Err(status) => {
                println!("| {name} | child failed: {status} | | | | | |");
                continue;
            }
        };
        let f = |k: &str| j[k].as_f64().unwrap();
        let total = f("load_s") + f("denoise_s") + f("decode_s");
        let r = *reference.get_or_insert(total);
        let torch = python.as_deref().and_then(|py| {
            let mut cmd = std::process::Command::new(py);
            cmd.args([repo.join("tests/reference/bench_torch.py").to_str().unwrap(), model.to_str().unwrap(),
                      &size.to_string(), &steps.to_string(), &threads.to_string(), "staged", sched,
                      &guidance.to_string()]);
            if with_lora {
                cmd.arg(&lora);
            }
            let o = cmd.output().ok()?;
            let v: Option<serde_json::Value> =
                String::from_utf8_lossy(&o.stdout).lines().rev().find_map(|l| serde_json::from_str(l).ok());
            if v.is_none() {
                eprintln!("{name}: PyTorch run failed:\n{}", String::from_utf8_lossy(&o.stderr));
            }
            v
        });
        let torch_cols = match &torch {
            Some(t) => {
                let g = |k: &str| t[k].as_f64().unwrap_or(f64::NAN);
                let tt = g("load_s") + g("denoise_s") + g("decode_s");
                format!("{:.1} / {:.1} / {:.1} | {tt:.1} | {:.2}× | {:.0}", g("load_s"), g("denoise_s"), g("decode_s"),
                        tt / total, g("peak_rss_mib"))
            }
            None => "– | – | – | –".into(),
        };
        println!("| {name} | {:.1} | {:.1} | {:.1}{} | {total:.1} | {:.2}× | {:.0} | {torch_cols} |", f("load_s"),
                 f("denoise_s"), f("decode_s"), if j["decoded"] == false { " (overflowed: random weights)" } else { "" },
                 total / r, f("peak_rss_mib"));
    }
}
