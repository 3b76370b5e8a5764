#!/usr/bin/env python3
"""The PyTorch side of `cargo bench --bench erase`: UCE as the official script computes it (see uce_reference.py),
timed end to end (encode every prompt padded to 77 tokens, accumulate, one inverse per matrix) on the CPU.

    python tests/reference/bench_uce_torch.py MODEL_DIR N_CONCEPTS PRESERVE_FILE  ->  one JSON line
"""
import json
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer


@torch.no_grad()
def main():
    model, n, preserve_file = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(torch.get_num_threads())
    tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").eval()
    concepts = [f"painter {i} style" for i in range(n)]
    preserve = [l.strip() for l in open(preserve_file) if l.strip()]

    t0 = time.perf_counter()

    def last_tokens(prompts):
        out = []
        for i in range(0, len(prompts), 32):
            ids = tok(prompts[i:i + 32], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            h = te(ids.input_ids)[0]
            idx = ids.attention_mask.sum(1) - 2
            out.append(h[torch.arange(h.shape[0]), idx])
        return torch.cat(out)

    ce, cg, cp = last_tokens(concepts), last_tokens(["art"] * n), last_tokens(preserve)
    t_encode = time.perf_counter() - t0
    lamb = 0.5
    for name, module in unet.named_modules():
        if not (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
            continue
        w = module.weight
        mat1 = lamb * w + (w @ cg.T) @ ce + (w @ cp.T) @ cp
        mat2 = lamb * torch.eye(w.shape[1]) + ce.T @ ce + cp.T @ cp
        module.weight.copy_(mat1 @ torch.inverse(mat2.float()))
    total = time.perf_counter() - t0
    print(json.dumps({"encode_s": t_encode, "total_s": total}))


if __name__ == "__main__":
    main()
