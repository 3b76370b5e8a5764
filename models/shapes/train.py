"""Trains the shapes model (issue #6): an SD-1.x pipeline (AutoencoderKL, CLIPTextModel with the real CLIP vocabulary,
UNet2DConditionModel with cross-attention, SD's scaled-linear DDPM schedule, classifier-free-guidance dropout) from
scratch on the synthetic scenes of shapes.py, on the CPU.

    python models/shapes/train.py --out models/shapes-sd --minutes 50
    python models/shapes/train.py --resume /tmp/shapes-sd --out /tmp/shapes-sd2 --minutes 65 --lr 4e-4 --lr-min 2e-5
    python -c "import train; train.to_f16('/tmp/shapes-sd2')"     # (or --store-f16 on the run itself)

Stage 1 trains the VAE (reconstruction + a small KL), stage 2 the text encoder and UNet together on the VAE's
latents (epsilon prediction). Fixed seeds; the exact settings are written to OUT/train_settings.json. Needs the
packages of tests/reference/requirements.txt (torch, diffusers, transformers).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import shapes  # noqa: E402

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

VAE_CONFIG = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                  up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[16, 32, 32], layers_per_block=1,
                  latent_channels=4, norm_num_groups=8, sample_size=shapes.SIZE)
TEXT_CONFIG = dict(vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=64,
                   bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
UNET_CONFIG = dict(sample_size=shapes.SIZE // 4, in_channels=4, out_channels=4,
                   down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                   up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[64, 96],
                   layers_per_block=1, attention_head_dim=4, cross_attention_dim=64, norm_num_groups=32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(REPO, "models", "shapes-sd"))
    ap.add_argument("--minutes", type=float, default=50.0, help="wall-clock budget of both stages")
    ap.add_argument("--vae-minutes", type=float, default=6.0)
    ap.add_argument("--n-train", type=int, default=60000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--cfg-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save-every-min", type=float, default=5.0)
    ap.add_argument("--resume", default=None,
                    help="a folder written by this script: keep its VAE, continue stage 2 from its (EMA) text encoder "
                         "and UNet for --minutes")
    ap.add_argument("--store-f16", action="store_true",
                    help="store the final weights in f16 (halves the size; training itself is f32)")
    ap.add_argument("--lr-min", type=float, default=None,
                    help="if set, the learning rate follows a cosine from --lr down to this over the time budget")
    args = ap.parse_args()

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    deadline = t_start + args.minutes * 60

    images, captions, _ = shapes.dataset(args.n_train, args.seed, "train")
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    print(f"data: {len(x_all)} images in {time.monotonic() - t_start:.0f}s", flush=True)

    # ---- stage 1: VAE (or the one of --resume)
    prior = None
    g = torch.Generator().manual_seed(args.seed)
    if args.resume:
        with open(os.path.join(args.resume, "train_settings.json")) as f:
            prior = json.load(f)
        vae = AutoencoderKL.from_pretrained(os.path.join(args.resume, "vae"), torch_dtype=torch.float32)
        args.vae_minutes = 0.0
    else:
        vae = AutoencoderKL(**VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    step, t_vae = 0, time.monotonic()
    while time.monotonic() - t_vae < args.vae_minutes * 60:
        idx = torch.randint(len(x_all), (args.batch,), generator=g)
        x = x_all[idx]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=g)).sample
        loss = F.mse_loss(rec, x) + 1e-6 * post.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"vae step {step} loss {loss.item():.5f}", flush=True)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means, stds = [], []
        for i in range(0, len(x_all), 512):
            d = vae.encode(x_all[i:i + 512]).latent_dist
            means.append(d.mean)
            stds.append(d.std)
        lat_mean, lat_std = torch.cat(means), torch.cat(stds)
    if prior is None:
        scaling = float(1.0 / lat_mean.std())
        vae.register_to_config(scaling_factor=scaling)
    else:
        scaling = float(vae.config.scaling_factor)
    print(f"vae: {step} steps, scaling_factor {scaling:.4f}", flush=True)

    # ---- stage 2: text encoder + UNet
    tok = CLIPTokenizer.from_pretrained(os.path.join(REPO, "models", "tiny-sd", "tokenizer"))
    ids_all = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    ids_null = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids[0]
    if prior is None:
        text = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
        unet = UNet2DConditionModel(**UNET_CONFIG)
    else:
        text = CLIPTextModel.from_pretrained(os.path.join(args.resume, "text_encoder"), torch_dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.resume, "unet"), torch_dtype=torch.float32)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    params = list(text.parameters()) + list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema_text, ema_unet = copy.deepcopy(text).requires_grad_(False), copy.deepcopy(unet).requires_grad_(False)
    alphas = sched.alphas_cumprod
    step, last_save, losses = 0, time.monotonic(), []
    n_params = sum(p.numel() for p in params)
    print(f"stage 2: {n_params / 1e6:.2f} M trainable parameters", flush=True)

    def save(final: bool):
        out = args.out if final else args.out + ".partial"
        os.makedirs(out, exist_ok=True)
        vae.save_pretrained(os.path.join(out, "vae"))
        ema_unet.save_pretrained(os.path.join(out, "unet"))
        ema_text.save_pretrained(os.path.join(out, "text_encoder"))
        src = os.path.join(REPO, "models", "tiny-sd")
        shutil.copytree(os.path.join(src, "tokenizer"), os.path.join(out, "tokenizer"), dirs_exist_ok=True)
        shutil.copytree(os.path.join(src, "scheduler"), os.path.join(out, "scheduler"), dirs_exist_ok=True)
        shutil.copy(os.path.join(src, "model_index.json"), os.path.join(out, "model_index.json"))
        settings = dict(vars(args), vae=VAE_CONFIG, text_encoder=TEXT_CONFIG, unet=UNET_CONFIG, steps=step,
                        minutes=(time.monotonic() - t_start) / 60, final_loss=float(np.mean(losses[-200:])),
                        torch=torch.__version__, ema_decay=0.999, scaling_factor=scaling,
                        held_out_pairs=sorted(shapes.HELD_OUT_PAIRS))
        if prior is not None:
            # the history of the run(s) this one continues, and totals over all of them
            settings["resumed_from"] = {k: v for k, v in prior.items() if k not in ("vae", "text_encoder", "unet")}
            settings["total_steps"] = prior.get("total_steps", prior["steps"]) + step
            settings["total_minutes"] = prior.get("total_minutes", prior["minutes"]) + settings["minutes"]
        with open(os.path.join(out, "train_settings.json"), "w") as f:
            json.dump(settings, f, indent=1)
        print(f"saved {out} at step {step}", flush=True)

    text.train()
    unet.train()
    while time.monotonic() < deadline:
        idx = torch.randint(len(x_all), (args.batch,), generator=g)
        lat = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scaling
        ids = ids_all[idx].clone()
        drop = torch.rand(args.batch, generator=g) < args.cfg_dropout
        ids[drop] = ids_null
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        noise = torch.randn(lat.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * lat + (1 - a).sqrt() * noise
        ctx = text(ids).last_hidden_state
        pred = unet(noisy, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        warm = min(1.0, (step + 1) / (100 if prior is not None else 500))
        lr = args.lr
        if args.lr_min is not None:
            frac = min(1.0, (time.monotonic() - t_start) / (deadline - t_start))
            lr = args.lr_min + (args.lr - args.lr_min) * 0.5 * (1 + np.cos(np.pi * frac))
        for grp in opt.param_groups:
            grp["lr"] = lr * warm
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = min(0.999, (1 + step) / (10 + step))
            for m, e in ((text, ema_text), (unet, ema_unet)):
                for p, pe in zip(m.parameters(), e.parameters()):
                    pe.mul_(d).add_(p.detach(), alpha=1 - d)
        losses.append(loss.item())
        step += 1
        if step % 100 == 0:
            el = time.monotonic() - t_start
            print(f"step {step} loss {np.mean(losses[-100:]):.4f} lr {lr * warm:.2e} ({el / 60:.1f} min)", flush=True)
        if time.monotonic() - last_save > args.save_every_min * 60:
            save(final=False)
            last_save = time.monotonic()
    save(final=True)
    shutil.rmtree(args.out + ".partial", ignore_errors=True)
    if args.store_f16:
        to_f16(args.out)


def to_f16(folder: str):
    """Rewrites every component's safetensors file of `folder` with f16 tensors."""
    from safetensors.torch import load_file, save_file
    for comp in ("vae", "unet", "text_encoder"):
        d = os.path.join(folder, comp)
        for name in os.listdir(d):
            if name.endswith(".safetensors"):
                p = os.path.join(d, name)
                save_file({k: v.half().contiguous() for k, v in load_file(p).items()}, p, metadata={"format": "pt"})
    print(f"stored {folder} in f16", flush=True)


if __name__ == "__main__":
    main()
