//! Quantized bundles against the f32 model they were built from, measured in the same run (#14).
//!
//! 1. **Shapes world** (`models/shapes-sd`, CPU): oracle shape/colour accuracy of the f32 model and of its f16,
//!    int8 and int4 bundles; then the erasure table (UCE, circle → square and red → blue): the erasure computed on
//!    the f32 model, measured on the f32 model and on bundles built with it baked in.
//! 2. **Full-size SD-1.5** (random weights from `models/sd15-config`, written once to `$UNSEE_BUNDLE_DIR`, default
//!    a temp folder; `UNSEE_BUNDLE_FULL=0` skips it): bundle sizes, and one `generate` per variant in its own
//!    process (the same prompt, seed, size and DDIM steps): peak RSS, seconds per CFG step, and the final latents'
//!    PSNR and cosine against the f32 run.
//!
//! ```text
//! cargo bench --profile dev --bench bundle     # UNSEE_SHAPES_N (4), UNSEE_BUNDLE_SIZE (512), UNSEE_BUNDLE_STEPS (10),
//!                                              # UNSEE_BUNDLE_ATTACKS=1 adds the composition/embedding attacks
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use unsee::bundle::BuildOptions;
use unsee::device::DeviceChoice;
use unsee::engine::{Engine, EngineOptions};
use unsee::erase::spec::Method;
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
use unsee::quant::Quant;
use unsee::shapes::eval::{Erasure, Measure, Row, Settings, baseline, measure_model, quality};

mod common;
use common::{Role, cpu, env, peak_rss_mib, role, run_child, write_random_sd15};

fn engine(model: &Path) -> Engine {
    open(model, false)
}

fn open(model: &Path, low_memory: bool) -> Engine {
    Engine::open(&EngineOptions { model: model.to_path_buf(), device: DeviceChoice::Cpu, low_memory,
                                  ..EngineOptions::default() })
        .unwrap()
}

fn build(e: &Engine, q: Quant, out: &Path) -> u64 {
    let _ = std::fs::remove_dir_all(out);
    let m = e.build_bundle(&BuildOptions { quant: q, sign: None, creator: "bench".into() }, out, &mut |_, _, _| {})
        .unwrap();
    m.resources.iter().map(|r| r.size).sum()
}

fn dir_bytes(d: &Path) -> u64 {
    std::fs::read_dir(d).unwrap().map(|e| {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() { dir_bytes(&e.path()) } else { e.metadata().unwrap().len() }
    }).sum()
}

const QUANTS: [Quant; 3] = [Quant::F16, Quant::Int8, Quant::Int4];

fn shapes(tmp: &Path) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = repo.join("models/shapes-sd");
    let s = Settings { n: env("UNSEE_SHAPES_N", 4), steps: 20, guidance: 4.0 };
    println!("## shapes world: {} images per prompt, 20 DDIM steps, guidance 4\n", s.n);
    println!("| model | weights MB | seen pairs: shape / colour / both % | held-out pairs: shape / colour / both % |");
    println!("|---|---|---|---|");
    let base = StableDiffusion::load(&model, cpu(), &LoadOptions::default()).unwrap();
    let e = engine(&model);
    let row = |name: &str, mb: f64, sd: &StableDiffusion| {
        let (seen, held) = quality(sd, &s).unwrap();
        let p = |a: usize, n: usize| 100.0 * a as f64 / n.max(1) as f64;
        println!("| {name} | {mb:.1} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} / {:.1} |",
                 p(seen.shape, seen.images), p(seen.colour, seen.images), p(seen.both, seen.images),
                 p(held.shape, held.images), p(held.colour, held.images), p(held.both, held.images));
    };
    let f32_bytes: u64 = ["text_encoder", "unet", "vae"].iter().map(|c| dir_bytes(&model.join(c))).sum();
    row("shapes-sd (as shipped, loaded in f32)", f32_bytes as f64 / 1e6, &base);
    for q in QUANTS {
        let dir = tmp.join(format!("shapes-{}", q.name()));
        build(&e, q, &dir);
        let bytes: u64 = ["text_encoder", "unet", "vae"].iter().map(|c| dir_bytes(&dir.join(c))).sum();
        let sd = StableDiffusion::load(&dir, cpu(), &LoadOptions::default()).unwrap();
        row(&format!("bundle {}", q.name()), bytes as f64 / 1e6, &sd);
    }
    println!("\n{}", Row::HEADER);
    let what = Measure { specificity: true, attacks: env("UNSEE_BUNDLE_ATTACKS", 0) != 0 };
    for erasure in Erasure::standard().into_iter().take(2) {
        let spec = erasure.spec(Method::Uce).unwrap();
        let base_line = baseline(&base, &erasure, &s, what).unwrap();
        let mut erased = engine(&model);
        erased.erase(&spec, None).unwrap();
        let r = measure_model(&base, &erasure, erased.model(), "uce, f32", &s, &base_line, what).unwrap();
        println!("{}", r.markdown());
        for q in QUANTS {
            let dir = tmp.join(format!("shapes-uce-{}", q.name()));
            build(&erased, q, &dir);
            let sd = StableDiffusion::load(&dir, cpu(), &LoadOptions::default()).unwrap();
            let r = measure_model(&base, &erasure, &sd, &format!("uce, bundle {}", q.name()), &s, &base_line, what)
                .unwrap();
            println!("{}", r.markdown());
        }
    }
    println!();
}

