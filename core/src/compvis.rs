//! Single-file SD-1.x checkpoints (`v1-5-pruned-emaonly.safetensors` style, CompVis/LDM key names), converted in
//! memory to diffusers names, as diffusers' `convert_ldm_unet_checkpoint`/`convert_ldm_vae_checkpoint` do.
//!
//! This is the one hand-written key map in unsee: the CompVis layout numbers blocks differently
//! (`input_blocks.4.1` ↔ `down_blocks.1.attentions.0`) and is the only way such files can be read.

use std::collections::HashMap;

use safetensors::tensor::TensorView;

use crate::error::{Error, Result};
use crate::unet::UNetConfig;
use crate::vae::VaeConfig;
use crate::weights::MappedSafetensors;

/// Each component re-serialized as an in-memory safetensors buffer with diffusers names.
pub struct Components {
    pub text_encoder: Vec<u8>,
    pub unet: Vec<u8>,
    pub vae: Vec<u8>,
}

fn resnet_inner(rest: &str) -> String {
    for (from, to) in [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                       ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"),
                       ("nin_shortcut", "conv_shortcut")] {
        if let Some(tail) = rest.strip_prefix(from) {
            return format!("{to}{tail}");
        }
    }
    rest.to_string()
}

fn split_idx(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// `model.diffusion_model.*` key (prefix removed) → diffusers UNet key.
pub fn unet_key(k: &str, cfg: &UNetConfig, has_attention: &dyn Fn(&str) -> bool) -> Option<String> {
    let layers = |i: usize| cfg.layers_per_block.get(i);
    if let Some(r) = k.strip_prefix("time_embed.0.") {
        return Some(format!("time_embedding.linear_1.{r}"));
    }
    if let Some(r) = k.strip_prefix("time_embed.2.") {
        return Some(format!("time_embedding.linear_2.{r}"));
    }
    if let Some(r) = k.strip_prefix("input_blocks.0.0.") {
        return Some(format!("conv_in.{r}"));
    }
    if let Some(r) = k.strip_prefix("out.0.") {
        return Some(format!("conv_norm_out.{r}"));
    }
    if let Some(r) = k.strip_prefix("out.2.") {
        return Some(format!("conv_out.{r}"));
    }
    if let Some(r) = k.strip_prefix("input_blocks.") {
        let (n, r) = split_idx(r)?;
        let (m, r) = split_idx(r)?;
        // input_blocks.1.. are grouped per down block: `layers` (resnet, attention) pairs, then a downsampler.
        let mut idx = n - 1;
        for i in 0..cfg.block_out_channels.len() {
            let per = layers(i) + usize::from(i + 1 < cfg.block_out_channels.len());
            if idx < per {
                if idx == layers(i) {
                    return r.strip_prefix("op.").map(|t| format!("down_blocks.{i}.downsamplers.0.conv.{t}"));
                }
                return Some(match m {
                    0 => format!("down_blocks.{i}.resnets.{idx}.{}", resnet_inner(r)),
                    _ => format!("down_blocks.{i}.attentions.{idx}.{r}"),
                });
            }
            idx -= per;
        }
        return None;
    }
    if let Some(r) = k.strip_prefix("middle_block.") {
        let (m, r) = split_idx(r)?;
        return Some(match m {
            0 => format!("mid_block.resnets.0.{}", resnet_inner(r)),
            1 => format!("mid_block.attentions.0.{r}"),
            _ => format!("mid_block.resnets.1.{}", resnet_inner(r)),
        });
    }
    if let Some(r) = k.strip_prefix("output_blocks.") {
        let (n, r) = split_idx(r)?;
        let (m, r) = split_idx(r)?;
        let mut idx = n;
        let nb = cfg.block_out_channels.len();
        for i in 0..nb {
            let per = layers(nb - 1 - i) + 1;
            if idx < per {
                if m == 0 {
                    return Some(format!("up_blocks.{i}.resnets.{idx}.{}", resnet_inner(r)));
                }
                // Sub-module 1 is the attention when the block has one; the upsampler is the last sub-module.
                let prefix = format!("output_blocks.{n}.{m}.");
                if has_attention(&prefix) {
                    return Some(format!("up_blocks.{i}.attentions.{idx}.{r}"));
                }
                return r.strip_prefix("conv.").map(|t| format!("up_blocks.{i}.upsamplers.0.conv.{t}"));
            }
            idx -= per;
        }
        return None;
    }
    None
}

/// `first_stage_model.*` key (prefix removed) → diffusers VAE key, and whether the tensor is a 1×1 conv weight
/// that diffusers stores as a linear weight (the mid-block attention).
pub fn vae_key(k: &str, cfg: &VaeConfig) -> Option<(String, bool)> {
    let n = cfg.block_out_channels.len();
    let (side, r) = k.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return Some((k.to_string(), false));
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let out = |s: String| Some((format!("{side}.{s}"), false));
    if let Some(t) = r.strip_prefix("norm_out.") {
        return out(format!("conv_norm_out.{t}"));
    }
    if r.starts_with("conv_in.") || r.starts_with("conv_out.") {
        return out(r.to_string());
    }
    if let Some(t) = r.strip_prefix("mid.block_1.") {
        return out(format!("mid_block.resnets.0.{}", resnet_inner(t)));
    }
    if let Some(t) = r.strip_prefix("mid.block_2.") {
        return out(format!("mid_block.resnets.1.{}", resnet_inner(t)));
    }
    if let Some(t) = r.strip_prefix("mid.attn_1.") {
        let (name, tail) = t.split_once('.')?;
        let to = match name {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        return Some((format!("{side}.mid_block.attentions.0.{to}.{tail}"), name != "norm" && tail == "weight"));
    }
    let (blocks, target) = if side == "encoder" { ("down.", "down_blocks") } else { ("up.", "up_blocks") };
    let t = r.strip_prefix(blocks)?;
    let (i, t) = split_idx(t)?;
    // CompVis numbers decoder blocks from the lowest resolution's opposite end.
    let i = if side == "decoder" { n - 1 - i } else { i };
    if let Some(t) = t.strip_prefix("block.") {
        let (j, t) = split_idx(t)?;
        return out(format!("{target}.{i}.resnets.{j}.{}", resnet_inner(t)));
    }
    let sampler = if side == "encoder" { "downsample.conv." } else { "upsample.conv." };
    let t = t.strip_prefix(sampler)?;
    let name = if side == "encoder" { "downsamplers" } else { "upsamplers" };
    out(format!("{target}.{i}.{name}.0.conv.{t}"))
}

/// Splits a CompVis checkpoint into diffusers-named safetensors buffers. Unknown keys (EMA copies, the
/// `alphas_cumprod` buffers, `model_ema.*`) are skipped; keys that look like weights but do not map are errors.
pub fn split_checkpoint(file: &MappedSafetensors, unet: &UNetConfig, vae: &VaeConfig) -> Result<Components> {
    let st = file.tensors();
    let names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
    let unet_keys: Vec<&str> = names.iter().filter_map(|n| n.strip_prefix("model.diffusion_model.")).collect();
    let has_attention = |prefix: &str| unet_keys.iter().any(|k| k.starts_with(prefix) && k.contains("transformer_blocks"));

    let mut parts: [HashMap<String, TensorView<'_>>; 3] = Default::default();
    let mut unmapped = vec![];
    for name in &names {
        let view = st.tensor(name).map_err(|e| Error::CorruptWeights { file: file.path.clone(), message: e.to_string() })?;
        if let Some(k) = name.strip_prefix("model.diffusion_model.") {
            match unet_key(k, unet, &has_attention) {
                Some(new) => {
                    parts[1].insert(new, view);
                }
                None => unmapped.push(name.clone()),
            }
        } else if let Some(k) = name.strip_prefix("first_stage_model.") {
            match vae_key(k, vae) {
                Some((new, squeeze)) => {
                    let view = if squeeze && view.shape().len() == 4 {
                        let s = view.shape();
                        TensorView::new(view.dtype(), vec![s[0], s[1]], view.data())
                            .map_err(|e| Error::CorruptWeights { file: file.path.clone(), message: e.to_string() })?
                    } else {
                        view
                    };
                    parts[2].insert(new, view);
                }
                None => unmapped.push(name.clone()),
            }
        } else if let Some(k) = name.strip_prefix("cond_stage_model.transformer.") {
            let k = if k.starts_with("text_model.") { k.to_string() } else { format!("text_model.{k}") };
            parts[0].insert(k, view);
        }
    }
    if !unmapped.is_empty() {
        return Err(Error::WeightMismatch {
            component: "checkpoint".into(),
            file: file.path.clone(),
            report: unmapped.iter().map(|n| format!("  unexpected: {n}")).collect::<Vec<_>>().join("\n"),
        });
    }
    for (i, c) in ["text encoder (cond_stage_model.transformer.*)", "UNet (model.diffusion_model.*)",
                   "VAE (first_stage_model.*)"].iter().enumerate() {
        if parts[i].is_empty() {
            return Err(Error::invalid_model(&file.path, format!("not an SD-1.x single-file checkpoint: no {c} tensors")));
        }
    }
    let ser = |m: &HashMap<String, TensorView<'_>>| {
        safetensors::serialize(m.iter().map(|(k, v)| (k.clone(), v.clone())), None)
            .map_err(|e| Error::Internal(format!("re-serializing checkpoint: {e}")))
    };
    Ok(Components { text_encoder: ser(&parts[0])?, unet: ser(&parts[1])?, vae: ser(&parts[2])? })
}
