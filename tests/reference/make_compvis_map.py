#!/usr/bin/env python3
"""Write the CompVis (single-file) key names of the `small` reference model, validated by diffusers.

The map diffusers-name -> CompVis-name is built here and checked by running diffusers' own single-file converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`) on the CompVis
checkpoint it produces: they must give back exactly the original state dicts. The Rust test
`core/tests/single_file.rs` uses the map to assemble a single-file checkpoint from the folder and checks that
loading it gives the same outputs as the goldens.

    python tests/reference/make_compvis_map.py   ->  tests/fixtures/small/compvis_keys.json
"""
import json
import pathlib

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                 convert_ldm_vae_checkpoint)
from safetensors.torch import load_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "tests" / "fixtures" / "small-sd"

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
          ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET = [("conv_shortcut", "nin_shortcut")]


def sub(rest, table):
    for a, b in table:
        if rest.startswith(a + "."):
            return b + rest[len(a):]
    return rest


def unet_to_ldm(k, cfg):
    L = cfg["layers_per_block"]
    fixed = {"conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
             "time_embedding.linear_2.": "time_embed.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2."}
    for a, b in fixed.items():
        if k.startswith(a):
            return b + k[len(a):]
    p = k.split(".")
    if p[0] == "down_blocks":
        i = int(p[1])
        if p[2] == "downsamplers":
            return f"input_blocks.{1 + i * (L + 1) + L}.0.op." + ".".join(p[5:])
        j = int(p[3])
        n = 1 + i * (L + 1) + j
        rest = ".".join(p[4:])
        return f"input_blocks.{n}.0." + sub(rest, RESNET) if p[2] == "resnets" else f"input_blocks.{n}.1." + rest
    if p[0] == "mid_block":
        rest = ".".join(p[3:])
        if p[1] == "attentions":
            return "middle_block.1." + rest
        return f"middle_block.{0 if p[2] == '0' else 2}." + sub(rest, RESNET)
    if p[0] == "up_blocks":
        i = int(p[1])
        has_attn = cfg["up_block_types"][i] == "CrossAttnUpBlock2D"
        if p[2] == "upsamplers":
            return f"output_blocks.{i * (L + 1) + L}.{2 if has_attn else 1}.conv." + ".".join(p[5:])
        j = int(p[3])
        n = i * (L + 1) + j
        rest = ".".join(p[4:])
        return f"output_blocks.{n}.0." + sub(rest, RESNET) if p[2] == "resnets" else f"output_blocks.{n}.1." + rest
    raise KeyError(k)


def vae_to_ldm(k, cfg):
    n = len(cfg["block_out_channels"])
    if k.startswith("quant_conv.") or k.startswith("post_quant_conv."):
        return k, False
    side, rest = k.split(".", 1)
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out." + rest[len("conv_norm_out."):], False
    if rest.startswith("conv_in.") or rest.startswith("conv_out."):
        return k, False
    p = rest.split(".")
    if p[0] == "mid_block":
        if p[1] == "resnets":
            return f"{side}.mid.block_{int(p[2]) + 1}." + sub(".".join(p[3:]), VAE_RESNET), False
        names = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        tail = ".".join(p[4:]) if p[3] != "to_out" else ".".join(p[5:])
        return f"{side}.mid.attn_1.{names[p[3]]}.{tail}", p[3] != "group_norm" and tail == "weight"
    i = int(p[1])
    if side == "encoder":
        if p[2] == "downsamplers":
            return f"encoder.down.{i}.downsample.conv." + ".".join(p[5:]), False
        return f"encoder.down.{i}.block.{p[3]}." + sub(".".join(p[4:]), VAE_RESNET), False
    i = n - 1 - i
    if p[2] == "upsamplers":
        return f"decoder.up.{i}.upsample.conv." + ".".join(p[5:]), False
    return f"decoder.up.{i}.block.{p[3]}." + sub(".".join(p[4:]), VAE_RESNET), False


def main():
    unet_sd = load_file(MODEL / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    vae_sd = load_file(MODEL / "vae" / "diffusion_pytorch_model.fp16.safetensors")
    te_sd = load_file(MODEL / "text_encoder" / "model.fp16.safetensors")
    unet_cfg = dict(UNet2DConditionModel.load_config(MODEL / "unet"))
    vae_cfg = dict(AutoencoderKL.load_config(MODEL / "vae"))

    ldm, entries = {}, {}
    for k, v in unet_sd.items():
        new = "model.diffusion_model." + unet_to_ldm(k, unet_cfg)
        ldm[new] = v
        entries[new] = ["unet", k, False]
    for k, v in vae_sd.items():
        new, as_conv = vae_to_ldm(k, vae_cfg)
        new = "first_stage_model." + new
        ldm[new] = v[:, :, None, None] if as_conv else v
        entries[new] = ["vae", k, as_conv]
    for k, v in te_sd.items():
        full = k if k.startswith("text_model.") else "text_model." + k
        new = "cond_stage_model.transformer." + full
        ldm[new] = v
        entries[new] = ["text_encoder", k, False]

    # diffusers' single-file converters must give back exactly the folder's tensors.
    back_unet = convert_ldm_unet_checkpoint(ldm, unet_cfg)
    assert back_unet.keys() == unet_sd.keys(), set(back_unet) ^ set(unet_sd)
    assert all(torch.equal(back_unet[k], unet_sd[k]) for k in unet_sd)
    back_vae = convert_ldm_vae_checkpoint(ldm, vae_cfg)
    assert back_vae.keys() == vae_sd.keys(), set(back_vae) ^ set(vae_sd)
    assert all(torch.equal(back_vae[k].reshape(vae_sd[k].shape), vae_sd[k]) for k in vae_sd)
    back_te = convert_ldm_clip_checkpoint(ldm)
    norm = lambda k: k if k.startswith("text_model.") else "text_model." + k
    assert {norm(k) for k in back_te} >= {norm(k) for k in te_sd}
    assert all(torch.equal(back_te[norm(k)], v) for k, v in te_sd.items())

    out = ROOT / "tests" / "fixtures" / "small" / "compvis_keys.json"
    out.write_text(json.dumps(entries, indent=0, sort_keys=True))
    print(f"wrote {len(entries)} keys to {out}; diffusers' converters reproduce the folder exactly")


if __name__ == "__main__":
    main()
