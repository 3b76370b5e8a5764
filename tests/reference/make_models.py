#!/usr/bin/env python3
"""Build unsee's random-weight reference models and the golden outputs the Rust tests compare against.

The reference implementation is diffusers/transformers (versions pinned in requirements.txt), run in f32 on the CPU.

    python tests/reference/make_models.py            # tiny + small models and goldens (committed)
    python tests/reference/make_models.py --sd15 DIR # full-size SD-1.5 architecture, random weights (benchmark only,
                                                     # ~4 GB, never committed)

Outputs:
    models/tiny-sd/                     the embedded default model (diffusers folder, f32 safetensors)
    tests/fixtures/small-sd/            SD-1.x block structure (4 down blocks, 3 with cross-attention, 2 layers per
                                        block), stored only as the `fp16` variant (`*.fp16.safetensors`)
    tests/fixtures/tokens.json          >= 200 prompts and their CLIP token ids (77, padded)
    tests/fixtures/<model>/golden.safetensors
                                        text-encoder hidden states, UNet noise predictions at several timesteps,
                                        VAE decode/encode, and complete 10-step runs of every scheduler
"""
import argparse
import gzip
import json
import os
import pathlib
import random
import shutil

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import (AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       StableDiffusionPipeline, UNet2DConditionModel)
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"

# SD-1.5's scheduler settings (scheduler/scheduler_config.json of the released model, as DDIM).
SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                 timestep_spacing="leading")


