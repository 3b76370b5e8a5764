#!/usr/bin/env python3
"""Goldens for few-step sampling: LCMScheduler runs and LoRA files merged by diffusers, on the tiny model.

    tests/reference/.venv/bin/python tests/reference/make_lcm_lora.py

Needs the reference stack of requirements.txt plus `peft` (diffusers' LoRA loader). Writes, into tests/fixtures/tiny/:
    lora_kohya.safetensors    a random rank-4 LoRA in kohya-ss's format (`lora_unet_…`/`lora_te_…`, `.lora_down`,
                              `.lora_up`, `.alpha`): attention projections, feed-forward, proj_in/out, a resnet's
                              3×3 convolutions and time projection, and text-encoder projections and MLP
    lora_peft.safetensors     a random rank-4 LoRA as diffusers' training scripts save it (PEFT `lora_A`/`lora_B`
                              under `unet.`/`text_encoder.`, `lora_adapter_metadata` with lora_alpha = 8)
    lcm_lora_golden.safetensors
        run.lcm.{latents,timesteps,noise}   4 LCM steps (guidance 1.5) from golden.safetensors' initial latents
        <fmt>.te_hidden                      text-encoder last_hidden_state of the run's prompt after fuse_lora
        <fmt>.unet_eps                       UNet noise prediction on fixed inputs after fuse_lora
        run.<fmt>.{latents,timesteps,noise}  the same 4 LCM steps with the LoRA fused at its scale
"""
import json
import pathlib

import torch
from safetensors.torch import load_file, save_file

import diffusers
import diffusers.schedulers.scheduling_lcm as lcm_module
from diffusers import LCMScheduler, StableDiffusionPipeline
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-sd"
OUT = ROOT / "tests" / "fixtures" / "tiny"
PROMPT, NEGATIVE, STEPS, GUIDANCE = "a lighthouse at dusk", "blurry", 4, 1.5
SCALES = {"kohya": 0.7, "peft": 1.0}

UNET_TARGETS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj",
                "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
                "down_blocks.0.attentions.0.proj_in",
                "mid_block.attentions.0.proj_out",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_q",
                "down_blocks.0.resnets.0.conv1",
                "down_blocks.0.resnets.0.conv2",
                "down_blocks.0.resnets.0.time_emb_proj"]
TE_TARGETS = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.out_proj",
              "text_model.encoder.layers.1.mlp.fc1"]


def pipeline():
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lcm_run(pipe, init):
    recorded = []
    original = lcm_module.randn_tensor

    def recording(shape, generator=None, device=None, dtype=None, layout=None):
        x = original(shape, generator=generator, device=device, dtype=dtype, layout=layout)
        recorded.append(x.clone())
        return x

    lcm_module.randn_tensor = recording
    try:
        res = pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                   latents=init.clone(), output_type="latent", generator=torch.Generator().manual_seed(7),
                   height=init.shape[2] * 8, width=init.shape[3] * 8)
    finally:
        lcm_module.randn_tensor = original
    return res.images, torch.stack(recorded)


def module(root, name):
    if not hasattr(root, "text_model") and name.startswith("text_model."):
        name = name[len("text_model."):]  # transformers 5's CLIPTextModel has no text_model level
    m = root
    for part in name.split("."):
        m = getattr(m, part) if not part.isdigit() else m[int(part)]
    return m


def kohya_file(pipe, gen, path):
    sd = {}
    for prefix, root, names in (("lora_unet_", pipe.unet, UNET_TARGETS),
                                ("lora_te_", pipe.text_encoder, TE_TARGETS)):
        for name in names:
            w = module(root, name).weight
            r = 4
            key = prefix + name.replace(".", "_")
            if w.dim() == 4:
                down = torch.randn((r, w.shape[1], w.shape[2], w.shape[3]), generator=gen) * 0.2
                up = torch.randn((w.shape[0], r, 1, 1), generator=gen) * 0.2
            else:
                down = torch.randn((r, w.shape[1]), generator=gen) * 0.2
                up = torch.randn((w.shape[0], r), generator=gen) * 0.2
            sd[f"{key}.lora_down.weight"] = down
            sd[f"{key}.lora_up.weight"] = up
            sd[f"{key}.alpha"] = torch.tensor(2.0)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def peft_file(gen, path):
    pipe = pipeline()
    unet_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                          target_modules=[n for n in UNET_TARGETS if "conv" not in n])
    te_cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=[n.removeprefix("text_model.") for n in TE_TARGETS])
    pipe.unet.add_adapter(unet_cfg)
    pipe.text_encoder.add_adapter(te_cfg)
    unet_layers = get_peft_model_state_dict(pipe.unet)
    te_layers = get_peft_model_state_dict(pipe.text_encoder)
    with torch.no_grad():
        for layers in (unet_layers, te_layers):
            for k, v in layers.items():
                v.copy_(torch.randn(v.shape, generator=gen) * 0.2)
    unet_layers = get_peft_model_state_dict(pipe.unet)
    te_layers = get_peft_model_state_dict(pipe.text_encoder)
    StableDiffusionPipeline.save_lora_weights(path.parent, unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers, weight_name=path.name,
                                              unet_lora_adapter_metadata=unet_cfg.to_dict(),
                                              text_encoder_lora_adapter_metadata=te_cfg.to_dict())


def main():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(4321)
    init = load_file(str(OUT / "golden.safetensors"))["run.init_latents"]
    g = {}
    pipe = pipeline()
    g["run.lcm.latents"], g["run.lcm.noise"] = lcm_run(pipe, init)
    g["run.lcm.timesteps"] = pipe.scheduler.timesteps.to(torch.int64)

    kohya_file(pipe, gen, OUT / "lora_kohya.safetensors")
    peft_file(gen, OUT / "lora_peft.safetensors")

    sample = torch.randn((2, 4, init.shape[2], init.shape[3]), generator=gen)
    g["unet_in.sample"] = sample
    g["unet_in.timestep"] = torch.tensor([499], dtype=torch.int64)
    meta = {"prompt": PROMPT, "negative": NEGATIVE, "steps": STEPS, "guidance": GUIDANCE,
            "scales": SCALES, "lcm.config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}}
    for fmt, scale in SCALES.items():
        p = pipeline()
        p.load_lora_weights(str(OUT), weight_name=f"lora_{fmt}.safetensors", adapter_name=fmt)
        p.fuse_lora(lora_scale=scale, adapter_names=[fmt])
        p.unload_lora_weights()  # keeps the fused weights, drops the adapter modules
        with torch.no_grad():
            ids = p.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
            g[f"{fmt}.te_hidden"] = p.text_encoder(ids).last_hidden_state
            ctx = torch.cat([g[f"{fmt}.te_hidden"], g[f"{fmt}.te_hidden"]])
            g[f"{fmt}.unet_eps"] = p.unet(sample, 499, encoder_hidden_states=ctx).sample
        g[f"run.{fmt}.latents"], g[f"run.{fmt}.noise"] = lcm_run(p, init)
        g[f"run.{fmt}.timesteps"] = p.scheduler.timesteps.to(torch.int64)
    g = {k: v.contiguous().float() if v.dtype.is_floating_point else v.contiguous() for k, v in g.items()}
    save_file(g, str(OUT / "lcm_lora_golden.safetensors"),
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__, "meta": json.dumps(meta)})


if __name__ == "__main__":
    main()
