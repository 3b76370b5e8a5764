//! `unsee encode`: the text encoder's `last_hidden_state` (and token ids) of prompts, as safetensors.

use std::path::PathBuf;

use super::ModelArgs;
use unsee::error::Result;
use unsee::weights::{OwnedTensor, write_safetensors};

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> Result<()> {
    let engine = a.model.open()?;
    let mut tensors = vec![];
    for (k, p) in a.prompts.iter().enumerate() {
        let (hidden, tokens) = engine.encode_prompt(p)?;
        let [_, s, d] = hidden.dims();
        tensors.push(OwnedTensor::f32(format!("prompt.{k}.hidden"), vec![s, d], &unsee::tensor::to_f32_vec(hidden)?));
        let ids: Vec<i64> = tokens.ids.iter().map(|&i| i as i64).collect();
        tensors.push(OwnedTensor::i64(format!("prompt.{k}.input_ids"), &ids));
    }
    write_safetensors(&a.out, &tensors, None)?;
    eprintln!("wrote {} prompt(s) to {}", a.prompts.len(), a.out.display());
    Ok(())
}
