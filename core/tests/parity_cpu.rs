//! Parity with diffusers/transformers (goldens written by `tests/reference/make_models.py`) on the CPU in f32.
//!
//! Tolerances (absolute, scaled by max(1, max |golden|)):
//! - token ids: exact;
//! - text encoder `last_hidden_state`: 1e-4;
//! - UNet noise prediction, VAE decode/encode: 1e-4;
//! - complete 10-step runs, final latents: 1e-3 (the bound).
//!
//! When a comparison fails, the test compares the intermediates (embeddings and each CLIP layer; each top-level UNet
//! block) and names the first one that diverges.

mod common;

use common::checks::*;
use common::*;
use unsee::device::DeviceChoice;
use unsee::scheduler::SchedulerKind;

fn full_suite(model: &str) {
    let sd = load(model, DeviceChoice::Cpu);
    let g = Golden::load(model);
    check_text_encoder(&sd, &g, 1e-4);
    check_unet(&sd, &g, 1e-4);
    check_vae(&sd, &g, 1e-4);
    for (name, kind) in [("ddim", SchedulerKind::Ddim), ("euler_a", SchedulerKind::EulerAncestral),
                         ("dpmpp_2m", SchedulerKind::DpmSolverPP2M { karras: false }),
                         ("dpmpp_2m_karras", SchedulerKind::DpmSolverPP2M { karras: true })] {
        check_run(&sd, &g, name, kind, 1e-3);
    }
}

#[test]
fn tiny_model_matches_diffusers_on_cpu() {
    full_suite("tiny");
}

#[test]
fn small_model_matches_diffusers_on_cpu() {
    full_suite("small");
}
