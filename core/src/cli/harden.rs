//! `unsee harden`: train a robust erased text encoder on the device (AdvUnlearn) from a spec and write it as a
//! `text_encoder` folder that `--text-encoder` plugs into any model of the same width.

use std::path::PathBuf;

use super::{ModelArgs, print_json, show_stage, stage_bar};
use unsee::erase::spec::Spec;
use unsee::error::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The spec: its concepts, replacements, templates and preserve prompts, and its `[harden]` table.
    #[arg(long)]
    spec: PathBuf,
    /// The `text_encoder` folder to write (must not exist or be empty).
    #[arg(long)]
    out: PathBuf,
    /// Also write the compact delta file: only the trained tensors, with the hash of the encoder they apply to
    /// (`--text-encoder FILE` loads it onto that encoder).
    #[arg(long)]
    delta: Option<PathBuf>,
    /// Also write the whole model with the hardened text encoder as one single-file checkpoint with CompVis key
    /// names (AUTOMATIC1111, ComfyUI).
    #[arg(long)]
    bake_single_file: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = Spec::from_file(&a.spec)?;
    if a.out.exists() && std::fs::read_dir(&a.out).map(|mut d| d.next().is_some()).unwrap_or(true) {
        return Err(Error::InvalidRequest(format!("{} exists and is not empty", a.out.display())));
    }
    if let Some(f) = &a.bake_single_file {
        unsee::engine::check_single_file_target(f)?;
    }
    let mut engine = a.model.open()?;
    let bar = stage_bar(a.json);
    let report = engine.harden(&spec, &mut |stage, done, total| show_stage(&bar, stage, done, total), &|| false)?;
    bar.finish_and_clear();
    engine.save_text_encoder(&a.out)?;
    if let Some(d) = &a.delta {
        engine.save_hardened_delta(d)?;
    }
    if let Some(f) = &a.bake_single_file {
        engine.bake_single_file(f)?;
    }
    if a.json {
        print_json(&report)
    } else {
        eprintln!("wrote {} ({} iterations, {:?}; unlearn loss {:.4} → {:.4}, retain {:.4} → {:.4}; {:.0}s + {:.0}s \
                   for the concept images)", a.out.display(), report.iterations, report.objective,
                  report.unlearn_loss.0, report.unlearn_loss.1, report.retain_loss.0, report.retain_loss.1,
                  report.train_s, report.images_s);
        Ok(())
    }
}
