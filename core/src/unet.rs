//! `diffusers.UNet2DConditionModel` with the SD-1.x block types, configured from the checkpoint's `config.json`.

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::{GroupNorm, Linear};
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{Forward, Downsample2D, ResnetBlock2D, Transformer2DModel, Upsample2D, conv2d, group_norm, linear};

/// A value that is either one number for every block or one per block (diffusers accepts both).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }
    fn len_ok(&self, n: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
    fn values(&self) -> &[usize] {
        match self {
            PerBlock::One(v) => std::slice::from_ref(v),
            PerBlock::Each(v) => v,
        }
    }
}

fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_one() -> PerBlock {
    PerBlock::One(1)
}
fn default_true() -> bool {
    true
}

/// The subset of `UNet2DConditionModel`'s config that SD-1.x/2.x use. Unsupported options are rejected by
/// [`UNetConfig::validate`] rather than silently ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock,
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "default_one")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default = "default_downsample_padding")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
}

fn default_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_downsample_padding() -> usize {
    1
}

impl UNetConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        use crate::limits::{MAX_BLOCKS, MAX_HEADS, MAX_IO_CHANNELS, MAX_LAYERS, MAX_WIDTH, count, positive};
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!("block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have \
                                the same non-zero length", self.down_block_types.len(), self.up_block_types.len()));
        }
        count("number of blocks", n, 1, MAX_BLOCKS)?;
        count("in_channels", self.in_channels, 1, MAX_IO_CHANNELS)?;
        count("out_channels", self.out_channels, 1, MAX_IO_CHANNELS)?;
        count("cross_attention_dim", self.cross_attention_dim, 1, MAX_WIDTH)?;
        count("norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)?;
        count("downsample_padding", self.downsample_padding, 0, 8)?;
        count("sample_size", self.sample_size.unwrap_or(64), 1, 1024)?;
        positive("norm_eps", self.norm_eps)?;
        if !self.freq_shift.is_finite() {
            return Err("freq_shift must be finite".into());
        }
        for &c in &self.block_out_channels {
            count("block_out_channels", c, 1, MAX_WIDTH)?;
        }
        let heads = self.num_attention_heads.as_ref().map(|h| ("num_attention_heads", h));
        for (name, v, max) in [("layers_per_block", &self.layers_per_block, MAX_LAYERS),
                               ("attention_head_dim", &self.attention_head_dim, MAX_HEADS),
                               ("transformer_layers_per_block", &self.transformer_layers_per_block, MAX_LAYERS)]
            .into_iter()
            .chain(heads.map(|(name, h)| (name, h, MAX_HEADS)))
        {
            if !v.len_ok(n) {
                return Err(format!("{name} must be one number or one per block"));
            }
            for &x in v.values() {
                count(name, x, 1, max)?;
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let attends = self.down_block_types[i] == "CrossAttnDownBlock2D" || i == n - 1
                || self.up_block_types[n - 1 - i] == "CrossAttnUpBlock2D";
            if attends && c % self.heads(i) != 0 {
                return Err(format!("block {i}: {c} channels are not divisible into {} attention heads", self.heads(i)));
            }
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(format!("unsupported down block type {t} (SD-1.x uses CrossAttnDownBlock2D/DownBlock2D)"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(format!("unsupported up block type {t} (SD-1.x uses CrossAttnUpBlock2D/UpBlock2D)"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return Err(format!("unsupported mid block type {other:?}")),
        }
        if self.class_embed_type.is_some() || self.addition_embed_type.is_some() || self.time_cond_proj_dim.is_some() {
            return Err("class/addition/time-condition embeddings (SDXL, LCM-style) are not supported".into());
        }
        if self.dual_cross_attention || self.center_input_sample {
            return Err("dual_cross_attention and center_input_sample are not supported".into());
        }
        if matches!(&self.only_cross_attention, serde_json::Value::Bool(true))
            || matches!(&self.only_cross_attention, serde_json::Value::Array(a) if a.iter().any(|v| v == true))
        {
            return Err("only_cross_attention is not supported".into());
        }
        if let Some(s) = &self.resnet_time_scale_shift
            && s != "default"
        {
            return Err(format!("resnet_time_scale_shift = {s} is not supported"));
        }
        for &c in &self.block_out_channels {
            if c % self.norm_num_groups != 0 {
                return Err(format!("block channels {c} not divisible by norm_num_groups {}", self.norm_num_groups));
            }
        }
        Ok(())
    }

    /// Number of attention heads of block `i`. diffusers' SD-1.x configs name the head *count* `attention_head_dim`
    /// (a historical misnomer kept by `UNet2DConditionModel`: `num_attention_heads = num_attention_heads or
    /// attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// How many times the UNet halves the latent resolution.
    pub fn downsamples(&self) -> usize {
        self.block_out_channels.len() - 1
    }
}

/// `time_embedding` (`TimestepEmbedding`).
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

/// A down block: `CrossAttnDownBlock2D` (with `attentions`) or `DownBlock2D` (without).
#[derive(Module, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub downsamplers: Vec<Downsample2D>,
}

/// An up block: `CrossAttnUpBlock2D` or `UpBlock2D`.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub upsamplers: Vec<Upsample2D>,
}

/// `UNetMidBlock2DCrossAttn`.
#[derive(Module, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
}

impl UNet2DConditionModel {
    pub fn new(cfg: &UNetConfig, device: &Device) -> Result<Self> {
        cfg.validate().map_err(|m| Error::invalid_model("unet/config.json", m))?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = ch[0] * 4;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let ctx = cfg.cross_attention_dim;
        let transformer = |c: usize, i: usize| {
            Transformer2DModel::new(c, cfg.heads(i), ctx, cfg.transformer_layers_per_block.get(i), g,
                                    cfg.use_linear_projection, device)
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let c_in = c_out;
            c_out = ch[i];
            let layers = cfg.layers_per_block.get(i);
            let cross = kind == "CrossAttnDownBlock2D";
            down_blocks.push(DownBlock {
                resnets: (0..layers)
                    .map(|j| ResnetBlock2D::new(if j == 0 { c_in } else { c_out }, c_out, Some(temb), g, eps, device))
                    .collect(),
                attentions: if cross { (0..layers).map(|_| transformer(c_out, i)).collect() } else { vec![] },
                downsamplers: if i + 1 < n { vec![Downsample2D::new(c_out, cfg.downsample_padding, device)] } else { vec![] },
            });
        }

        let c_mid = ch[n - 1];
        let mid_block = MidBlock {
            resnets: (0..2).map(|_| ResnetBlock2D::new(c_mid, c_mid, Some(temb), g, eps, device)).collect(),
            attentions: vec![transformer(c_mid, n - 1)],
        };

        // Up blocks mirror the down blocks; block i's per-block settings come from the reversed lists.
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let out = rev[i];
            let skip_in = rev[(i + 1).min(n - 1)];
            let rb = n - 1 - i; // the down block this up block mirrors
            let layers = cfg.layers_per_block.get(rb) + 1;
            let cross = kind == "CrossAttnUpBlock2D";
            up_blocks.push(UpBlock {
                resnets: (0..layers)
                    .map(|j| {
                        let res_skip = if j == layers - 1 { skip_in } else { out };
                        let res_in = if j == 0 { prev_out } else { out };
                        ResnetBlock2D::new(res_in + res_skip, out, Some(temb), g, eps, device)
                    })
                    .collect(),
                attentions: if cross { (0..layers).map(|_| transformer(out, rb)).collect() } else { vec![] },
                upsamplers: if i + 1 < n { vec![Upsample2D::new(out, device)] } else { vec![] },
            });
            prev_out = out;
        }

        Ok(Self {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, device),
            time_embedding: TimestepEmbedding {
                linear_1: linear(ch[0], temb, true, device),
                linear_2: linear(temb, temb, true, device),
            },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(g, ch[0], eps, device),
            conv_out: conv2d(ch[0], cfg.out_channels, 3, 1, 1, device),
            flip_sin_to_cos: cfg.flip_sin_to_cos,
            freq_shift: cfg.freq_shift,
        })
    }

    /// Sinusoidal timestep features (`diffusers.models.embeddings.get_timestep_embedding`), computed on the host
    /// in f32 with the same operation order as diffusers: `[batch, dim]`.
    fn timestep_features(&self, timestep: f64, batch: usize, dim: usize, device: &Device) -> Tensor<2> {
        let half = dim / 2;
        let mut row = vec![0f32; dim];
        for i in 0..half {
            let exponent = -(10000f32.ln()) * i as f32 / (half as f32 - self.freq_shift as f32);
            let arg = (timestep as f32) * exponent.exp();
            let (s, c) = (arg.sin(), arg.cos());
            if self.flip_sin_to_cos {
                row[i] = c;
                row[half + i] = s;
            } else {
                row[i] = s;
                row[half + i] = c;
            }
        }
        let data: Vec<f32> = (0..batch).flat_map(|_| row.iter().copied()).collect();
        Tensor::<1>::from_floats(data.as_slice(), device).reshape([batch, dim])
    }

    /// Predicts the noise in `sample` (`[b, 4, h, w]`) at `timestep`, conditioned on `context` (`[b, 77, d]`).
    pub fn forward(&self, sample: Tensor<4>, timestep: f64, context: &Tensor<3>) -> Tensor<4> {
        self.forward_traced(sample, timestep, context, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), handing the output of every top-level block (`conv_in`, `down_blocks.i`,
    /// `mid_block`, `up_blocks.i`, `conv_out`) to `trace`; the parity tests use it to say where a divergence starts.
    pub fn forward_traced(&self, sample: Tensor<4>, timestep: f64, context: &Tensor<3>,
                          trace: &mut dyn FnMut(&str, &Tensor<4>)) -> Tensor<4> {
        self.blocks(sample, timestep, context, &mut |name, x| {
            trace(name, x);
            true
        }).0
    }

    /// [`forward`](Self::forward), asking `stop` after every top-level block: `None` once it says yes, so a long
    /// step can be cancelled part-way (on a GPU, at the next point the queued work is waited for).
    pub fn forward_until(&self, sample: Tensor<4>, timestep: f64, context: &Tensor<3>, stop: &dyn Fn() -> bool)
        -> Option<Tensor<4>> {
        match self.blocks(sample, timestep, context, &mut |_, _| !stop()) {
            (out, true) => Some(out),
            (_, false) => None,
        }
    }

    /// The forward pass, handing every top-level block's output to `visit`; stops early (returning the output so
    /// far and `false`) when `visit` returns false.
    fn blocks(&self, sample: Tensor<4>, timestep: f64, context: &Tensor<3>,
              visit: &mut dyn FnMut(&str, &Tensor<4>) -> bool) -> (Tensor<4>, bool) {
        let [b, _, _, _] = sample.dims();
        let device = sample.device();
        let c0 = self.conv_in.weight.dims()[0];
        let t = self.timestep_features(timestep, b, c0, &device).cast(sample.dtype());
        let temb = self.time_embedding.linear_2.fwd(silu(self.time_embedding.linear_1.fwd(t)));

        let mut x = self.conv_in.fwd(sample);
        if !visit("conv_in", &x) {
            return (x, false);
        }
        let mut skips = vec![x.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(x, Some(&temb));
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(x, context);
                }
                skips.push(x.clone());
            }
            for down in &block.downsamplers {
                x = down.forward(x);
                skips.push(x.clone());
            }
            if !visit(&format!("down_blocks.{i}"), &x) {
                return (x, false);
            }
        }

        x = self.mid_block.resnets[0].forward(x, Some(&temb));
        x = self.mid_block.attentions[0].forward(x, context);
        x = self.mid_block.resnets[1].forward(x, Some(&temb));
        if !visit("mid_block", &x) {
            return (x, false);
        }

        for (i, block) in self.up_blocks.iter().enumerate() {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().expect("skip connections match the block structure by construction");
                x = resnet.forward(Tensor::cat(vec![x, skip], 1), Some(&temb));
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(x, context);
                }
            }
            for up in &block.upsamplers {
                // Upsample to the next skip's size, so sizes that are not a multiple of 2^depth still line up.
                let size = skips.last().map(|s| {
                    let d = s.dims();
                    [d[2], d[3]]
                });
                x = up.forward(x, size);
            }
            if !visit(&format!("up_blocks.{i}"), &x) {
                return (x, false);
            }
        }
        let out = self.conv_out.fwd(crate::nn::norm(&self.conv_norm_out, x, true));
        let done = visit("conv_out", &out);
        (out, done)
    }
}
