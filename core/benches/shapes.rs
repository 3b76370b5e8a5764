//! The shapes model, measured by the oracle on images the runtime generates (issue #6):
//! 1. quality: shape and colour accuracy on held-out templates, for colour × shape pairs seen in training and for
//!    the held-out pairs;
//! 2. erasure: for every method, erase a shape (circle → square), a colour (red → blue) and a pair (blue circle →
//!    blue square); efficacy (share of concept images that still show the concept), replacement (share showing
//!    the replacement), specificity (accuracy on the other pairs before → after), and efficacy under the
//!    composition and embedding attacks (`unsee::shapes::eval`).
//!
//! ```text
//! cargo bench --bench shapes        # UNSEE_SHAPES_MODEL (default models/shapes-sd), UNSEE_SHAPES_N (images per
//!                                   # prompt, default 4), UNSEE_SHAPES_STEPS (20), UNSEE_SHAPES_GUIDANCE (4.0),
//!                                   # UNSEE_SHAPES_METHODS (uce,time,speed,rece,erasepro,erasepro-text; "" =
//!                                   # quality only), UNSEE_SHAPES_QUALITY=0 skips the quality table,
//!                                   # UNSEE_SHAPES_TABLE=0 the erasure table
//! ```
//!
//! 3. attacks (issue #12): per erasure (UNSEE_SHAPES_ATTACK_ERASURES, default "0,1": circle → square, red → blue)
//!    and method (UNSEE_SHAPES_ATTACK_METHODS, default "none,uce,rece,erasepro-text"; "none" = the base model),
//!    the optimised typed-prompt attack (UNSEE_SHAPES_ATTACK_RUNS runs, default 12; budget
//!    UNSEE_SHAPES_ATTACK_TIMESTEPS × UNSEE_SHAPES_ATTACK_ITERATIONS, default 10 × 20, 5 prefix tokens), a control
//!    with random prefixes, and textual inversion (UNSEE_SHAPES_INVERSION_STEPS, default 300, on 8 target images,
//!    judged on the same number of generations; UNSEE_SHAPES_ATTACK_SEED, default 0, moves every seed of the
//!    attacks and their judged pictures); "" skips the table.
//!
//! Hardened text encoders (issue #13): UNSEE_SHAPES_HARDENED="0=FILE,1=FILE" (erasure index = a `text_encoder`
//! folder or delta file from `unsee harden`) adds rows "harden" (the encoder swapped in) and "harden + uce" (UCE
//! computed on top, with that encoder; UNSEE_SHAPES_HARDENED_UCE=0 leaves it out) to both tables; with
//! UNSEE_SHAPES_METHODS="" the erasure table then holds the hardened rows only.

use std::path::PathBuf;
use std::time::Instant;

use unsee::device::{DeviceChoice, select};
use unsee::erase::spec::Method;
use unsee::load::{LoadOptions, StableDiffusion};
use unsee::shapes::Readout;
use unsee::shapes::eval::{AttackBudget, AttackRow, Erasure, Measure, Row, Settings, attack_model_row, attack_row,
                          baseline, measure, measure_model, quality};

/// The hardened variants of erasure `i` named in UNSEE_SHAPES_HARDENED: ("harden", model), ("harden + uce", model).
fn hardened(base: &StableDiffusion, model: &std::path::Path, erasure: &Erasure, i: usize) -> Vec<(String, StableDiffusion)> {
    let Ok(list) = std::env::var("UNSEE_SHAPES_HARDENED") else { return vec![] };
    let mut out = vec![];
    for entry in list.split(',').filter(|e| !e.is_empty()) {
        let (k, path) = entry.split_once('=').expect("UNSEE_SHAPES_HARDENED: i=FILE,…");
        if k.parse::<usize>().expect("UNSEE_SHAPES_HARDENED: erasure index") != i {
            continue;
        }
        // `cargo bench` runs in core/: a relative path is taken from the repository root.
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
        let opts = LoadOptions { text_encoder: Some(path), ..LoadOptions::default() };
        let h = StableDiffusion::load(model, base.device.clone(), &opts).unwrap();
        let with_uce = env("UNSEE_SHAPES_HARDENED_UCE", 1) != 0;
        let hu = with_uce.then(|| {
            let mut hu = h.clone();
            unsee::erase::erase(&mut hu, &erasure.spec(Method::Uce).unwrap()).unwrap();
            hu
        });
        out.push(("harden".to_string(), h));
        out.extend(hu.map(|hu| ("harden + uce".to_string(), hu)));
    }
    out
}
use unsee::weights::Precision;

