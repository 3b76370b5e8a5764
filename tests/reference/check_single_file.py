#!/usr/bin/env python3
"""Check an `unsee erase --bake-single-file` checkpoint with diffusers' own single-file loader.

Loads OUT.safetensors with `StableDiffusionPipeline.from_single_file` (configs from the baked diffusers folder) and
the baked folder with `from_pretrained`, and asserts every UNet, VAE and text-encoder tensor is identical.

    cargo run --release -- erase --spec models/specs/shapes-circle.toml --out /tmp/e.safetensors \
        --bake /tmp/baked --bake-single-file /tmp/baked.safetensors
    .venv/bin/python tests/reference/check_single_file.py /tmp/baked.safetensors /tmp/baked

Not run in CI (it needs PyTorch); see README, "Files, baking, audit", for whether it has been run.
"""
import sys

import torch
from diffusers import StableDiffusionPipeline


def main(single, folder):
    ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    got = StableDiffusionPipeline.from_single_file(single, config=folder, safety_checker=None)
    for name in ["unet", "vae", "text_encoder"]:
        a, b = getattr(ref, name).state_dict(), getattr(got, name).state_dict()
        missing = set(a) ^ set(b)
        # transformers keeps position_ids as a buffer in some versions; parameters must match exactly
        missing = {k for k in missing if not k.endswith("position_ids")}
        assert not missing, f"{name}: keys differ: {sorted(missing)[:10]}"
        for k in a:
            if k in b:
                assert torch.equal(a[k], b[k].reshape(a[k].shape)), f"{name}.{k} differs"
        print(f"{name}: {len(a)} tensors identical")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
