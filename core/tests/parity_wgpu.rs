//! The same parity checks on the wgpu device (in CI: lavapipe, Mesa's software Vulkan driver).
//!
//! Tolerances on wgpu: the same as on the CPU (absolute, scaled by max(1, max |golden|)): text encoder, UNet and
//! VAE 1e-4; complete 10-step runs 1e-3. Measured on lavapipe (2026-11-24): components within 6e-6, full runs
//! within 2e-4.
//!
//! These tests fail when no wgpu adapter exists (install `mesa-vulkan-drivers`); set `UNSEE_SKIP_GPU_TESTS=1` to
//! skip them on a machine without Vulkan.

mod common;

use std::sync::Once;

use common::checks as cpu;
use common::*;
use unsee::device::DeviceChoice;
use unsee::scheduler::SchedulerKind;

static INIT: Once = Once::new();

fn gpu_available() -> bool {
    INIT.call_once(|| {
        // Autotune benchmarks every new shape; on a software rasteriser that costs more than it saves.
        if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
            // SAFETY: runs once, before any backend thread is started by this test binary.
            unsafe { std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal") };
        }
    });
    if std::env::var_os("UNSEE_SKIP_GPU_TESTS").is_some() {
        eprintln!("UNSEE_SKIP_GPU_TESTS is set: skipping the wgpu parity test");
        return false;
    }
    assert!(
        !unsee::device::list_adapters().is_empty(),
        "no wgpu adapter: install a Vulkan driver (Debian: mesa-vulkan-drivers) or set UNSEE_SKIP_GPU_TESTS=1"
    );
    true
}

#[test]
fn tiny_model_matches_diffusers_on_wgpu() {
    if !gpu_available() {
        return;
    }
    let sd = cpu::load("tiny", DeviceChoice::Gpu);
    assert!(sd.device.is_gpu);
    eprintln!("device: {}", sd.device.description);
    let g = Golden::load("tiny");
    cpu::check_text_encoder(&sd, &g, 1e-4);
    cpu::check_unet(&sd, &g, 1e-4);
    cpu::check_vae(&sd, &g, 1e-4);
    for (name, kind) in [("ddim", SchedulerKind::Ddim), ("euler_a", SchedulerKind::EulerAncestral),
                         ("dpmpp_2m_karras", SchedulerKind::DpmSolverPP2M { karras: true })] {
        cpu::check_run(&sd, &g, name, kind, 1e-3);
    }
}

#[test]
fn tiny_model_in_f16_on_wgpu_stays_close_to_diffusers() {
    if !gpu_available() {
        return;
    }
    let dev = unsee::device::select(DeviceChoice::Gpu, unsee::weights::Precision::F16);
    let dev = match dev {
        Ok(d) => d,
        Err(e) => {
            // A device without shader-f16 must refuse f16 clearly; that refusal is the behaviour under test then.
            assert!(e.to_string().contains("cannot compute in f16"), "{e}");
            return;
        }
    };
    let sd = unsee::load::StableDiffusion::load(&model_dir("tiny"), dev, &Default::default()).unwrap();
    let g = Golden::load("tiny");
    // Half precision through ~40 layers and 10 steps: the same bound as f16 on the CPU (measured on lavapipe: 0.136
    // of latents up to 27, 5e-3; 0.44 before convolutions on a GPU summed in f32).
    cpu::check_run(&sd, &g, "ddim", SchedulerKind::Ddim, 1e-2);
}

