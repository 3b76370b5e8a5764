//! `unsee erase`: compute a closed-form erasure from a spec, write it as an erasure file (and optionally a baked
//! diffusers folder).

use std::path::PathBuf;

use super::{ModelArgs, print_json};
use unsee::erase::spec::Spec;
use unsee::error::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The edit spec (TOML; see README).
    #[arg(long)]
    spec: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Also write a complete diffusers folder with the edited weights (every erasure in effect).
    #[arg(long)]
    bake: Option<PathBuf>,
    /// Also write the edited model (every erasure in effect) as one single-file `.safetensors` checkpoint with
    /// CompVis key names, the format AUTOMATIC1111 and ComfyUI load. Needs a diffusers folder as the model.
    #[arg(long)]
    bake_single_file: Option<PathBuf>,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = Spec::from_file(&a.spec)?;
    if let Some(file) = &a.bake_single_file {
        unsee::engine::check_single_file_target(file)?;
    }
    let mut engine = a.model.open()?;
    let edit = engine.erase(&spec, Some(&a.out))?;
    if let Some(dir) = &a.bake {
        engine.bake(dir)?;
    }
    if let Some(file) = &a.bake_single_file {
        engine.bake_single_file(file)?;
    }
    if a.json {
        print_json(&serde_json::json!({
            "method": spec.method.name(),
            "concepts": spec.erase.iter().map(|e| &e.concept).collect::<Vec<_>>(),
            "replacements": spec.erase.iter().map(|e| &e.replace_with).collect::<Vec<_>>(),
            "matrices": edit.deltas.len(),
            "rank": edit.deltas.iter().map(|d| d.r.ncols()).max().unwrap_or(0),
            "timings_s": edit.timings,
            "max_residual": edit.residuals.iter().map(|r| r.1).fold(0.0, f64::max),
            "warnings": edit.warnings,
            "out": a.out,
            "baked": a.bake,
            "baked_single_file": a.bake_single_file,
            "device": engine.model().device.description,
        }))?;
    } else {
        eprintln!("wrote {} ({} matrices, {}) in {:.2}s", a.out.display(), edit.deltas.len(), spec.method.name(),
                  edit.timings.encode_s + edit.timings.solve_s + edit.timings.apply_s);
    }
    Ok(())
}
