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

// ---- the reverse: diffusers names → CompVis names (`unsee erase --bake-single-file`) ----

fn resnet_inner_to_compvis(rest: &str, vae: bool) -> String {
    let shortcut = if vae { "nin_shortcut" } else { "skip_connection" };
    for (from, to) in [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                       ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", shortcut)] {
        if let Some(tail) = rest.strip_prefix(from)
            && tail.starts_with('.')
        {
            // The VAE's resnets keep diffusers' norm/conv names in CompVis (`encoder.down.0.block.0.norm1`).
            return if vae && from != "conv_shortcut" { rest.to_string() } else { format!("{to}{tail}") };
        }
    }
    rest.to_string()
}

/// Diffusers UNet key → `model.diffusion_model.*` key (prefix not included): the inverse of [`unet_key`].
pub fn unet_key_to_compvis(k: &str, cfg: &UNetConfig) -> Option<String> {
    let layers = |i: usize| cfg.layers_per_block.get(i);
    let nb = cfg.block_out_channels.len();
    for (from, to) in [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
                       ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2.")] {
        if let Some(r) = k.strip_prefix(from) {
            return Some(format!("{to}{r}"));
        }
    }
    if let Some(r) = k.strip_prefix("down_blocks.") {
        let (i, r) = split_idx(r)?;
        if i >= nb {
            return None;
        }
        let first = 1 + (0..i).map(|b| layers(b) + usize::from(b + 1 < nb)).sum::<usize>();
        if let Some(t) = r.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{t}", first + layers(i)));
        }
        let (kind, r) = r.split_once('.')?;
        let (j, r) = split_idx(r)?;
        return match kind {
            "resnets" => Some(format!("input_blocks.{}.0.{}", first + j, resnet_inner_to_compvis(r, false))),
            "attentions" => Some(format!("input_blocks.{}.1.{r}", first + j)),
            _ => None,
        };
    }
    if let Some(r) = k.strip_prefix("mid_block.") {
        if let Some(t) = r.strip_prefix("attentions.0.") {
            return Some(format!("middle_block.1.{t}"));
        }
        let (j, t) = split_idx(r.strip_prefix("resnets.")?)?;
        return Some(format!("middle_block.{}.{}", if j == 0 { 0 } else { 2 }, resnet_inner_to_compvis(t, false)));
    }
    if let Some(r) = k.strip_prefix("up_blocks.") {
        let (i, r) = split_idx(r)?;
        if i >= nb {
            return None;
        }
        let first = (0..i).map(|b| layers(nb - 1 - b) + 1).sum::<usize>();
        if let Some(t) = r.strip_prefix("upsamplers.0.conv.") {
            let has_attention = cfg.up_block_types.get(i).is_some_and(|t| t.starts_with("CrossAttn"));
            let m = if has_attention { 2 } else { 1 };
            return Some(format!("output_blocks.{}.{m}.conv.{t}", first + layers(nb - 1 - i)));
        }
        let (kind, r) = r.split_once('.')?;
        let (j, r) = split_idx(r)?;
        return match kind {
            "resnets" => Some(format!("output_blocks.{}.0.{}", first + j, resnet_inner_to_compvis(r, false))),
            "attentions" => Some(format!("output_blocks.{}.1.{r}", first + j)),
            _ => None,
        };
    }
    None
}