/// The child: one generate, then a JSON line on stdout. A low-memory engine loads its networks inside `generate`
/// (counted in `load_s`) and the VAE inside the decode (counted in `decode_s`).
fn child(model: &Path, size: usize, steps: usize, latents_out: &Path, low_memory: bool) {
    let t = Instant::now();
    let e = open(model, low_memory);
    let open_s = t.elapsed().as_secs_f64();
    let rss_loaded = peak_rss_mib();
    let req = GenerateRequest { prompt: "a photograph of an astronaut riding a horse".into(), steps, guidance: 7.5,
                                seed: 7, width: Some(size), height: Some(size), ..GenerateRequest::default() };
    // Denoise, then decode separately: the peak RSS of each phase is reported.
    let g = e.generate(&req, Inputs::default(), &mut |_| Control::Continue, Target::Latents).unwrap();
    let rss_denoised = peak_rss_mib();
    let (w, h) = e.model().image_size(&req).unwrap();
    let mut rgba = vec![0u8; w * h * 4];
    let t = Instant::now();
    let decoded = match e.decode_rgba_into(g.latents.clone(), &mut rgba) {
        Ok(_) => true,
        // Random full-size VAE weights can overflow; the denoising numbers stand without the decode.
        Err(unsee::Error::NonFiniteOutput(_)) => false,
        Err(err) => panic!("{err}"),
    };
    let decode_s = t.elapsed().as_secs_f64();
    let v = unsee::tensor::to_f32_vec(g.latents).unwrap();
    std::fs::write(latents_out, v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
    let mut steps_s = g.timings.steps_s.clone();
    steps_s.sort_by(f64::total_cmp);
    println!("{}", serde_json::json!({
        "load_s": open_s + g.timings.load_s, "step_s": steps_s[steps_s.len() / 2], "encode_s": g.timings.encode_s,
        "decode_s": decode_s, "decoded": decoded, "rss_loaded_mib": rss_loaded, "rss_denoised_mib": rss_denoised,
        "peak_rss_mib": peak_rss_mib(),
    }));
}

fn read_latents(p: &Path) -> Vec<f32> {
    std::fs::read(p).unwrap().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

fn full_size(tmp: &Path) {
    let dir = std::env::var("UNSEE_BUNDLE_DIR").map(PathBuf::from).unwrap_or_else(|_| tmp.join("sd15"));
    let model = dir.join("sd15-random");
    if !model.join("unet/diffusion_pytorch_model.safetensors").is_file() {
        let t = Instant::now();
        write_random_sd15(&model);
        eprintln!("wrote the random SD-1.5 in {:.0}s", t.elapsed().as_secs_f64());
    }
    let (size, steps) = (env("UNSEE_BUNDLE_SIZE", 512usize), env("UNSEE_BUNDLE_STEPS", 10usize));
    let mut variants = vec![("f32 folder".to_string(), model.clone(), dir_bytes(&model), false)];
    {
        let e = engine(&model);
        for q in QUANTS {
            let out = dir.join(format!("sd15-{}", q.name()));
            let t = Instant::now();
            let bytes = if unsee::bundle::is_bundle(&out) { dir_bytes(&out) } else { build(&e, q, &out) };
            eprintln!("bundle {}: {:.0}s", q.name(), t.elapsed().as_secs_f64());
            variants.push((format!("bundle {}", q.name()), out, bytes, false));
        }
        drop(e);
    }
    // The same, each network loaded only for its stage (`EngineOptions::low_memory`).
    let low: Vec<_> = variants.iter().map(|(n, p, b, _)| (format!("{n}, low memory"), p.clone(), *b, true)).collect();
    variants.extend(low);
    println!("## full-size SD-1.5 (random weights), CPU, {size}², {steps} DDIM steps, guidance 7.5, one process each\n");
    println!("| weights | size MB | size ratio | peak RSS MiB | RSS ratio | peak RSS after load / denoising MiB \
              | s / CFG step | step ratio | VAE decode s | load s | latent PSNR dB | latent cosine |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut reference: Option<(Vec<f32>, f64, f64, u64)> = None;
    for (name, path, bytes, low_memory) in variants {
        let lat = dir.join(format!("{}.latents", name.replace([' ', ','], "-")));
        let j = match run_child(&[path.to_str().unwrap(), &size.to_string(), &steps.to_string(), lat.to_str().unwrap(),
                                  if low_memory { "1" } else { "0" }]) {
            Ok(j) => j,
            Err(status) => {
                println!("| {name} | {:.0} | | child failed: {status} | | | | | | | |", bytes as f64 / 1e6);
                continue;
            }
        };
        let (rss, step, loaded) = (j["peak_rss_mib"].as_f64().unwrap(), j["step_s"].as_f64().unwrap(),
                                   j["rss_loaded_mib"].as_f64().unwrap());
        let (denoised, decode) = (j["rss_denoised_mib"].as_f64().unwrap(), j["decode_s"].as_f64().unwrap());
        let load = j["load_s"].as_f64().unwrap();
        let v = read_latents(&lat);
        let (psnr, cos) = match &reference {
            None => (f64::INFINITY, 1.0),
            Some((r, ..)) => {
                let mse = r.iter().zip(&v).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>() / r.len() as f64;
                let peak = r.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
                let dot: f64 = r.iter().zip(&v).map(|(a, b)| *a as f64 * *b as f64).sum();
                let n = |x: &[f32]| x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
                (10.0 * (peak * peak / mse).log10(), dot / (n(r) * n(&v)))
            }
        };
        let (r_rss, r_step, r_bytes) = reference.as_ref().map_or((rss, step, bytes), |r| (r.1, r.2, r.3));
        println!("| {name}{} | {:.0} | {:.2} | {rss:.0} | {:.2} | {loaded:.0} / {denoised:.0} | {step:.2} | {:.2} \
                  | {decode:.1} | {load:.1} | {} | {cos:.5} |",
                 if j["decoded"] == false { " (VAE output overflowed: random weights)" } else { "" },
                 bytes as f64 / 1e6, bytes as f64 / r_bytes as f64, rss / r_rss, step / r_step,
                 if psnr.is_finite() { format!("{psnr:.1}") } else { "–".into() });
        if reference.is_none() {
            reference = Some((v, rss, step, bytes));
        }
    }
}

fn main() {
    match role() {
        Role::List => return,
        Role::Child(a) => {
            child(Path::new(&a[0]), a[1].parse().unwrap(), a[2].parse().unwrap(), Path::new(&a[3]), a[4] == "1");
            return;
        }
        Role::Parent => {}
    }
    let tmp = std::env::temp_dir().join(format!("unsee-bundle-bench-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    if env("UNSEE_BUNDLE_FULL", 1) != 0 {
        full_size(&tmp);
    }
    if env("UNSEE_BUNDLE_SHAPES", 1) != 0 {
        shapes(&tmp);
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
