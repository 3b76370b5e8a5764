//! `diffusers.AutoencoderKL`: the encoder (for img2img) and the decoder, configured from `vae/config.json`.

use burn::module::Module;
use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{Forward, Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv2d, group_norm};

fn default_scaling() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}
fn default_groups() -> usize {
    32
}
fn default_latent() -> usize {
    4
}

#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(default = "default_latent")]
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

impl VaeConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        use crate::limits::{MAX_BLOCKS, MAX_IO_CHANNELS, MAX_LAYERS, MAX_WIDTH, count, positive};
        if self.block_out_channels.is_empty() {
            return Err("block_out_channels is empty".into());
        }
        count("number of blocks", self.block_out_channels.len(), 1, MAX_BLOCKS)?;
        for &c in &self.block_out_channels {
            count("block_out_channels", c, 1, MAX_WIDTH)?;
        }
        count("in_channels", self.in_channels, 1, MAX_IO_CHANNELS)?;
        count("out_channels", self.out_channels, 1, MAX_IO_CHANNELS)?;
        count("latent_channels", self.latent_channels, 1, MAX_IO_CHANNELS)?;
        count("layers_per_block", self.layers_per_block, 1, MAX_LAYERS)?;
        count("norm_num_groups", self.norm_num_groups, 1, MAX_WIDTH)?;
        positive("scaling_factor", self.scaling_factor)?;
        // SD's is 0.18215 (SDXL 0.13025, SD3 1.5305): a huge one scales every latent to ~0, a flat image.
        if self.scaling_factor > 100.0 {
            return Err(format!("scaling_factor = {} is above 100 (Stable Diffusion's is 0.18215)", self.scaling_factor));
        }
        if self.shift_factor.is_some_and(|s| !s.is_finite()) {
            return Err("shift_factor must be finite".into());
        }
        if self.down_block_types.iter().any(|t| t != "DownEncoderBlock2D")
            || self.up_block_types.iter().any(|t| t != "UpDecoderBlock2D")
        {
            return Err("only DownEncoderBlock2D/UpDecoderBlock2D VAEs (SD-1.x/2.x) are supported".into());
        }
        if let Some(c) = self.block_out_channels.iter().find(|&&c| c % self.norm_num_groups != 0) {
            return Err(format!("channels {c} not divisible by norm_num_groups {}", self.norm_num_groups));
        }
        Ok(())
    }
    /// Pixels per latent (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// `UNetMidBlock2D` with one attention (as AutoencoderKL builds it: one head of the full channel width).
#[derive(Module, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Attention>,
}

impl VaeMidBlock {
    fn new(c: usize, groups: usize, attention: bool, device: &Device) -> Self {
        Self {
            resnets: (0..2).map(|_| ResnetBlock2D::new(c, c, None, groups, 1e-6, device)).collect(),
            attentions: if attention {
                vec![Attention::new(c, c, 1, c, true, Some(group_norm(groups, c, 1e-6, device)), device)]
            } else {
                vec![]
            },
        }
    }
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        if let Some(attn) = self.attentions.first() {
            x = attn.forward_spatial(x);
        }
        self.resnets[1].forward(x, None)
    }
}

