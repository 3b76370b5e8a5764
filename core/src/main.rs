//! The `unsee` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use safetensors::Dtype;

use unsee::device::{DeviceChoice, list_adapters, select};
use unsee::error::{Error, Result};
use unsee::model::default_model_dir;
use unsee::pipeline::{Control, GenerateRequest, LoadOptions, StableDiffusion, to_vec};
use unsee::scheduler::SchedulerKind;
use unsee::weights::{MappedSafetensors, Precision};

#[derive(Parser)]
#[command(name = "unsee", version, about = "Stable Diffusion 1.x on burn, with on-device concept erasure")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct ModelArgs {
    /// A diffusers folder, an HF-cache `models--org--name` folder, or a single-file `.safetensors` checkpoint.
    /// Default: the embedded tiny model (random weights).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Folder with the configs and tokenizer for a single-file checkpoint (default: SD-1.5's).
    #[arg(long)]
    config: Option<PathBuf>,
    /// auto (hardware GPU if any, else CPU), cpu (burn flex) or gpu (wgpu: Vulkan/Metal/DX12).
    #[arg(long, default_value = "auto")]
    device: DeviceChoice,
    /// f32 or f16 (f16 needs a device with f16 arithmetic).
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Scan every weight for NaN/Inf (always done for small models).
    #[arg(long)]
    check: bool,
    /// Replace the model's text encoder with this one (a `text_encoder` folder, e.g. written by `erasepro-text`
    /// with --bake, or a model folder that has one).
    #[arg(long)]
    text_encoder: Option<PathBuf>,
    /// Apply an erasure file at load (repeatable, applied in order).
    #[arg(long = "erasure")]
    erasures: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an image from a prompt.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value = "")]
        negative: String,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f64,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Width in pixels (multiple of 8); default: the model's native size.
        #[arg(long)]
        width: Option<usize>,
        #[arg(long)]
        height: Option<usize>,
        /// ddim, euler-a, dpmpp-2m or dpmpp-2m-karras.
        #[arg(long, default_value = "ddim")]
        scheduler: SchedulerKind,
        /// Start from these latents (safetensors, one f32 tensor `latents` [1, 4, H/8, W/8]) instead of seeded noise.
        #[arg(long)]
        init_latents: Option<PathBuf>,
        /// Write the final denoised latents (before the VAE) as safetensors `latents`.
        #[arg(long)]
        save_latents: Option<PathBuf>,
        /// Print a JSON summary (device, precision, timings, peak memory) on stdout.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value = "image.png")]
        out: PathBuf,
    },
    /// Write the text encoder's last_hidden_state for one or more prompts.
    Encode {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Describe a model and the devices available.
    Info {
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Erase concepts in closed form and write the edit as an erasure file.
    Erase {
        #[command(flatten)]
        model: ModelArgs,
        /// The edit spec (TOML; see README).
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Also write a complete diffusers folder with the edited weights.
        #[arg(long)]
        bake: Option<PathBuf>,
        /// Print a JSON summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Generate a grid of images: one column per prompt (× seed), one row for the model as loaded and, with
    /// --spec, a second row for the same prompts and seeds after erasing the spec's concepts.
    Grid {
        #[command(flatten)]
        model: ModelArgs,
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        /// Images per prompt (seeds 0..N).
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// An edit spec (TOML): adds the row "after erasure".
        #[arg(long)]
        spec: Option<PathBuf>,
        #[arg(long, default_value_t = 20)]
        steps: usize,
        #[arg(long, default_value_t = 7.5)]
        guidance: f64,
        /// Nearest-neighbour upscaling of each image (small models draw small pictures).
        #[arg(long, default_value_t = 1)]
        scale: u32,
        /// Wrap each model's images into rows of this many (default: one row per model).
        #[arg(long)]
        columns: Option<usize>,
        #[arg(long, default_value = "grid.png")]
        out: PathBuf,
    },
    /// Measure leakage of erased concepts and drift of preserved prompts on held-out templates.
    Audit {
        #[command(flatten)]
        model: ModelArgs,
        /// The edit spec: the concepts, replacements and preserve set to audit. With --erasure, the audited edit is
        /// those files (applied in order after the baseline is measured); without, it is computed from the spec.
        #[arg(long)]
        spec: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn load(m: &ModelArgs) -> Result<StableDiffusion> {
    let device = select(m.device, m.precision)?;
    tracing::info!("device: {}", device.description);
    let path = m.model.clone().unwrap_or_else(default_model_dir);
    let opts = LoadOptions { check: m.check, config_dir: m.config.clone(), text_encoder: m.text_encoder.clone() };
    let mut sd = StableDiffusion::load(&path, device, &opts)?;
    tracing::info!("loaded {} in {:.2}s", path.display(), sd.load_time.as_secs_f64());
    for e in &m.erasures {
        let info = unsee::erase::file::apply_file(&mut sd, e)?;
        tracing::info!("applied {} ({}: {:?} → {:?})", e.display(), info.method, info.concepts, info.replacements);
    }
    Ok(sd)
}

fn read_latents(path: &Path) -> Result<Tensor<4>> {
    let mapped = MappedSafetensors::open(path)?;
    let st = mapped.tensors();
    let view = st.tensor("latents").map_err(|_| {
        Error::InvalidRequest(format!("{} has no tensor named `latents`", path.display()))
    })?;
    if view.dtype() != Dtype::F32 || view.shape().len() != 4 {
        return Err(Error::InvalidRequest(format!(
            "{}: `latents` must be f32 with 4 dimensions, found {:?} {:?}",
            path.display(), view.dtype(), view.shape()
        )));
    }
    let v: Vec<f32> = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::InvalidRequest(format!("{}: `latents` contains NaN or Inf", path.display())));
    }
    let s = view.shape();
    Ok(Tensor::<4>::from_data(TensorData::new(v, [s[0], s[1], s[2], s[3]]), &burn::tensor::Device::flex()))
}

fn write_f32(path: &Path, tensors: Vec<(String, Vec<usize>, Vec<f32>)>, ids: Vec<(String, Vec<i64>)>) -> Result<()> {
    let f32_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, s, v)| (n, s, v.iter().flat_map(|x| x.to_le_bytes()).collect()))
        .collect();
    let id_bytes: Vec<(String, Vec<u8>)> =
        ids.into_iter().map(|(n, v)| (n, v.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let mut views = vec![];
    for (n, s, b) in &f32_bytes {
        views.push((n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), b).unwrap()));
    }
    for (n, b) in &id_bytes {
        views.push((n.clone(), safetensors::tensor::TensorView::new(Dtype::I64, vec![b.len() / 8], b).unwrap()));
    }
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| Error::Io { path: path.to_path_buf(), source: std::io::Error::other(e.to_string()) })
}

