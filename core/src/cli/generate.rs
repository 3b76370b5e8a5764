//! `unsee generate`: one image from a prompt.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};

use super::{ModelArgs, print_json, rgba_image, save_png};
use unsee::error::Result;
use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
use unsee::scheduler::SchedulerKind;
use unsee::weights::{OwnedTensor, read_f32_tensor, write_safetensors};

#[derive(clap::Args)]
pub struct Args {
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
    /// ddim, euler-a, dpmpp-2m, dpmpp-2m-karras or lcm (2–8 steps with an LCM-LoRA: `--lora FILE --steps 4
    /// --guidance 1.5`).
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
    /// Run even when the size × steps is above the work budget (latent pixels × steps > 4,194,304).
    #[arg(long)]
    force: bool,
    #[arg(long, default_value = "image.png")]
    out: PathBuf,
}

/// Peak resident set size of this process, from /proc (Linux/Android); `None` elsewhere.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(a: Args) -> Result<()> {
    let req = GenerateRequest {
        prompt: a.prompt,
        negative_prompt: a.negative,
        steps: a.steps,
        guidance: a.guidance,
        seed: a.seed,
        width: a.width,
        height: a.height,
        scheduler: a.scheduler,
    };
    // Check the cheap things before loading anything.
    req.validate()?;
    let init = a.init_latents.as_deref().map(|p| read_f32_tensor(p, "latents", 4)).transpose()?;
    let engine = a.model.open()?;
    let sd = engine.model();
    let init = init.map(|(shape, v)| {
        Tensor::<4>::from_data(TensorData::new(v, [shape[0], shape[1], shape[2], shape[3]]), sd.dev())
    });
    let bar = ProgressBar::new(a.steps as u64);
    if let Ok(style) = ProgressStyle::with_template("{spinner} step {pos}/{len} [{bar:30}] {per_sec} ETA {eta} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    if a.json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = Instant::now();
    let inputs = Inputs { init_latents: init, over_budget: a.force, ..Default::default() };
    let result = engine.generate(&req, inputs, &mut |ev| {
        bar.set_position(ev.step as u64);
        Control::Continue
    }, Target::Rgba)?;
    bar.finish_and_clear();
    let (width, height) = (result.width, result.height);
    save_png(&rgba_image(width, height, result.rgba)?, &a.out)?;
    if let Some(p) = &a.save_latents {
        let shape = result.latents.dims().to_vec();
        let v = unsee::tensor::to_f32_vec(result.latents.clone())?;
        write_safetensors(p, &[OwnedTensor::f32("latents", shape, &v)], None)?;
    }
    let total = started.elapsed().as_secs_f64();
    let steps_total: f64 = result.timings.steps_s.iter().sum();
    if a.json {
        print_json(&serde_json::json!({
            "device": sd.device.description,
            "precision": sd.device.precision,
            "model": format!("{:?}", sd.location),
            "low_memory": engine.is_low_memory(),
            "scheduler": req.scheduler.to_string(),
            "steps": req.steps,
            "width": width,
            "height": height,
            "timings_s": {
                "load": sd.load_time.as_secs_f64(),
                "load_stages": result.timings.load_s,
                "encode": result.timings.encode_s,
                "steps": result.timings.steps_s,
                "decode": result.timings.decode_s,
                "total_generate": total,
            },
            "peak_rss_mib": peak_rss_mib(),
            "out": a.out,
        }))?;
    } else {
        eprintln!(
            "wrote {} ({width}×{height}, {} steps in {steps_total:.2}s, {:.2} it/s) on {}",
            a.out.display(), req.steps, req.steps as f64 / steps_total.max(1e-9), sd.device.description
        );
    }
    Ok(())
}