/// A device that binds less than the token-embedding table (as lavapipe and many phones do for full-size SD-1.5,
/// whose table is 152 MB against 128 MiB): the table stays on the CPU, the prompt's rows are looked up there, and
/// the results are unchanged; a device too small for an ordinary weight is refused by name before any weight is
/// read. The limit is set on the selected device to simulate the smaller one.
#[test]
fn a_small_binding_limit_keeps_the_table_on_the_cpu() {
    if !gpu_available() {
        return;
    }
    use unsee::load::{LoadOptions, StableDiffusion};
    let mut dev = unsee::device::select(DeviceChoice::Gpu, unsee::weights::Precision::F32).unwrap();
    // tiny-sd: the table is 49,408 × 32 f32 = 6.3 MB; its largest other weight is well under 1 MB.
    dev.max_binding_bytes = Some(4 << 20);
    let sd = StableDiffusion::load(&model_dir("tiny"), dev.clone(), &LoadOptions::default()).unwrap();
    assert!(sd.text_encoder.table_is_offloaded());
    let g = Golden::load("tiny");
    cpu::check_text_encoder(&sd, &g, 1e-4);
    dev.max_binding_bytes = Some(16 << 10);
    match StableDiffusion::load(&model_dir("tiny"), dev, &LoadOptions::default()) {
        Err(e @ unsee::Error::DeviceUnavailable(_)) => assert!(e.to_string().contains("binds at most"), "{e}"),
        other => panic!("expected DeviceUnavailable, got {:?}", other.map(|_| ())),
    }
}

#[test]
fn batched_keys_on_wgpu_equal_one_prompt_encoding() {
    // On a GPU the batches are padded to a multiple of 8 positions and a power-of-two number of rows (copies of the
    // last prompt): the keys must still be each prompt's own.
    if !gpu_available() {
        return;
    }
    use unsee::erase::keys::Keys;
    use unsee::erase::spec::TokenMode;
    let sd = cpu::load("tiny", DeviceChoice::Gpu);
    let prompts: Vec<String> = ["cat", "a red circle", "van gogh's starry night over the river", "", "x y z"]
        .iter().map(|s| s.to_string()).collect();
    let mut batched = Keys::new(&sd);
    batched.prefetch(&prompts, TokenMode::Last).unwrap();
    assert_eq!(batched.cached(), prompts.len());
    let mut single = Keys::new(&sd);
    for p in &prompts {
        let (a, b) = (batched.last_token(p).unwrap(), single.last_token(p).unwrap());
        let (a, b): (Vec<f32>, Vec<f32>) = (a.iter().map(|&x| x as f32).collect(), b.iter().map(|&x| x as f32).collect());
        assert_close(&format!("key of {p:?}"), &a, &b, 1e-5);
    }
}

/// Quantized and f16 bundles on wgpu: burn's GPU quantized tensors cannot hold the bundle format (see
/// `quant::quantized_pack`), so a GPU engine loads its quantized weights widened (`q × scale`, as the CPU computes
/// per call) and must draw what the CPU draws from the same bundle: the same latents within the tolerance of a
/// complete run, and the oracle reading the same shapes and colours.
#[test]
fn quantized_bundles_draw_on_wgpu_what_they_draw_on_the_cpu() {
    use burn::tensor::DType;
    use unsee::bundle::BuildOptions;
    use unsee::engine::{Engine, EngineOptions};
    use unsee::pipeline::{Control, GenerateRequest, Inputs, Target};
    use unsee::quant::Quant;
    if !gpu_available() {
        return;
    }
    let shapes = repo().join("models/shapes-sd");
    let base = Engine::open(&EngineOptions { model: shapes, ..EngineOptions::default() }).unwrap();
    let req = GenerateRequest { prompt: "a green triangle and a red circle".into(), steps: 4, guidance: 4.0, seed: 5,
                                ..GenerateRequest::default() };
    for quant in [Quant::Int8, Quant::Int4, Quant::F16] {
        let dir = tmp_dir("parity_wgpu", &format!("bundle-{}", quant.name()));
        base.build_bundle(&BuildOptions { quant, sign: None, creator: "test".into() }, &dir, &mut |_, _, _| {})
            .unwrap();
        let open = |device| Engine::open(&EngineOptions { model: dir.clone(), device, ..EngineOptions::default() })
            .unwrap();
        let (cpu, gpu) = (open(DeviceChoice::Cpu), open(DeviceChoice::Gpu));
        assert!(gpu.info().unwrap().device.contains("gpu"), "{}", gpu.info().unwrap().device);
        let to_q = |e: &Engine| e.model().unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight
            .val().dtype();
        if quant != Quant::F16 {
            assert!(matches!(to_q(&cpu), DType::QFloat(_)), "{quant:?} on the CPU: {:?}", to_q(&cpu));
            assert_eq!(to_q(&gpu), DType::F32, "{quant:?} on wgpu");
        }
        let draw = |e: &Engine, target| e.generate(&req, Inputs::default(), &mut |_| Control::Continue, target).unwrap();
        let (a, b) = (draw(&cpu, Target::Latents).latents, draw(&gpu, Target::Latents).latents);
        let (a, b) = (a.into_data().try_to_vec::<f32>().unwrap(), b.into_data().try_to_vec::<f32>().unwrap());
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        let err = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max) / scale;
        eprintln!("{} bundle: CPU vs wgpu latents, max error {err:.2e}", quant.name());
        assert!(err <= 1e-3, "{} bundle: CPU vs wgpu latents differ by {err}", quant.name());
        let read = |e: &Engine| {
            let g = draw(e, Target::Rgba);
            // What the oracle reads (shape and colour of each object), not its float measurements.
            let mut found = unsee::shapes::analyse(&g.rgba, g.width, g.height, 4)
                .into_iter().map(|d| format!("{:?} {:?}", d.colour, d.shape)).collect::<Vec<_>>();
            found.sort();
            found
        };
        assert_eq!(read(&cpu), read(&gpu), "{} bundle: the oracle reads another picture on wgpu", quant.name());
    }
}

