//! Erasure benchmark: erase 1, 10 and 100 concepts with a 1,000-prompt preserve set, split into encode / solve /
//! apply, with the preservation Gram cold (first edit) and cached (next edit), and the PyTorch transcription of UCE
//! measured in the same run.
//!
//! ```text
//! cargo bench --bench erase                                   # tiny model, CPU (+ wgpu if UNSEE_BENCH_WGPU=1)
//! UNSEE_BENCH_SD15=/path/to/sd15-random UNSEE_BENCH_PYTHON=.venv/bin/python cargo bench --bench erase
//! ```
//!
//! Full-size rows on wgpu need `UNSEE_BENCH_WGPU_SD15=1` as well (slow on a software Vulkan device).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use unsee::device::{DeviceChoice, select};
use unsee::erase::{erase, spec::Spec};
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::weights::Precision;

const OBJECTS: [&str; 20] = ["cat", "dog", "house", "tree", "car", "boat", "bird", "flower", "chair", "lamp", "river",
                             "mountain", "bridge", "horse", "clock", "train", "apple", "guitar", "castle", "robot"];

fn preserve_prompts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("a photo of a {} number {i}", OBJECTS[i % OBJECTS.len()])).collect()
}

fn concepts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("painter {i} style")).collect()
}

/// The spec (written beside `preserve.txt`, which it names relative to itself).
fn spec_text(method: &str, n: usize) -> String {
    let mut s = format!("method = \"{method}\"\npreserve_file = \"preserve.txt\"\n");
    if method == "speed" {
        s.push_str("filter = true\naugment = 0\n");
    }
    for c in concepts(n) {
        s.push_str(&format!("[[erase]]\nconcept = \"{c}\"\nreplace_with = \"art\"\n"));
    }
    s
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let tmp = std::env::temp_dir().join(format!("unsee-erase-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let preserve_file = tmp.join("preserve.txt");
    std::fs::write(&preserve_file, preserve_prompts(1000).join("\n")).unwrap();
    let python = std::env::var("UNSEE_BENCH_PYTHON").ok();

    // Optional filters: UNSEE_BENCH_MODELS=tiny,sd15  UNSEE_BENCH_METHODS=uce,speed  UNSEE_BENCH_COUNTS=1,10  UNSEE_BENCH_WGPU=1 (add
    // lavapipe/GPU rows) or UNSEE_BENCH_WGPU=only.
    let want = |var: &str, item: &str| std::env::var(var).map(|v| v.split(',').any(|x| item.starts_with(x))).unwrap_or(true);
    let mut models = vec![("tiny", repo.join("models/tiny-sd"))];
    if let Ok(p) = std::env::var("UNSEE_BENCH_SD15") {
        models.push(("sd15 (random)", PathBuf::from(p)));
    }
    models.retain(|(n, _)| want("UNSEE_BENCH_MODELS", n));
    // UNSEE_BENCH_PRECISION=f16: e.g. for devices whose storage-buffer limit (128 MiB on lavapipe) is below the
    // full-size text encoder's 152 MB f32 token embedding.
    let precision = match std::env::var("UNSEE_BENCH_PRECISION").as_deref() {
        Ok("f16") => Precision::F16,
        _ => Precision::F32,
    };
    let mut devices = vec![DeviceChoice::Cpu];
    match std::env::var("UNSEE_BENCH_WGPU").as_deref() {
        Ok("only") => devices = vec![DeviceChoice::Gpu],
        Ok(_) => devices.push(DeviceChoice::Gpu),
        Err(_) => {}
    }
    println!("Erasure with a 1,000-prompt preserve set (seconds). cold = preservation Gram computed, warm = cached.\n");
    println!("| model | device | method | concepts | encode cold | encode warm | solve | apply | total cold | total warm | PyTorch UCE | PyTorch / unsee (cold) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, dir) in &models {
        for &device in &devices {
            if device == DeviceChoice::Gpu && name.starts_with("sd15") && std::env::var_os("UNSEE_BENCH_WGPU_SD15").is_none() {
                continue; // opt-in: software Vulkan (lavapipe) takes many minutes per full-size run
            }
            for method in ["uce", "speed"].into_iter().filter(|m| want("UNSEE_BENCH_METHODS", m)) {
                for n in [1usize, 10, 100].into_iter().filter(|n| {
                    std::env::var("UNSEE_BENCH_COUNTS").map(|v| v.split(',').any(|x| x == n.to_string())).unwrap_or(true)
                }) {
                    let spec_path = tmp.join("spec.toml");
                    std::fs::write(&spec_path, spec_text(method, n)).unwrap();
                    let spec = Spec::from_file(&spec_path).unwrap();
                    let cache = tmp.join(format!("cache-{method}-{n}-{device:?}"));
                    // SAFETY: single-threaded here; the engine reads it when it looks for the Gram cache.
                    unsafe { std::env::set_var("UNSEE_CACHE_DIR", &cache) };
                    let dev = select(device, precision).unwrap();
                    let mut sd = StableDiffusion::load(dir, dev.clone(), &LoadOptions::default()).unwrap();
                    let t = Instant::now();
                    let cold = erase(&mut sd, &spec).unwrap();
                    let total_cold = t.elapsed().as_secs_f64();
                    drop(sd); // one model in memory at a time, as in an app
                    let mut sd = StableDiffusion::load(dir, dev, &LoadOptions::default()).unwrap();
                    let t = Instant::now();
                    let warm = erase(&mut sd, &spec).unwrap();
                    let total = t.elapsed().as_secs_f64();
                    let torch = (method == "uce" && device == DeviceChoice::Cpu)
                        .then_some(())
                        .and(python.as_ref())
                        .and_then(|py| {
                            let o = Command::new(py)
                                .args([repo.join("tests/reference/bench_uce_torch.py").to_str().unwrap(),
                                       dir.to_str().unwrap(), &n.to_string(), preserve_file.to_str().unwrap()])
                                .output()
                                .ok()?;
                            let v: serde_json::Value = String::from_utf8_lossy(&o.stdout)
                                .lines()
                                .rev()
                                .find_map(|l| serde_json::from_str(l).ok())?;
                            v["total_s"].as_f64()
                        });
                    let (t_s, ratio) = match torch {
                        Some(ts) => (format!("{ts:.2}"), format!("{:.1}", ts / total_cold)),
                        None => ("–".into(), "–".into()),
                    };
                    println!("| {name} | {}{} | {method} | {n} | {:.2} | {:.2} | {:.3} | {:.3} | {total_cold:.2} | {total:.2} | {t_s} | {ratio} |",
                             if device == DeviceChoice::Cpu { "cpu" } else { "wgpu" },
                             if precision == Precision::F16 { " f16" } else { "" },
                             cold.timings.encode_s, warm.timings.encode_s, warm.timings.solve_s, warm.timings.apply_s);
                }
            }
        }
    }
    std::fs::remove_dir_all(&tmp).ok();
}