def find_bpe_vocab() -> pathlib.Path:
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.submodule_search_locations is None:
        raise SystemExit("open_clip_torch is needed for OpenAI's bpe_simple_vocab_16e6.txt.gz: "
                         "pip install --no-deps open_clip_torch==3.3.0")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_vocab(out: pathlib.Path):
    """vocab.json + merges.txt exactly as openai/clip-vit-large-patch14 ships them, derived from OpenAI's BPE file."""
    lines = gzip.open(find_bpe_vocab()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def randomize(module: torch.nn.Module, gen: torch.Generator):
    """Replace every parameter with random values (norm scales around 1, non-zero biases), so that a swapped scale and
    shift, a transposed weight or a missing bias all change the outputs."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                if "embedding" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)
            elif name.endswith("weight"):  # norm scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def round_to_half(module):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.half().float())


CONFIGS = {
    "tiny": dict(
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu"),
        unet=dict(block_out_channels=(32, 64), layers_per_block=2, sample_size=8, cross_attention_dim=32,
                  attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=8, sample_size=64),
        fp16_variant=False,
    ),
    "small": dict(
        # Width 96 > 77 so that the 77 null-text keys leave room for exact pinning in the erasure tests.
        text=dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu"),
        unet=dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, sample_size=8, cross_attention_dim=96,
                  attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(16, 32, 32, 32), layers_per_block=2, norm_num_groups=8, sample_size=64),
        fp16_variant=True,
    ),
    "sd15": dict(
        text=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                  hidden_act="quick_gelu"),
        unet=dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, sample_size=64,
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512),
        fp16_variant=False,
    ),
}


def build(name: str, out: pathlib.Path, seed: int):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(seed)
    tok_dir = pathlib.Path("/tmp") / f"unsee-vocab-{name}"
    write_clip_vocab(tok_dir)
    # transformers 5's CLIPTokenizer is backed by `tokenizers` (the same library unsee uses).
    tokenizer = CLIPTokenizer(vocab=str(tok_dir / "vocab.json"), merges=str(tok_dir / "merges.txt"),
                              pad_token="<|endoftext|>", model_max_length=77)
    text_config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                 eos_token_id=49407, pad_token_id=49407, projection_dim=cfg["text"]["hidden_size"],
                                 **cfg["text"])
    text_encoder = CLIPTextModel(text_config).eval()
    unet = UNet2DConditionModel(in_channels=4, out_channels=4, **cfg["unet"]).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                        up_block_types=("UpDecoderBlock2D",) * len(cfg["vae"]["block_out_channels"]),
                        scaling_factor=0.18215, **cfg["vae"]).eval()
    for m in (text_encoder, unet, vae):
        randomize(m, gen)
        if cfg["fp16_variant"]:
            round_to_half(m)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    if out.exists():
        shutil.rmtree(out)
    if cfg["fp16_variant"]:
        pipe.to(torch.float16).save_pretrained(out, variant="fp16", safe_serialization=True)
        pipe.to(torch.float32)
    else:
        pipe.save_pretrained(out, safe_serialization=True)
    # Ship vocab.json + merges.txt beside tokenizer.json, as the released SD-1.x folders do.
    write_clip_vocab(out / "tokenizer")
    return pipe, tokenizer


def prompts_for_tokens():
    rnd = random.Random(1234)
    words = ["a", "photo", "of", "the", "cat", "dog", "lighthouse", "at", "dusk", "Van", "Gogh", "painting", "by",
             "Monet", "astronaut", "riding", "horse", "on", "mars", "HDR", "4k", "ultra-detailed", "octane", "render",
             "portrait", "woman", "man", "city", "night", "neon", "cyberpunk", "forest", "misty", "morning", "oil",
             "canvas", "watercolor", "sketch", "Rembrandt", "Picasso", "cubism", "surreal", "dreamlike", "castle",
             "dragon", "fire", "ice", "ocean", "waves", "sunset", "mountain", "snow", "red", "green", "blue",
             "yellow", "circle", "square", "triangle", "star"]
    fixed = [
        "", " ", "a lighthouse at dusk", "A Lighthouse At DUSK", "a  lighthouse\tat\n dusk  ",
        "Van Gogh", "van gogh's starry night", "a photo of a cat, trending on artstation!!!",
        "(masterpiece:1.2), best quality, 8k uhd, dslr", "hello,world.foo;bar:baz", "it's a dog's life, isn't it?",
        "1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2024-11-24 12:30", "#hashtag @user $100 50% a&b c*d e+f=g",
        "café crème brûlée naïve façade", "Ärger über Öl und Übermut", "日本の風景、富士山", "一只猫坐在桌子上",
        "Москва зимой", "Ελληνικά γράμματα", "emoji 🐱🚀🔥 test", "ｆｕｌｌｗｉｄｔｈ　ｔｅｘｔ", "tab\tseparated\tvalues",
        "<|startoftext|> literal special tokens <|endoftext|>", "quotes \"double\" and 'single' and `back`",
        "under_score and-dash and.dot", "ALLCAPSWORDTHATISVERYLONGANDHASNOSPACESATALL",
        "a" * 300, "word " * 100, "nudity, naked, erotic, sexual", "a person wearing clothes",
        "Kelly McKernan", "Thomas Kinkade", "Kilian Eng", "Ajin: Demi Human", "Tyler Edlin",
        "no-break\u00a0space", "zero\u200bwidth", "combining e\u0301 accent", "ligature ﬁ ﬂ", "Ⅻ roman numeral",
        "x" * 77, "  leading and trailing spaces  ", "...", "!!!", "??", "a,b,c,d,e,f,g",
    ]
    generated = []
    for i in range(200):
        n = rnd.randint(1, 40 if i % 10 else 120)
        ws = [rnd.choice(words) for _ in range(n)]
        sep = rnd.choice([" ", ", ", " ", " ", "  "])
        s = sep.join(ws)
        if rnd.random() < 0.3:
            s = s.capitalize() + rnd.choice([".", "!", "?", "", ";"])
        generated.append(s)
    return fixed + generated


@torch.no_grad()
def goldens(name: str, pipe: StableDiffusionPipeline, slow_tok: CLIPTokenizer, out: pathlib.Path, seed: int):
    gen = torch.Generator().manual_seed(seed + 1)
    g = {}
    te, unet, vae = pipe.text_encoder, pipe.unet, pipe.vae
    hidden = te.config.hidden_size

    # Text encoder: last_hidden_state for a few prompts (token ids from the slow tokenizer, as the pipeline does).
    text_prompts = ["a lighthouse at dusk", "", "Van Gogh painting of a cat, 4k!", "word " * 100]
    for i, p in enumerate(text_prompts):
        ids = slow_tok(p, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        g[f"text.{i}.input_ids"] = ids[0].to(torch.int64)
        enc = te(ids, output_hidden_states=True)
        g[f"text.{i}.hidden"] = enc.last_hidden_state[0].float()
        # Intermediates, so a failing comparison can say where the divergence starts: the embeddings, then each
        # encoder layer's output (before the final layer norm).
        for layer, h in enumerate(enc.hidden_states):
            g[f"text.{i}.trace.{layer}"] = h[0].float()
    (out / "golden_prompts.json").write_text(json.dumps({"text": text_prompts}, indent=1))

    # UNet: noise prediction for a batch of 2 (unconditional + conditional) at several timesteps.
    lat_hw = unet.config.sample_size
    latents = torch.randn((2, 4, lat_hw, lat_hw), generator=gen)
    ctx = torch.stack([g["text.1.hidden"], g["text.0.hidden"]])
    g["unet.sample"] = latents
    g["unet.encoder_hidden_states"] = ctx
    for t in [999, 500, 1]:
        g[f"unet.t{t}.noise_pred"] = unet(latents, torch.tensor(t), encoder_hidden_states=ctx).sample
    # Intermediates at t=500: the output of every top-level block.
    hooks = []
    traced = ["conv_in"] + [f"down_blocks.{i}" for i in range(len(unet.down_blocks))] + ["mid_block"] + \
             [f"up_blocks.{i}" for i in range(len(unet.up_blocks))] + ["conv_out"]
    for name in traced:
        def hook(mod, args, output, name=name):
            g[f"unet.trace.{name}"] = (output[0] if isinstance(output, tuple) else output).clone()
        hooks.append(unet.get_submodule(name).register_forward_hook(hook))
    unet(latents, torch.tensor(500), encoder_hidden_states=ctx)
    for h in hooks:
        h.remove()
    (out / "golden_trace.json").write_text(json.dumps({"unet": traced}, indent=1))

    # VAE: decode of fixed latents and the encoder's posterior mean/logvar of a fixed image.
    z = torch.randn((1, 4, lat_hw, lat_hw), generator=gen)
    g["vae.latents"] = z
    g["vae.decoded"] = vae.decode(z).sample
    img = torch.rand((1, 3, lat_hw * 8, lat_hw * 8), generator=gen) * 2 - 1
    g["vae.image"] = img
    moments = vae.encode(img).latent_dist
    g["vae.encoded_mean"] = moments.mean
    g["vae.encoded_logvar"] = moments.logvar

    # Complete 10-step runs from fixed initial latents, one per scheduler, through the official pipeline.
    init = torch.randn((1, 4, lat_hw, lat_hw), generator=gen)
    g["run.init_latents"] = init
    runs = {
        "ddim": DDIMScheduler.from_config(pipe.scheduler.config),
        "euler_a": EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config),
        "dpmpp_2m": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++",
                                                            solver_order=2),
        "dpmpp_2m_karras": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config,
                                                                   algorithm_type="dpmsolver++", solver_order=2,
                                                                   use_karras_sigmas=True),
    }
    run_meta = {"prompt": "a lighthouse at dusk", "negative": "blurry", "steps": 10, "guidance": 7.5}
    original_randn = euler_a_module.randn_tensor
    for sname, sched in runs.items():
        recorded = []

        def recording_randn(shape, generator=None, device=None, dtype=None, layout=None):
            x = original_randn(shape, generator=generator, device=device, dtype=dtype, layout=layout)
            recorded.append(x.clone())
            return x

        euler_a_module.randn_tensor = recording_randn
        pipe.scheduler = sched
        res = pipe(run_meta["prompt"], negative_prompt=run_meta["negative"], num_inference_steps=run_meta["steps"],
                   guidance_scale=run_meta["guidance"], latents=init.clone(), output_type="latent",
                   generator=torch.Generator().manual_seed(7), height=lat_hw * 8, width=lat_hw * 8)
        euler_a_module.randn_tensor = original_randn
        g[f"run.{sname}.latents"] = res.images
        g[f"run.{sname}.timesteps"] = sched.timesteps.to(torch.int64)
        if recorded:
            g[f"run.{sname}.noise"] = torch.stack(recorded)
        if sname == "ddim":
            g["run.ddim.image"] = vae.decode(res.images / vae.config.scaling_factor).sample
        sched_cfg = dict(sched.config)
        run_meta[f"{sname}.config"] = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    pipe.scheduler = DDIMScheduler(**SCHEDULER)
    (out / "golden_runs.json").write_text(json.dumps(run_meta, indent=1, default=str))

    g = {k: v.contiguous().float() if v.dtype.is_floating_point else v.contiguous() for k, v in g.items()}
    save_file(g, str(out / "golden.safetensors"),
              metadata={"diffusers": diffusers.__version__, "torch": torch.__version__, "model": name})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sd15", type=pathlib.Path, help="also write a full-size SD-1.5 random-weight folder here")
    ap.add_argument("--only-sd15", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    if not args.only_sd15:
        targets = [("tiny", ROOT / "models" / "tiny-sd", FIXTURES / "tiny", 0),
                   ("small", FIXTURES / "small-sd", FIXTURES / "small", 1)]
        slow = None
        for name, model_dir, golden_dir, seed in targets:
            pipe, slow = build(name, model_dir, seed)
            golden_dir.mkdir(parents=True, exist_ok=True)
            goldens(name, pipe, slow, golden_dir, seed)
            print(f"wrote {model_dir} and {golden_dir}")

        prompts = prompts_for_tokens()
        ids = [slow(p, padding="max_length", max_length=77, truncation=True).input_ids for p in prompts]
        lengths = [len(slow(p).input_ids) for p in prompts]
        (FIXTURES / "tokens.json").write_text(json.dumps(
            {"tokenizer": "transformers 5 CLIPTokenizer, padding=max_length, max_length=77, "
                          "truncation=True, pad_token=<|endoftext|>",
             "cases": [{"prompt": p, "input_ids": i, "untruncated_len": n} for p, i, n in zip(prompts, ids, lengths)]},
            ensure_ascii=False, indent=0))
        print(f"wrote {len(prompts)} tokenizer cases")
    if args.sd15:
        build("sd15", args.sd15, 15)
        print(f"wrote {args.sd15}")


if __name__ == "__main__":
    main()