#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub mid_block: VaeMidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// `None` in a decoder-only VAE ([`AutoencoderKL::decoder_only`]: what a bundle ships, since generation never
    /// encodes an image).
    pub encoder: Option<Encoder>,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn new(cfg: &VaeConfig, device: &Device) -> Result<Self> {
        Self::build(cfg, device, true)
    }

    /// The VAE without its encoder (and `quant_conv`): what text-to-image generation uses, and what a bundle
    /// stores ([`crate::bundle`]); [`AutoencoderKL::encode`] then refuses.
    pub fn decoder_only(cfg: &VaeConfig, device: &Device) -> Result<Self> {
        Self::build(cfg, device, false)
    }

    fn build(cfg: &VaeConfig, device: &Device, with_encoder: bool) -> Result<Self> {
        cfg.validate().map_err(|m| Error::invalid_model("vae/config.json", m))?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let g = cfg.norm_num_groups;
        let lat = cfg.latent_channels;
        let layers = cfg.layers_per_block;

        let mut down_blocks = Vec::with_capacity(n);
        let mut c_out = ch[0];
        for i in 0..n {
            let c_in = c_out;
            c_out = ch[i];
            down_blocks.push(DownEncoderBlock2D {
                resnets: (0..layers)
                    .map(|j| ResnetBlock2D::new(if j == 0 { c_in } else { c_out }, c_out, None, g, 1e-6, device))
                    .collect(),
                downsamplers: if i + 1 < n { vec![Downsample2D::new(c_out, 0, device)] } else { vec![] },
            });
        }
        let encoder = with_encoder.then(|| Encoder {
            conv_in: conv2d(cfg.in_channels, ch[0], 3, 1, 1, device),
            down_blocks,
            mid_block: VaeMidBlock::new(ch[n - 1], g, cfg.mid_block_add_attention, device),
            conv_norm_out: group_norm(g, ch[n - 1], 1e-6, device),
            conv_out: conv2d(ch[n - 1], 2 * lat, 3, 1, 1, device),
        });

        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up_blocks = Vec::with_capacity(n);
        let mut c_out = rev[0];
        for i in 0..n {
            let c_in = c_out;
            c_out = rev[i];
            up_blocks.push(UpDecoderBlock2D {
                resnets: (0..layers + 1)
                    .map(|j| ResnetBlock2D::new(if j == 0 { c_in } else { c_out }, c_out, None, g, 1e-6, device))
                    .collect(),
                upsamplers: if i + 1 < n { vec![Upsample2D::new(c_out, device)] } else { vec![] },
            });
        }
        let decoder = Decoder {
            conv_in: conv2d(lat, rev[0], 3, 1, 1, device),
            up_blocks,
            mid_block: VaeMidBlock::new(rev[0], g, cfg.mid_block_add_attention, device),
            conv_norm_out: group_norm(g, ch[0], 1e-6, device),
            conv_out: conv2d(ch[0], cfg.out_channels, 3, 1, 1, device),
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv: (with_encoder && cfg.use_quant_conv).then(|| conv2d(2 * lat, 2 * lat, 1, 1, 0, device)),
            post_quant_conv: cfg.use_post_quant_conv.then(|| conv2d(lat, lat, 1, 1, 0, device)),
        })
    }

    /// Image `[b, 3, H, W]` in [-1, 1] → posterior `(mean, logvar)`, each `[b, latent, H/8, W/8]` (unscaled);
    /// refused by a decoder-only VAE.
    pub fn encode(&self, image: Tensor<4>) -> Result<(Tensor<4>, Tensor<4>)> {
        let e = self.encoder.as_ref().ok_or_else(|| Error::InvalidRequest(
            "this VAE has no encoder (a bundle ships the decoder only)".into()))?;
        let mut x = e.conv_in.fwd(image);
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for d in &block.downsamplers {
                x = d.forward(x);
            }
        }
        x = e.mid_block.forward(x);
        x = e.conv_out.fwd(crate::nn::norm(&e.conv_norm_out, x, true));
        if let Some(q) = &self.quant_conv {
            x = q.fwd(x);
        }
        let lat = x.dims()[1] / 2;
        let mean = x.clone().narrow(1, 0, lat);
        let logvar = x.narrow(1, lat, lat).clamp(-30.0, 20.0);
        Ok((mean, logvar))
    }

    /// Unscaled latents `[b, latent, h, w]` → image `[b, 3, 8h, 8w]` in roughly [-1, 1].
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let d = &self.decoder;
        let mut x = match &self.post_quant_conv {
            Some(p) => p.fwd(latents),
            None => latents,
        };
        x = d.conv_in.fwd(x);
        x = d.mid_block.forward(x);
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for u in &block.upsamplers {
                x = u.forward(x, None);
            }
        }
        d.conv_out.fwd(crate::nn::norm(&d.conv_norm_out, x, true))
    }
}