/// Diffusers VAE key → `first_stage_model.*` key (prefix not included), and whether the tensor is a linear weight
/// CompVis stores as a 1×1 conv: the inverse of [`vae_key`].
pub fn vae_key_to_compvis(k: &str, cfg: &VaeConfig) -> Option<(String, bool)> {
    let n = cfg.block_out_channels.len();
    if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
        return Some((k.to_string(), false));
    }
    let (side, r) = k.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let out = |s: String| Some((format!("{side}.{s}"), false));
    if let Some(t) = r.strip_prefix("conv_norm_out.") {
        return out(format!("norm_out.{t}"));
    }
    if r.starts_with("conv_in.") || r.starts_with("conv_out.") {
        return out(r.to_string());
    }
    if let Some(t) = r.strip_prefix("mid_block.attentions.0.") {
        let (name, tail) = match t.strip_prefix("to_out.0.") {
            Some(tail) => ("proj_out", tail),
            None => {
                let (name, tail) = t.split_once('.')?;
                let to = match name {
                    "group_norm" => "norm",
                    "to_q" => "q",
                    "to_k" => "k",
                    "to_v" => "v",
                    _ => return None,
                };
                (to, tail)
            }
        };
        return Some((format!("{side}.mid.attn_1.{name}.{tail}"), name != "norm" && tail == "weight"));
    }
    if let Some(t) = r.strip_prefix("mid_block.resnets.") {
        let (j, t) = split_idx(t)?;
        return out(format!("mid.block_{}.{}", j + 1, resnet_inner_to_compvis(t, true)));
    }
    let (blocks, target) = if side == "encoder" { ("down_blocks.", "down") } else { ("up_blocks.", "up") };
    let (i, t) = split_idx(r.strip_prefix(blocks)?)?;
    if i >= n {
        return None;
    }
    let i = if side == "decoder" { n - 1 - i } else { i };
    if let Some(t) = t.strip_prefix("resnets.") {
        let (j, t) = split_idx(t)?;
        return out(format!("{target}.{i}.block.{j}.{}", resnet_inner_to_compvis(t, true)));
    }
    let sampler = if side == "encoder" { "downsamplers.0.conv." } else { "upsamplers.0.conv." };
    let t = t.strip_prefix(sampler)?;
    let name = if side == "encoder" { "downsample" } else { "upsample" };
    out(format!("{target}.{i}.{name}.conv.{t}"))
}

/// Diffusers text-encoder key (with or without `text_model.`) → the full CompVis key.
pub fn text_encoder_key_to_compvis(k: &str) -> String {
    if k.starts_with("text_model.") {
        format!("cond_stage_model.transformer.{k}")
    } else {
        format!("cond_stage_model.transformer.text_model.{k}")
    }
}

/// Writes the diffusers folder `dir` (its text encoder, UNet and VAE weight files) as one CompVis-named
/// single-file checkpoint at `out`, atomically: the format AUTOMATIC1111 and ComfyUI load. The whole file is
/// assembled in memory before it is written.
pub fn write_checkpoint(dir: &std::path::Path, unet: &UNetConfig, vae: &VaeConfig, out: &std::path::Path) -> Result<()> {
    let files = [
        ("text_encoder", crate::model::component_weights(dir, "text_encoder", "model")?),
        ("unet", crate::model::component_weights(dir, "unet", "diffusion_pytorch_model")?),
        ("vae", crate::model::component_weights(dir, "vae", "diffusion_pytorch_model")?),
    ];
    let mapped: Vec<(&str, MappedSafetensors)> =
        files.iter().map(|(c, f)| MappedSafetensors::open(f).map(|m| (*c, m))).collect::<Result<_>>()?;
    let parsed: Vec<(&str, &std::path::Path, safetensors::SafeTensors<'_>)> =
        mapped.iter().map(|(c, m)| (*c, m.path.as_path(), m.tensors())).collect();
    let mut views: Vec<(String, TensorView<'_>)> = vec![];
    let mut unmapped = vec![];
    for (component, path, st) in &parsed {
        for name in st.names() {
            let corrupt = |e: safetensors::SafeTensorError| Error::CorruptWeights { file: path.to_path_buf(), message: e.to_string() };
            let v = st.tensor(name).map_err(corrupt)?;
            let (key, as_conv) = match *component {
                "text_encoder" => (Some(text_encoder_key_to_compvis(name)), false),
                "unet" => (unet_key_to_compvis(name, unet).map(|k| format!("model.diffusion_model.{k}")), false),
                _ => match vae_key_to_compvis(name, vae) {
                    Some((k, c)) => (Some(format!("first_stage_model.{k}")), c),
                    None => (None, false),
                },
            };
            let Some(key) = key else {
                unmapped.push(format!("  {component}: {name}"));
                continue;
            };
            let v = if as_conv && v.shape().len() == 2 {
                let s = v.shape();
                TensorView::new(v.dtype(), vec![s[0], s[1], 1, 1], v.data()).map_err(corrupt)?
            } else {
                v
            };
            views.push((key, v));
        }
    }
    if !unmapped.is_empty() {
        return Err(Error::WeightMismatch {
            component: "single-file export".into(),
            file: dir.to_path_buf(),
            report: format!("no CompVis name for:\n{}", unmapped.join("\n")),
        });
    }
    let bytes = safetensors::serialize(views, None)
        .map_err(|e| Error::Internal(format!("writing the single-file checkpoint: {e}")))?;
    crate::weights::write_atomic(out, &bytes)
}
