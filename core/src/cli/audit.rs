//! `unsee audit`: leakage of erased concepts (plain and under the embedding attack) and drift of preserved prompts,
//! on held-out templates; optionally the gradient attacks too (`--attack`, minutes).

use std::path::PathBuf;

use super::{ModelArgs, print_json};
use unsee::erase::attack::{AttackMethod, AttackOptions};
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
    /// Also attack the edit (repeatable): prompt (UnlearnDiffAtk typed prompts), inversion (textual inversion),
    /// embedding (raw conditioning). Judged by the oracle on the shapes world. Costs minutes.
    #[arg(long = "attack", value_enum)]
    attacks: Vec<AttackMethod>,
    /// Attacked generations per attack.
    #[arg(long, default_value_t = 4)]
    attack_runs: usize,
    /// Prompt attack budget: timesteps × iterations per timestep (the paper: 50 × 40).
    #[arg(long, default_value_t = 10)]
    attack_timesteps: usize,
    #[arg(long, default_value_t = 20)]
    attack_iterations: usize,
    /// Inversion budget: optimisation steps.
    #[arg(long, default_value_t = 300)]
    inversion_steps: usize,
    /// DDIM steps and guidance of the attacks' generations.
    #[arg(long, default_value_t = 20)]
    attack_steps: usize,
    #[arg(long, default_value_t = 7.5)]
    attack_guidance: f64,
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<()> {
    let spec = Spec::from_file(&a.spec)?;
    let mut options = vec![];
    for &method in &a.attacks {
        let mut o = AttackOptions::new(method, vec![]);
        (o.runs, o.steps, o.guidance) = (a.attack_runs, a.attack_steps, a.attack_guidance);
        (o.prompt.timesteps, o.prompt.iterations, o.inversion.steps) =
            (a.attack_timesteps, a.attack_iterations, a.inversion_steps);
        AttackOptions { templates: vec!["{}".into()], ..o.clone() }.validate()?;
        options.push(o);
    }
    let engine = a.model.open()?;
    let report = engine.audit(&spec)?;
    let attacks = options.iter()
        .map(|o| engine.attack(&spec, o, &mut |_, _, _| {}, &|| false))
        .collect::<Result<Vec<_>>>()?;
    if a.json {
        return if attacks.is_empty() {
            print_json(&report)
        } else {
            print_json(&serde_json::json!({ "audit": report, "attacks": attacks }))
        };
    }
    println!("{}", report.table());
    if !attacks.is_empty() {
        println!("\n| attack | assumes | concept shows in | seconds |\n|---|---|---|---|");
        for r in &attacks {
            let shows = r.success_pct().map_or("not judged (no oracle for these concepts)".to_string(), |p| {
                format!("{p:.1} % ({} of {} attacked generations)", r.hits.unwrap_or(0), r.of)
            });
            println!("| {} | {} | {shows} | {:.1} |", r.method.name(), r.assumes, r.seconds);
        }
    }
    Ok(())
}
