//! UNet step time and peak RSS on the CPU, unsee (burn flex) against diffusers/PyTorch measured in the same run.
//!
//! ```text
//! cargo bench --bench unet_step                      # tiny + small, unsee only
//! UNSEE_BENCH_PYTHON=.venv/bin/python \
//! UNSEE_BENCH_SD15=/path/to/sd15-random \
//!   cargo bench --bench unet_step                    # + full-size SD-1.5 and the PyTorch ratio
//! ```
//!
//! One step = one UNet forward on a batch of 2 (classifier-free guidance), f32, at 256² and 512² (latents 32² and
//! 64²). Every configuration runs in its own process so peak RSS is per configuration. Reported: median over
//! `UNSEE_BENCH_STEPS` (default 3) timed steps after one warm-up step.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use unsee::device::{DeviceChoice, select};
use unsee::weights::Precision;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// Child mode: time one configuration and print a JSON line.
fn child(model: &str, size: usize, steps: usize) {
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let (unet, cfg) = unsee::load::load_unet(&PathBuf::from(model), &dev).unwrap();
    let lat = size / 8;
    let n = 2 * cfg.in_channels * lat * lat;
    let x: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).sin()).collect();
    let x = Tensor::<4>::from_data(TensorData::new(x, [2, cfg.in_channels, lat, lat]), &dev.device);
    let c: Vec<f32> = (0..2 * 77 * cfg.cross_attention_dim).map(|i| ((i as f32) * 0.37).cos()).collect();
    let ctx = Tensor::<3>::from_data(TensorData::new(c, [2, 77, cfg.cross_attention_dim]), &dev.device);
    let run = || {
        let t0 = Instant::now();
        let y = unet.forward(x.clone(), 500.0, &ctx);
        let _ = y.into_data(); // wait for the result
        t0.elapsed().as_secs_f64()
    };
    run();
    let mut times: Vec<f64> = (0..steps).map(|_| run()).collect();
    times.sort_by(f64::total_cmp);
    println!(
        "{}",
        serde_json::json!({"median_s": times[times.len() / 2], "min_s": times[0], "peak_rss_mib": peak_rss_mib()})
    );
}

fn last_json_line(out: &[u8]) -> Option<serde_json::Value> {
    String::from_utf8_lossy(out).lines().rev().find_map(|l| serde_json::from_str(l).ok())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() >= 5 && args[1] == "--child" {
        child(&args[2], args[3].parse().unwrap(), args[4].parse().unwrap());
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let steps: usize = std::env::var("UNSEE_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut models = vec![
        ("tiny", repo.join("models/tiny-sd")),
        ("small", repo.join("tests/fixtures/small-sd")),
    ];
    if let Ok(p) = std::env::var("UNSEE_BENCH_SD15") {
        models.push(("sd15 (random)", PathBuf::from(p)));
    }
    let python = std::env::var("UNSEE_BENCH_PYTHON").ok();
    let me = std::env::current_exe().unwrap();

    println!("UNet step (batch 2, f32, CPU, {threads} threads), median of {steps} after 1 warm-up\n");
    println!("| model | size | unsee ms/step | unsee peak RSS MiB | PyTorch ms/step | PyTorch peak RSS MiB | PyTorch time / unsee time |");
    println!("|---|---|---|---|---|---|---|");
    for (name, dir) in &models {
        for size in [256usize, 512] {
            let o = Command::new(&me)
                .args(["--child", dir.to_str().unwrap(), &size.to_string(), &steps.to_string()])
                .output()
                .unwrap();
            let Some(r) = last_json_line(&o.stdout) else {
                eprintln!("{name} {size}: unsee run failed:\n{}", String::from_utf8_lossy(&o.stderr));
                continue;
            };
            let rust_s = r["median_s"].as_f64().unwrap();
            let rust_rss = r["peak_rss_mib"].as_f64().unwrap();
            let torch = python.as_ref().and_then(|py| {
                let o = Command::new(py)
                    .args([repo.join("tests/reference/bench_torch.py").to_str().unwrap(), dir.to_str().unwrap(),
                           &size.to_string(), &steps.to_string(), &threads.to_string()])
                    .output()
                    .ok()?;
                let v = last_json_line(&o.stdout);
                if v.is_none() {
                    eprintln!("{name} {size}: PyTorch run failed:\n{}", String::from_utf8_lossy(&o.stderr));
                }
                v
            });
            let (t_ms, t_rss, ratio) = match torch {
                Some(t) => {
                    let ts = t["median_s"].as_f64().unwrap();
                    (format!("{:.1}", ts * 1e3), format!("{:.0}", t["peak_rss_mib"].as_f64().unwrap()),
                     format!("{:.2}", ts / rust_s))
                }
                None => ("–".into(), "–".into(), "–".into()),
            };
            println!("| {name} | {size}² | {:.1} | {:.0} | {t_ms} | {t_rss} | {ratio} |", rust_s * 1e3, rust_rss);
        }
    }
}
