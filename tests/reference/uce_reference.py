#!/usr/bin/env python3
"""UCE's closed-form edit, written the way the official 2025 script computes it
(rohitgandikota/unified-concept-editing@28c81ed, trainscripts/uce_sd_erase.py), on the tiny model.

For every cross-attention `attn2.to_k` / `attn2.to_v` (W_old, d_out x d_in):
    mat1 = lamb * W_old + erase_scale * sum_e v*_e c_e^T + preserve_scale * sum_p (W_old c_p) c_p^T
    mat2 = lamb * I     + erase_scale * sum_e c_e c_e^T  + preserve_scale * sum_p c_p c_p^T
    W_new = mat1 @ inverse(mat2.float())
with c the text encoder's output at the last subject token (index attention_mask.sum() - 2 of the max-length padded
prompt) and v*_e = W_old c_guide. Computed in float32, as the official code does.

    python tests/reference/uce_reference.py   ->  tests/fixtures/tiny/uce_golden.safetensors
"""
import pathlib

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "tiny-sd"

# Must match core/tests/erase.rs::UCE_SPEC.
ERASE = [("Van Gogh", "art"), ("Picasso", "art")]
PRESERVE = ["Monet", "Rembrandt", "Warhol"]
LAMB, ERASE_SCALE, PRESERVE_SCALE = 0.5, 1.0, 1.0


@torch.no_grad()
def main():
    tok = CLIPTokenizer.from_pretrained(MODEL / "tokenizer")
    te = CLIPTextModel.from_pretrained(MODEL / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(MODEL / "unet").eval()

    def last_token(prompt):
        ids = tok(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        idx = int(ids.attention_mask.sum()) - 2
        return te(ids.input_ids)[0][0, idx]

    out = {}
    for name, module in unet.named_modules():
        if not (name.endswith("attn2.to_k") or name.endswith("attn2.to_v")):
            continue
        w_old = module.weight.detach().clone()
        d_in = w_old.shape[1]
        mat1 = LAMB * w_old
        mat2 = LAMB * torch.eye(d_in)
        for concept, guide in ERASE:
            c = last_token(concept)[:, None]
            v = w_old @ last_token(guide)[:, None]
            mat1 = mat1 + ERASE_SCALE * v @ c.T
            mat2 = mat2 + ERASE_SCALE * c @ c.T
        for p in PRESERVE:
            c = last_token(p)[:, None]
            mat1 = mat1 + PRESERVE_SCALE * (w_old @ c) @ c.T
            mat2 = mat2 + PRESERVE_SCALE * c @ c.T
        out[f"{name}.weight"] = (mat1 @ torch.inverse(mat2.float())).contiguous()
    path = ROOT / "tests" / "fixtures" / "tiny" / "uce_golden.safetensors"
    save_file(out, str(path), metadata={"erase": repr(ERASE), "preserve": repr(PRESERVE), "lambda": str(LAMB)})
    print(f"wrote {len(out)} edited matrices to {path}")


if __name__ == "__main__":
    main()