/// Peak resident set size of this process, from /proc (Linux/Android); `None` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Generate {
            model, prompt, negative, steps, guidance, seed, width, height, scheduler, init_latents, save_latents,
            json, out,
        } => {
            let req = GenerateRequest { prompt, negative_prompt: negative, steps, guidance, seed, width, height, scheduler };
            // Validate the cheap things before loading anything.
            if steps == 0 {
                return Err(Error::InvalidRequest("--steps must be at least 1".into()));
            }
            for (name, v) in [("--width", width), ("--height", height)] {
                if let Some(v) = v
                    && (v == 0 || v % 8 != 0)
                {
                    return Err(Error::InvalidRequest(format!("{name} must be a positive multiple of 8 (got {v})")));
                }
            }
            let init = init_latents.as_deref().map(read_latents).transpose()?;
            let sd = load(&model)?;
            let init = init.map(|t| Tensor::from_data(t.into_data(), sd.dev()));
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {per_sec} ETA {eta} {msg}")
                    .unwrap()
                    .progress_chars("=> "),
            );
            if json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            let started = Instant::now();
            let result = sd.generate(&req, init, None, &mut |ev| {
                bar.set_position(ev.step as u64);
                Control::Continue
            })?;
            bar.finish_and_clear();
            let img = image::RgbaImage::from_raw(result.width as u32, result.height as u32, result.rgba)
                .ok_or_else(|| Error::Internal("image buffer size".into()))?;
            img.save(&out).map_err(|e| Error::Io { path: out.clone(), source: std::io::Error::other(e.to_string()) })?;
            if let Some(p) = &save_latents {
                let shape = result.latents.dims().to_vec();
                write_f32(p, vec![("latents".into(), shape, to_vec(result.latents.clone()))], vec![])?;
            }
            let total = started.elapsed().as_secs_f64();
            let steps_total: f64 = result.timings.steps_s.iter().sum();
            if json {
                let summary = serde_json::json!({
                    "device": sd.device.description,
                    "precision": sd.device.precision,
                    "model": format!("{:?}", sd.location),
                    "scheduler": req.scheduler.to_string(),
                    "steps": steps,
                    "width": result.width,
                    "height": result.height,
                    "timings_s": {
                        "load": sd.load_time.as_secs_f64(),
                        "encode": result.timings.encode_s,
                        "steps": result.timings.steps_s,
                        "decode": result.timings.decode_s,
                        "total_generate": total,
                    },
                    "peak_rss_mib": peak_rss_mib(),
                    "out": out,
                });
                println!("{}", serde_json::to_string_pretty(&summary).unwrap());
            } else {
                eprintln!(
                    "wrote {} ({}×{}, {} steps in {:.2}s, {:.2} it/s) on {}",
                    out.display(), result.width, result.height, steps, steps_total,
                    steps as f64 / steps_total.max(1e-9), sd.device.description
                );
            }
            Ok(())
        }
        Command::Grid { model, prompts, seeds, spec, steps, guidance, scale, columns, out } => {
            if steps == 0 || seeds == 0 || !(1..=64).contains(&scale) || columns == Some(0) {
                return Err(Error::InvalidRequest(
                    "--steps, --seeds and --columns must be at least 1, --scale 1..=64".into(),
                ));
            }
            let spec = spec.as_deref().map(unsee::erase::spec::Spec::from_file).transpose()?;
            let base = load(&model)?;
            let mut rows = vec![base.clone()];
            if let Some(spec) = &spec {
                let mut erased = base;
                unsee::erase::erase(&mut erased, spec)?;
                rows.push(erased);
            }
            let cells: Vec<(&String, u64)> = prompts.iter().flat_map(|p| (0..seeds).map(move |s| (p, s))).collect();
            let cols = columns.unwrap_or(cells.len()).min(cells.len());
            let rows_per_model = cells.len().div_ceil(cols);
            let mut grid: Option<image::RgbaImage> = None;
            for (r, sd) in rows.iter().enumerate() {
                for (c, (prompt, seed)) in cells.iter().enumerate() {
                    let req = GenerateRequest { prompt: prompt.to_string(), steps, guidance, seed: *seed,
                                                ..Default::default() };
                    let g = sd.generate(&req, None, None, &mut |_| Control::Continue)?;
                    let img = image::RgbaImage::from_raw(g.width as u32, g.height as u32, g.rgba)
                        .ok_or_else(|| Error::Internal("image buffer size".into()))?;
                    let img = image::imageops::resize(&img, img.width() * scale, img.height() * scale,
                                                      image::imageops::FilterType::Nearest);
                    let (w, h) = (img.width(), img.height());
                    // Models are separated by a wider gap than images.
                    let n_rows = (rows.len() * rows_per_model) as u32;
                    let grid = grid.get_or_insert_with(|| {
                        image::RgbaImage::from_pixel(cols as u32 * (w + 2) - 2,
                                                     n_rows * (h + 2) - 2 + (rows.len() as u32 - 1) * 6,
                                                     image::Rgba([255, 255, 255, 255]))
                    });
                    let row = (r * rows_per_model + c / cols) as i64;
                    image::imageops::replace(grid, &img, (c % cols) as i64 * (w as i64 + 2),
                                             row * (h as i64 + 2) + r as i64 * 6);
                    eprintln!("row {} ({}), {prompt:?} seed {seed}", r + 1, if r == 0 { "model" } else { "erased" });
                }
            }
            let grid = grid.expect("at least one cell");
            grid.save(&out).map_err(|e| Error::Io { path: out.clone(), source: std::io::Error::other(e.to_string()) })?;
            eprintln!("wrote {} ({} × {} images)", out.display(), rows.len(), cells.len());
            Ok(())
        }
        Command::Encode { model, prompts, out } => {
            let sd = load(&model)?;
            let mut tensors = vec![];
            let mut ids = vec![];
            for (k, p) in prompts.iter().enumerate() {
                let (hidden, tokens) = sd.encode_prompt(p)?;
                let [_, s, d] = hidden.dims();
                let v = to_vec(hidden.reshape([1, 1, s, d]));
                tensors.push((format!("prompt.{k}.hidden"), vec![s, d], v));
                ids.push((format!("prompt.{k}.input_ids"), tokens.ids.iter().map(|&i| i as i64).collect()));
            }
            write_f32(&out, tensors, ids)?;
            eprintln!("wrote {} prompt(s) to {}", prompts.len(), out.display());
            Ok(())
        }
        Command::Erase { model, spec, out, bake, json } => {
            let spec = unsee::erase::spec::Spec::from_file(&spec)?;
            let mut sd = load(&model)?;
            let edit = unsee::erase::erase(&mut sd, &spec)?;
            unsee::erase::file::save(&edit, &out)?;
            if let Some(dir) = &bake {
                unsee::erase::file::bake(&sd, &edit.deltas, dir)?;
            }
            let summary = serde_json::json!({
                "method": spec.method.name(),
                "concepts": spec.erase.iter().map(|e| &e.concept).collect::<Vec<_>>(),
                "replacements": spec.erase.iter().map(|e| &e.replace_with).collect::<Vec<_>>(),
                "matrices": edit.deltas.len(),
                "rank": edit.deltas.iter().map(|d| d.r.ncols()).max().unwrap_or(0),
                "timings_s": edit.timings,
                "max_residual": edit.residuals.iter().map(|r| r.1).fold(0.0, f64::max),
                "warnings": edit.warnings,
                "out": out,
                "baked": bake,
                "device": sd.device.description,
            });
            if json {
                println!("{}", serde_json::to_string_pretty(&summary).unwrap());
            } else {
                eprintln!("wrote {} ({} matrices, {}) in {:.2}s", out.display(), edit.deltas.len(), spec.method.name(),
                          edit.timings.encode_s + edit.timings.solve_s + edit.timings.apply_s);
            }
            Ok(())
        }
        Command::Audit { mut model, spec, json } => {
            let spec = unsee::erase::spec::Spec::from_file(&spec)?;
            let audited = std::mem::take(&mut model.erasures);
            let mut sd = load(&model)?;
            let report = unsee::erase::audit::audit(&mut sd, &spec, |sd| {
                if audited.is_empty() {
                    unsee::erase::erase(sd, &spec).map(|_| ())
                } else {
                    for f in &audited {
                        unsee::erase::file::apply_file(sd, f)?;
                    }
                    Ok(())
                }
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).unwrap());
            } else {
                println!("{}", report.table());
            }
            Ok(())
        }
        Command::Info { model } => {
            let sd = load(&model)?;
            let params = [
                ("text_encoder", sd.text_encoder.num_params()),
                ("unet", sd.unet.num_params()),
                ("vae", sd.vae.num_params()),
            ];
            let mut files = serde_json::Map::new();
            for (c, f) in &sd.files {
                let m = MappedSafetensors::open(f)?;
                files.insert(c.clone(), serde_json::json!({"file": f, "dtypes": m.dtypes()}));
            }
            let info = serde_json::json!({
                "model": format!("{:?}", sd.location),
                "parameters": params.iter().map(|(n, p)| (n.to_string(), serde_json::json!(p))).collect::<serde_json::Map<_, _>>(),
                "files": files,
                "text_encoder": {"hidden_size": sd.text_config.hidden_size, "layers": sd.text_config.num_hidden_layers,
                                  "heads": sd.text_config.num_attention_heads, "act": sd.text_config.hidden_act,
                                  "vocab": sd.tokenizer.vocab_size()},
                "unet": {"block_out_channels": sd.unet_config.block_out_channels,
                         "down_block_types": sd.unet_config.down_block_types,
                         "cross_attention_dim": sd.unet_config.cross_attention_dim,
                         "sample_size": sd.unet_config.sample_size},
                "vae": {"block_out_channels": sd.vae_config.block_out_channels,
                        "scaling_factor": sd.vae_config.scaling_factor,
                        "scale_factor": sd.vae_config.scale_factor()},
                "device": sd.device.description,
                "precision": sd.device.precision,
                "devices_available": {"cpu": "burn flex", "wgpu_adapters": list_adapters()},
            });
            println!("{}", serde_json::to_string_pretty(&info).unwrap());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "unsee=info,warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
        Err(_) => {
            eprintln!("error: internal error (panic); please report it");
            ExitCode::from(2)
        }
    }
}
