//! `unsee convert`: a PyTorch text-encoder checkpoint (AdvUnlearn's `pytorch_model.bin` or training `.pt`) written
//! as a safetensors `text_encoder` folder, read without executing any pickle code ([`unsee::pickle`]).

use std::path::PathBuf;

use super::{ModelArgs, print_json};
use unsee::error::Result;

#[derive(clap::Args)]
pub struct Args {
    /// The model the encoder is for: its text-encoder config is used when the checkpoint has none beside it, and
    /// the converted folder is loaded into it once as a check.
    #[command(flatten)]
    model: ModelArgs,
    /// The checkpoint: a `.bin`/`.pt` file, or a folder with `config.json` + `pytorch_model.bin`.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The `text_encoder` folder to write (`config.json` + `model.safetensors`); must not exist.
    #[arg(long)]
    out: PathBuf,
    /// Also write an fp16 delta against the model's own text encoder (only the tensors that differ: AdvUnlearn
    /// freezes the embeddings), which `--text-encoder FILE` applies to that encoder and refuses on any other.
    #[arg(long)]
    delta: Option<PathBuf>,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let model = a.model.model_dir();
    let written = unsee::pickle::convert_text_encoder(&a.checkpoint, &model, &a.out)?;
    // The check: the converted folder plugs into the model.
    let mut check = a.model.base();
    check.set_text_encoder(a.out.clone());
    let converted = check.open()?;
    if let Some(d) = &a.delta {
        let own = a.model.base().open()?;
        let about = format!("converted from {}", written.source.display());
        unsee::erase::harden::write_delta(&own.model().text_encoder, &converted.model().text_encoder, &about, true, d)?;
    }
    if a.json {
        print_json(&written)
    } else {
        eprintln!("wrote {} ({} tensors, from {})", a.out.display(), written.tensors, written.source.display());
        Ok(())
    }
}