/// f16 on wgpu, one layer at a time at full-size SD-1.5's widths and sizes (VAE 512 channels, UNet 1,280; planes up
/// to 512²), against the same layer in f32 on the CPU: half precision may round the inputs and outputs, but every
/// sum must be kept in f32 — an f16 running sum over K = 4,608 products loses ~2 % (burn's direct convolution on
/// lavapipe did, 2026-11-27). Group norm and attention also in f32 on wgpu, where burn 0.22 alone was wrong (group
/// norm over groups of 262,144 values) or failed (8 heads over 4,096 positions).
#[test]
fn full_size_layers_on_wgpu_match_the_cpu() {
    use burn::module::Param;
    use burn::nn::GroupNorm;
    use burn::tensor::{DType, Distribution, Tensor};
    use unsee::nn::{Forward, conv2d, group_norm, multi_head_attention, norm};
    if !gpu_available() {
        return;
    }
    let Ok(dev) = unsee::device::select(DeviceChoice::Gpu, unsee::weights::Precision::F16) else { return };
    let (gpu, cpu) = (dev.device.clone(), burn::tensor::Device::flex());
    let half = |t: &Tensor<4>| t.clone().to_device(&gpu).cast(DType::F16);
    let rel = |what: &str, got: Tensor<4>, want: Tensor<4>| {
        let (g, w) = (host(got.cast(DType::F32).to_device(&cpu)), host(want));
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = max_abs_diff(&g, &w).0 / scale;
        eprintln!("{what}: wgpu vs f32 on the CPU, max error {err:.2e} of the largest value");
        err
    };
    let mut errs = vec![];
    // The last two are widened in bands of rows (over 32 MiB in f32): 2 bands, and 3 bands of a stride-2 window
    // padded only below and right (the VAE encoder's downsampler).
    for (ci, co, [h, w], stride, pad) in [(512, 512, [32, 32], 1, [1; 4]), (1280, 1280, [8, 8], 1, [1; 4]),
                                          (64, 64, [16, 16], 1, [1; 4]), (256, 8, [40, 1024], 1, [1; 4]),
                                          (256, 8, [64, 1024], 2, [0, 0, 1, 1])] {
        let mut c = conv2d(ci, co, 3, stride, 0, &cpu);
        c.padding = burn::nn::PaddingConfig2d::Explicit(pad[0], pad[1], pad[2], pad[3]);
        let x = Tensor::<4>::random([1, ci, h, w], Distribution::Normal(0.0, 1.0), &cpu);
        let want = c.fwd(x.clone());
        let mut g = c.clone();
        g.weight = Param::from_tensor(half(&c.weight.val()));
        g.bias = c.bias.as_ref().map(|b| Param::from_tensor(b.val().to_device(&gpu).cast(DType::F16)));
        errs.push(rel(&format!("conv 3×3/{stride} {ci}→{co} at {h}×{w}"), g.fwd(half(&x)), want));
    }
    // 128 channels at 256² (262,144 values per group) came out hundreds off in burn's f16 group norm; 512² is
    // widened in bands of 8 groups.
    for (c, hw) in [(512, 32), (128, 128), (128, 256), (128, 512)] {
        let mut gn = group_norm(32, c, 1e-6, &cpu);
        gn.gamma = gn.gamma.map(|_| Param::from_tensor(Tensor::random([c], Distribution::Normal(1.0, 0.5), &cpu)));
        gn.beta = gn.beta.map(|_| Param::from_tensor(Tensor::random([c], Distribution::Normal(0.0, 0.5), &cpu)));
        let x = Tensor::<4>::random([1, c, hw, hw], Distribution::Normal(3.0, 1.0), &cpu);
        let want = norm(&gn, x.clone(), true);
        let mut g = gn.clone();
        g.gamma = gn.gamma.as_ref().map(|p| Param::from_tensor(p.val().to_device(&gpu).cast(DType::F16)));
        g.beta = gn.beta.as_ref().map(|p| Param::from_tensor(p.val().to_device(&gpu).cast(DType::F16)));
        errs.push(rel(&format!("group norm + SiLU {c} ch at {hw}²"), norm(&g, half(&x), true), want.clone()));
        // The same in f32 (burn's `mean_dim` on wgpu is wrong past ~500,000 values even in f32).
        let g32 = GroupNorm { gamma: gn.gamma.as_ref().map(|p| Param::from_tensor(p.val().to_device(&gpu))),
                              beta: gn.beta.as_ref().map(|p| Param::from_tensor(p.val().to_device(&gpu))), ..gn };
        let e32 = rel("  same in f32 on wgpu", norm(&g32, x.to_device(&gpu), true), want);
        assert!(e32 <= 1e-5, "group norm {c} ch at {hw}² in f32 on wgpu: {e32:.2e}");
    }
    // The last in chunks of queries (8 heads over 4,096 positions: 512 MiB of f32 scores, more than lavapipe binds).
    for (heads, c, tokens) in [(1, 512, 1024), (8, 320, 1024), (8, 64, 4096)] {
        let qkv: Vec<Tensor<3>> = (0..3).map(|_| Tensor::random([1, tokens, c], Distribution::Normal(0.0, 1.0), &cpu))
            .collect();
        let want = multi_head_attention(qkv[0].clone(), qkv[1].clone(), qkv[2].clone(), heads, false);
        let h: Vec<Tensor<3>> = qkv.iter().map(|t| t.clone().to_device(&gpu).cast(DType::F16)).collect();
        let got = multi_head_attention(h[0].clone(), h[1].clone(), h[2].clone(), heads, false);
        errs.push(rel(&format!("attention {heads}×{} over {tokens} tokens", c / heads), got.unsqueeze(),
                      want.clone().unsqueeze()));
        let f: Vec<Tensor<3>> = qkv.into_iter().map(|t| t.to_device(&gpu)).collect();
        let got = multi_head_attention(f[0].clone(), f[1].clone(), f[2].clone(), heads, false);
        let e32 = rel("  same in f32 on wgpu", got.unsqueeze(), want.unsqueeze());
        assert!(e32 <= 1e-5, "attention {heads}×{} over {tokens} tokens in f32 on wgpu: {e32:.2e}", c / heads);
    }
    for (i, e) in errs.iter().enumerate() {
        assert!(*e <= 5e-3, "layer {i}: f16 on wgpu is {e:.2e} of the largest value away from f32");
    }
}
