#!/usr/bin/env python3
"""The PyTorch/diffusers side of `cargo bench --bench unet_step`: one UNet denoising step (batch 2, as with
classifier-free guidance) or one VAE decode (batch 1) on the CPU, in f32, with the same thread count as the Rust side.

    python tests/reference/bench_torch.py MODEL_DIR SIZE_PX STEPS THREADS [unet|vae]   -> one JSON line on stdout
"""
import json
import resource
import sys
import time

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel


def main():
    model_dir, size, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    torch.set_num_threads(threads)
    part = sys.argv[5] if len(sys.argv) > 5 else "unet"
    import os
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
