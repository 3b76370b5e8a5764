#!/usr/bin/env python3
"""The PyTorch/diffusers side of `cargo bench --bench unet_step`: one UNet denoising step (batch 2, as with
classifier-free guidance) or one VAE decode (batch 1) on the CPU, in f32, with the same thread count as the Rust side.

    python tests/reference/bench_torch.py MODEL_DIR SIZE_PX STEPS THREADS [unet|vae|generate]   -> a JSON line

`generate`: one whole run (load, prompt encoding, $UNSEE_BENCH_GEN_STEPS DDIM steps with guidance 7.5, decode) of a
`StableDiffusionPipeline` built from the folder's components, as `unsee generate` does it.

    python tests/reference/bench_torch.py MODEL_DIR SIZE_PX STEPS THREADS staged ddim|lcm GUIDANCE [LORA]

`staged`: the peer of `cargo bench --bench lcm`: load (with the LoRA loaded and fused when given: diffusers'
`load_lora_weights` + `fuse_lora` + `unload_lora_weights`, which needs peft), denoise (prompt encoding included) and
decode timed apart -> {"load_s", "denoise_s", "decode_s", "peak_rss_mib"}.
"""
import json
import resource
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def pipeline(model_dir, scheduler_class):
    """A `StableDiffusionPipeline` from the folder's components in f32 (its fp16 variant when that is all it has)."""
    import os
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer
    fp16 = not os.path.exists(os.path.join(model_dir, "unet", "diffusion_pytorch_model.safetensors"))
    kw = dict(variant="fp16" if fp16 else None, torch_dtype=torch.float32)
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(model_dir, subfolder="vae", **kw),
        text_encoder=CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(model_dir, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", **kw),
        scheduler=scheduler_class.from_pretrained(model_dir, subfolder="scheduler"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def generate(model_dir, size, threads):
    import os
    from diffusers import DDIMScheduler
    torch.set_num_threads(threads)
    steps = int(os.environ.get("UNSEE_BENCH_GEN_STEPS", "2"))
    t0 = time.perf_counter()
    pipe = pipeline(model_dir, DDIMScheduler)
    with torch.no_grad():
        pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps, guidance_scale=7.5,
             height=size, width=size, generator=torch.Generator().manual_seed(7), output_type="np")
    s = time.perf_counter() - t0
    print(json.dumps({"median_s": s, "min_s": s,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch": torch.__version__, "threads": threads}))


def staged(model_dir, size, steps, threads, scheduler, guidance, lora):
    from diffusers import DDIMScheduler, LCMScheduler
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    pipe = pipeline(model_dir, {"ddim": DDIMScheduler, "lcm": LCMScheduler}[scheduler])
    if lora:
        pipe.load_lora_weights(lora)
        pipe.fuse_lora()
        pipe.unload_lora_weights()
    load_s = time.perf_counter() - t0
    with torch.no_grad():
        t0 = time.perf_counter()
        latents = pipe("a photograph of an astronaut riding a horse", num_inference_steps=steps,
                       guidance_scale=guidance, height=size, width=size, generator=torch.Generator().manual_seed(7),
                       output_type="latent").images
        denoise_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pipe.vae.decode(latents / pipe.vae.config.scaling_factor)
        decode_s = time.perf_counter() - t0
    print(json.dumps({"load_s": load_s, "denoise_s": denoise_s, "decode_s": decode_s,
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch": torch.__version__, "threads": threads}))


def main():
    model_dir, size, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    part = sys.argv[5] if len(sys.argv) > 5 else "unet"
    import os
    if part == "generate":
        return generate(model_dir, size, threads)
    if part == "staged":
        lora = sys.argv[8] if len(sys.argv) > 8 else None
        return staged(model_dir, size, steps, threads, sys.argv[6], float(sys.argv[7]), lora)
    sub, cls = ("unet", UNet2DConditionModel) if part == "unet" else ("vae", AutoencoderKL)
    variant = None
    if not os.path.exists(os.path.join(model_dir, sub, "diffusion_pytorch_model.safetensors")):
        variant = "fp16"
    model = cls.from_pretrained(model_dir, subfolder=sub, variant=variant, torch_dtype=torch.float32).eval()
    lat = size // 8
    g = torch.Generator().manual_seed(0)
    if part == "unet":
        x = torch.randn((2, model.config.in_channels, lat, lat), generator=g)
        ctx = torch.randn((2, 77, model.config.cross_attention_dim), generator=g)
        run = lambda: model(x, torch.tensor(500), encoder_hidden_states=ctx)
    else:
        z = torch.randn((1, model.config.latent_channels, lat, lat), generator=g)
        run = lambda: model.decode(z)
    times = []
    with torch.no_grad():
        run()  # warm-up
        for _ in range(steps):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    times.sort()
    print(json.dumps({"median_s": times[len(times) // 2], "min_s": times[0],
                      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "torch": torch.__version__, "threads": threads}))


if __name__ == "__main__":
    main()