fn env<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn pct(n: usize, of: usize) -> String {
    format!("{:.1}", 100.0 * Readout::rate(n, of))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = std::env::var("UNSEE_SHAPES_MODEL").map(PathBuf::from).unwrap_or(repo.join("models/shapes-sd"));
    let model = if model.is_relative() { std::env::current_dir().unwrap().join(model) } else { model };
    let s = Settings { n: env("UNSEE_SHAPES_N", 4), steps: env("UNSEE_SHAPES_STEPS", 20),
                       guidance: env("UNSEE_SHAPES_GUIDANCE", 4.0) };
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let base = StableDiffusion::load(&model, dev, &LoadOptions::default()).unwrap();
    println!("model {}, {} images per prompt, {} DDIM steps, guidance {}\n", model.display(), s.n, s.steps, s.guidance);

    // 1. Quality.
    if env("UNSEE_SHAPES_QUALITY", 1) != 0 {
        let (seen, held) = quality(&base, &s).unwrap();
        println!("| prompts | images | shape % | colour % | both % | exactly one object % |");
        println!("|---|---|---|---|---|---|");
        for (name, r) in [("seen pairs, held-out templates", &seen), ("held-out pairs, held-out templates", &held)] {
            println!("| {name} | {} | {} | {} | {} | {} |", r.images, pct(r.shape, r.images),
                     pct(r.colour, r.images), pct(r.both, r.images), pct(r.one_object, r.images));
        }
        println!();
    }

    // 2. Erasure.
    let methods: Vec<Method> = std::env::var("UNSEE_SHAPES_METHODS")
        .unwrap_or_else(|_| "uce,time,speed,rece,erasepro,erasepro-text".into())
        .split(',')
        .filter(|m| !m.is_empty())
        .map(|m| m.parse().unwrap_or_else(|e| panic!("UNSEE_SHAPES_METHODS: {e}")))
        .collect();
    if (!methods.is_empty() || std::env::var("UNSEE_SHAPES_HARDENED").is_ok()) && env("UNSEE_SHAPES_TABLE", 1) != 0 {
        erasure_table(&base, &model, &s, &methods);
    }

    // 3. Attacks.
    let attack_methods: Vec<Option<Method>> = std::env::var("UNSEE_SHAPES_ATTACK_METHODS")
        .unwrap_or_else(|_| "none,uce,rece,erasepro-text".into())
        .split(',')
        .filter(|m| !m.is_empty())
        .map(|m| (m != "none").then(|| m.parse().unwrap_or_else(|e| panic!("UNSEE_SHAPES_ATTACK_METHODS: {e}"))))
        .collect();
    if attack_methods.is_empty() && std::env::var("UNSEE_SHAPES_HARDENED").is_err() {
        return;
    }
    let mut budget = AttackBudget { runs: env("UNSEE_SHAPES_ATTACK_RUNS", 12), prompt: Default::default(),
                                    inversion: Default::default(), inversion_targets: 8,
                                    seed: env("UNSEE_SHAPES_ATTACK_SEED", 0) };
    budget.prompt.timesteps = env("UNSEE_SHAPES_ATTACK_TIMESTEPS", 10);
    budget.prompt.iterations = env("UNSEE_SHAPES_ATTACK_ITERATIONS", 20);
    budget.inversion.steps = env("UNSEE_SHAPES_INVERSION_STEPS", 300);
    println!("\nattacks: {} runs each; prompt attack {} prefix tokens, {} timesteps × {} iterations; inversion {} steps \
              on {} target images\n", budget.runs, budget.prompt.tokens, budget.prompt.timesteps,
             budget.prompt.iterations, budget.inversion.steps, budget.inversion_targets);
    println!("{}", AttackRow::HEADER);
    let standard = Erasure::standard();
    for i in std::env::var("UNSEE_SHAPES_ATTACK_ERASURES").unwrap_or_else(|_| "0,1".into()).split(',') {
        let i = i.parse::<usize>().expect("UNSEE_SHAPES_ATTACK_ERASURES: indices 0-2");
        let erasure = &standard[i];
        for (name, sd) in hardened(&base, &model, erasure, i) {
            let t = Instant::now();
            match attack_model_row(&base, erasure, &sd, &name, &s, &budget) {
                Ok(row) => println!("{}", row.markdown()),
                Err(e) => println!("| {} | {name} | error: {e} | | | | | |", erasure.name),
            }
            eprintln!("attacks on {} / {name}: {:.0}s", erasure.name, t.elapsed().as_secs_f64());
        }
        for method in &attack_methods {
            let t = Instant::now();
            match attack_row(&base, erasure, *method, &s, &budget) {
                Ok(row) => println!("{}", row.markdown()),
                Err(e) => println!("| {} | {method:?} | error: {e} | | | | | |", erasure.name),
            }
            eprintln!("attacks on {} / {method:?}: {:.0}s", erasure.name, t.elapsed().as_secs_f64());
        }
    }
}

fn erasure_table(base: &StableDiffusion, model: &std::path::Path, s: &Settings, methods: &[Method]) {
    let (base, s) = (base, *s);
    println!("{}", Row::HEADER);
    let what = Measure { specificity: true, attacks: true };
    for (i, erasure) in Erasure::standard().into_iter().enumerate() {
        let rows = hardened(base, model, &erasure, i);
        if rows.is_empty() && methods.is_empty() {
            continue;
        }
        let base_line = baseline(base, &erasure, &s, what).unwrap();
        for (name, sd) in rows {
            let t = Instant::now();
            match measure_model(base, &erasure, &sd, &name, &s, &base_line, what) {
                Ok(row) => println!("{}", row.markdown()),
                Err(e) => println!("| {} | {name} | error: {e} | | | | | |", erasure.name),
            }
            eprintln!("{} / {name}: {:.0}s", erasure.name, t.elapsed().as_secs_f64());
        }
        for method in methods {
            let t = Instant::now();
            match measure(base, &erasure, *method, &s, &base_line, what) {
                Ok(row) => println!("{}", row.markdown()),
                Err(e) => println!("| {} | {method} | error: {e} | | | | | |", erasure.name),
            }
            eprintln!("{} / {method}: {:.0}s", erasure.name, t.elapsed().as_secs_f64());
        }
    }
}
