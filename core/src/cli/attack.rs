//! `unsee attack`: try to get an erased concept back — optimised typed prompts (UnlearnDiffAtk), textual inversion,
//! or RECE's adversarial conditioning — and, on the shapes world, say how often the pictures show it.

use std::path::PathBuf;

use super::{ModelArgs, print_json, rgba_image, save_png, show_stage, stage_bar};
use unsee::erase::attack::{AttackMethod, AttackOptions};
use unsee::erase::spec::Spec;
use unsee::error::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The edit spec: its concepts are attacked. With --erasure (or an erased --text-encoder), the attacked model
    /// is the one loaded; without any erasure file, the spec's edit is computed first and attacked.
    #[arg(long)]
    spec: PathBuf,
    #[arg(long, value_enum, default_value = "prompt")]
    method: AttackMethod,
    /// Attacked generations (concept prompts on held-out templates × seeds).
    #[arg(long, default_value_t = 12)]
    runs: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// DDIM steps of every generation (target images and judged images).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// Prompt attack: prefix tokens (the paper: 5; 3 for styles and objects).
    #[arg(long, default_value_t = 5)]
    tokens: usize,
    /// Prompt attack: timesteps visited; the typed prompt is judged after each (the paper: 50).
    #[arg(long, default_value_t = 50)]
    timesteps: usize,
    /// Prompt attack: optimisation steps per timestep (the paper: 40).
    #[arg(long, default_value_t = 40)]
    iterations: usize,
    /// Inversion: optimisation steps.
    #[arg(long, default_value_t = 300)]
    inversion_steps: usize,
    /// Inversion: target images made by the base model.
    #[arg(long, default_value_t = 8)]
    inversion_targets: usize,
    /// Inversion: write the learned embedding (safetensors, `emb_params`) here.
    #[arg(long)]
    save_embedding: Option<PathBuf>,
    /// Inversion: evaluate this saved embedding instead of learning one.
    #[arg(long)]
    load_embedding: Option<PathBuf>,
    /// Write each run's judged picture into this folder (run-NN.png).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = Spec::from_file(&a.spec)?;
    if a.method != AttackMethod::Inversion && (a.save_embedding.is_some() || a.load_embedding.is_some()) {
        return Err(Error::InvalidRequest("--save-embedding and --load-embedding go with --method inversion".into()));
    }
    if let Some(dir) = &a.out
        && !dir.is_dir()
    {
        return Err(Error::InvalidRequest(format!("--out {} is not a folder", dir.display())));
    }
    let mut opts = AttackOptions::new(a.method, vec![]);
    opts.runs = a.runs;
    opts.seed = a.seed;
    opts.steps = a.steps;
    opts.guidance = a.guidance;
    opts.prompt.tokens = a.tokens;
    opts.prompt.timesteps = a.timesteps;
    opts.prompt.iterations = a.iterations;
    opts.inversion.steps = a.inversion_steps;
    opts.inversion_targets = a.inversion_targets;
    opts.save_embedding = a.save_embedding.clone();
    opts.load_embedding = a.load_embedding.clone();
    opts.keep_images = a.out.is_some();
    // Everything but the templates is checked before the model is loaded.
    AttackOptions { templates: vec!["{}".into()], ..opts.clone() }.validate()?;

    let engine = a.model.open()?;
    let bar = stage_bar(a.json);
    let report = engine.attack(&spec, &opts, &mut |stage, done, total| show_stage(&bar, stage, done, total), &|| false)?;
    bar.finish_and_clear();
    if let Some(dir) = &a.out {
        for (i, r) in report.runs.iter().enumerate() {
            if let Some((w, h, rgba)) = &r.image {
                save_png(&rgba_image(*w, *h, rgba.clone())?, &dir.join(format!("run-{i:02}.png")))?;
            }
        }
    }
    if a.json {
        return print_json(&report);
    }
    println!("attack: {} — assumes {}", report.method.name(), report.assumes);
    if let Some(f) = &report.embedding_file {
        println!("embedding: {}", f.display());
    }
    if let (Some(l), Some(s)) = (report.inversion_loss, report.inversion_seconds) {
        println!("inversion: loss {l:.4} after {s:.1}s");
    }
    for (i, r) in report.runs.iter().enumerate() {
        let verdict = match r.success {
            Some(true) => "shows the concept",
            Some(false) => "does not show it",
            None => "not judged",
        };
        let extra = match (r.iterations, r.retokenizes) {
            (Some(it), Some(same)) => format!(", {it} iterations{}", if same { "" } else { ", retokenized differently" }),
            _ => String::new(),
        };
        println!("run {i:2} [{}] seed {}: {:?} → {verdict} ({:.1}s{extra})", r.concept, r.seed, r.prompt, r.seconds);
    }
    match report.success_pct() {
        Some(p) => println!("success: {} of {} ({p:.1}%) judged by the shapes oracle, {:.1}s in all",
                            report.hits.unwrap_or(0), report.of, report.seconds),
        None => println!("no oracle for these concepts: look at the pictures (--out) to judge; {:.1}s in all",
                         report.seconds),
    }
    Ok(())
}
