//! The cost of one gradient-attack iteration on a full-size SD-1.5 (random weights from `models/sd15-config`, built
//! in memory; CPU, f32, batch 1), against one plain UNet forward (what a sampling step costs per CFG half) measured
//! in the same run:
//!
//! - attack iteration = text encoder forward on token embeddings with a prefix leaf + UNet forward + backward to
//!   the leaf (what UnlearnDiffAtk and textual inversion do per step, [`unsee::erase::attack`]);
//! - harden outer step = the same through a text encoder whose weights are autodiff parameters, plus burn-optim's
//!   Adam step on them (what `unsee harden` does once per iteration, after its `attack_steps` inner attack
//!   iterations);
//! - peak RSS after both (the backward keeps every activation).
//!
//! ```text
//! cargo bench --bench attack_cost          # UNSEE_ATTACK_SIZES (default "256"; "256,512"), UNSEE_ATTACK_REPEATS (3)
//! ```

use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use unsee::clip::{CLIPTextModel, ClipTextConfig};
use unsee::device::{DeviceChoice, select};
use burn::module::Module;
use unsee::erase::attack::loss::{gradient, leaf};
use unsee::unet::{UNet2DConditionModel, UNetConfig};
use unsee::weights::Precision;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/sd15-config");
    let dev = select(DeviceChoice::Cpu, Precision::F32).unwrap();
    let d = &dev.device;
    let tcfg: ClipTextConfig = unsee::model::read_config(&root, "text_encoder", "config.json").unwrap();
    let ucfg: UNetConfig = unsee::model::read_config(&root, "unet", "config.json").unwrap();
    let te = CLIPTextModel::new(&tcfg, d).unwrap();
    let unet = UNet2DConditionModel::new(&ucfg, d).unwrap();
    let repeats: usize = std::env::var("UNSEE_ATTACK_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let sizes: Vec<usize> = std::env::var("UNSEE_ATTACK_SIZES").unwrap_or_else(|_| "256".into())
        .split(',').map(|s| s.trim().parse().expect("UNSEE_ATTACK_SIZES: pixel sizes")).collect();
    println!("full-size SD-1.5 (random weights), CPU f32, batch 1, {repeats} repeats (median)\n");
    println!("| image | UNet forward s | attack iteration (TE + UNet forward + backward) s | ratio | harden outer step s \
              | ratio | peak RSS MiB |");
    println!("|---|---|---|---|---|---|---|");
    let mut trained = te.clone().fork(&d.clone().autodiff()).train().set_require_grad(true);
    trained.text_model.embeddings = trained.text_model.embeddings.no_grad();
    let mut optim = burn::optim::AdamConfig::new().init();
    let hidden = tcfg.hidden_size;
    for size in sizes {
        let lat = size / 8;
        let x = Tensor::<4>::random([1, 4, lat, lat], Distribution::Normal(0.0, 1.0), d);
        let tokens = Tensor::<3>::random([1, 72, hidden], Distribution::Normal(0.0, 0.02), d);
        let prefix0 = Tensor::<3>::random([1, 5, hidden], Distribution::Normal(0.0, 0.02), d);
        let ctx = te.forward_embeds(Tensor::cat(vec![prefix0.clone(), tokens.clone()], 1));
        // Warm-up: burn initialises the random parameters lazily, at their first use.
        unsee::tensor::to_f32_vec(unet.forward(x.clone(), 500.0, &ctx).sum()).unwrap();
        let (mut fwd, mut it, mut outer) = (vec![], vec![], vec![]);
        for _ in 0..repeats {
            let t = Instant::now();
            let out = unet.forward(x.clone(), 500.0, &ctx);
            unsee::tensor::to_f32_vec(out.sum()).unwrap();
            fwd.push(t.elapsed().as_secs_f64());

            let t = Instant::now();
            let p = leaf(prefix0.clone());
            let c = te.forward_embeds(Tensor::cat(vec![p.clone(), tokens.clone()], 1));
            let e = unet.forward(x.clone(), 500.0, &c) - x.clone();
            let loss = (e.clone() * e).mean();
            let g = gradient(&loss, &p).unwrap();
            unsee::tensor::to_f32_vec(g.sum()).unwrap();
            it.push(t.elapsed().as_secs_f64());

            let t = Instant::now();
            let c = trained.forward_embeds(Tensor::cat(vec![prefix0.clone(), tokens.clone()], 1).autodiff());
            let e = unet.forward(x.clone(), 500.0, &c) - x.clone();
            let loss = (e.clone() * e).mean();
            let grads = burn::optim::GradientsParams::from_grads(loss.backward(), &trained);
            trained = optim.step(1e-5, trained, grads);
            outer.push(t.elapsed().as_secs_f64());
        }
        let (f, i, o) = (median(fwd), median(it), median(outer));
        println!("| {size}² | {f:.2} | {i:.2} | {:.2}× | {o:.2} | {:.2}× | {:.0} |", i / f, o / f, peak_rss_mib());
    }
}
