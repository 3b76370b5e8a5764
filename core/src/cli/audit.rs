//! `unsee audit`: leakage of erased concepts (plain and under the embedding attack) and drift of preserved prompts,
//! on held-out templates.

use std::path::PathBuf;

use super::{ModelArgs, print_json};
use unsee::erase::spec::Spec;
use unsee::error::Result;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// The edit spec: the concepts, replacements and preserve set to audit. With --erasure, the audited edit is
    /// those files (applied in order after the baseline is measured); without, it is computed from the spec.
    #[arg(long)]
    spec: PathBuf,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = Spec::from_file(&a.spec)?;
    let report = a.model.open()?.audit(&spec)?;
    if a.json {
        print_json(&report)
    } else {
        println!("{}", report.table());
        Ok(())
    }
}
