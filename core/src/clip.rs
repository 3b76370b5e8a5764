//! `transformers.CLIPTextModel`: token + position embeddings, pre-norm causal transformer, final layer norm.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, Linear};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::{Device, Int, Tensor};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::nn::{Forward, layer_norm, linear, multi_head_attention};

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> String {
    "quick_gelu".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        use crate::limits::{MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH, count, positive};
        count("vocab_size", self.vocab_size, 1, MAX_VOCAB)?;
        count("hidden_size", self.hidden_size, 1, MAX_WIDTH)?;
        count("intermediate_size", self.intermediate_size, 1, MAX_WIDTH)?;
        count("num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)?;
        count("num_attention_heads", self.num_attention_heads, 1, MAX_HEADS)?;
        count("max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)?;
        positive("layer_norm_eps", self.layer_norm_eps)?;
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(format!("unsupported hidden_act {} (quick_gelu or gelu)", self.hidden_act));
        }
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err("hidden_size must be divisible by num_attention_heads".into());
        }
        Ok(())
    }
}

#[derive(Module, Debug)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

#[derive(Module, Debug)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
    pub quick_gelu: bool,
}

impl ClipMlp {
    /// The activation between `fc1` and `fc2`.
    fn act(&self, h: Tensor<3>) -> Tensor<3> {
        if self.quick_gelu { h.clone() * sigmoid(h * 1.702) } else { gelu(h) }
    }
}

#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    pub self_attn: ClipAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: ClipMlp,
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    /// The layer split where `erasepro-text` edits it: `mid` (after self-attention and its residual) and `act`,
    /// the input of `mlp.fc2`; the layer's output is `mid + fc2(act)`.
    pub fn forward_parts(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let h = self.layer_norm1.forward(x.clone());
        let a = &self.self_attn;
        let h = multi_head_attention(a.q_proj.fwd(h.clone()), a.k_proj.fwd(h.clone()), a.v_proj.fwd(h),
                                     a.heads, true);
        let mid = x + a.out_proj.fwd(h);
        let act = self.mlp.act(self.mlp.fc1.fwd(self.layer_norm2.forward(mid.clone())));
        (mid, act)
    }

    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let (mid, act) = self.forward_parts(x);
        mid + self.mlp.fc2.fwd(act)
    }
}

#[derive(Module, Debug)]
pub struct ClipEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct ClipEncoder {
    pub layers: Vec<ClipEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    pub embeddings: ClipEmbeddings,
    pub encoder: ClipEncoder,
    pub final_layer_norm: LayerNorm,
}

/// `CLIPTextModel`; its only child is `text_model`, as in the checkpoint keys (`text_model.encoder.layers.0...`).
#[derive(Module, Debug)]
pub struct CLIPTextModel {
    pub text_model: ClipTextTransformer,
}

impl CLIPTextModel {
    pub fn new(cfg: &ClipTextConfig, device: &Device) -> Result<Self> {
        Self::new_with_table_on(cfg, device, device)
    }

    /// [`new`](Self::new) with the token-embedding table on `table_device`: the CPU when the table (49,408 × 768 f32
    /// = 152 MB for SD-1.x) is larger than what one GPU shader can bind (128 MiB on lavapipe and many phones). Only
    /// the prompt's 77 rows are looked up, so the lookup runs there and hands the rows to `device`.
    pub fn new_with_table_on(cfg: &ClipTextConfig, device: &Device, table_device: &Device) -> Result<Self> {
        cfg.validate().map_err(|m| Error::invalid_model("text_encoder/config.json", m))?;
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: linear(d, d, true, device),
                    k_proj: linear(d, d, true, device),
                    v_proj: linear(d, d, true, device),
                    out_proj: linear(d, d, true, device),
                    heads: cfg.num_attention_heads,
                },
                layer_norm1: layer_norm(d, eps, device),
                mlp: ClipMlp {
                    fc1: linear(d, cfg.intermediate_size, true, device),
                    fc2: linear(cfg.intermediate_size, d, true, device),
                    quick_gelu: cfg.hidden_act == "quick_gelu",
                },
                layer_norm2: layer_norm(d, eps, device),
            })
            .collect();
        Ok(Self {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: EmbeddingConfig::new(cfg.vocab_size, d).init(table_device),
                    position_embedding: EmbeddingConfig::new(cfg.max_position_embeddings, d).init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: layer_norm(d, eps, device),
            },
        })
    }

    /// Token embeddings plus position embeddings for `ids` (`[b, s]`), the input of layer 0.
    pub fn embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.add_positions(self.token_embed(ids))
    }

    /// Token embeddings of `ids` (`[b, s]`, before positions), on `ids`' device, looked up where the table lives.
    pub fn token_embed(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let table = self.token_embedding_device();
        let dev = ids.device();
        if table == dev {
            self.text_model.embeddings.token_embedding.forward(ids)
        } else {
            self.text_model.embeddings.token_embedding.forward(ids.to_device(&table)).to_device(&dev)
        }
    }

    /// The device of the token-embedding table ([`new_with_table_on`](Self::new_with_table_on)).
    pub fn token_embedding_device(&self) -> Device {
        self.text_model.embeddings.token_embedding.weight.val().device()
    }

    /// Whether the token-embedding table lives on another device than the encoder (a GPU with a small binding
    /// limit): work that needs the whole table on the device (the attacks, hardening) is refused there.
    pub fn table_is_offloaded(&self) -> bool {
        self.token_embedding_device() != self.text_model.final_layer_norm.gamma.val().device()
    }

    /// `inputs_embeds` (token embeddings `[b, s, hidden]`, before positions) plus position embeddings.
    pub fn add_positions(&self, inputs_embeds: Tensor<3>) -> Tensor<3> {
        let [b, s, _] = inputs_embeds.dims();
        let positions = Tensor::<1, Int>::arange(0..s as i64, &inputs_embeds.device()).reshape([1, s]).expand([b, s]);
        inputs_embeds + self.text_model.embeddings.position_embedding.forward(positions)
    }

    /// `last_hidden_state` from `inputs_embeds` (transformers' `CLIPTextModel(inputs_embeds=...)`): the entry of the
    /// attacks, which optimise embeddings rather than token ids. Differentiable with respect to `inputs_embeds`.
    pub fn forward_embeds(&self, inputs_embeds: Tensor<3>) -> Tensor<3> {
        let mut x = self.add_positions(inputs_embeds);
        for layer in &self.text_model.encoder.layers {
            x = layer.forward(x);
        }
        self.text_model.final_layer_norm.forward(x)
    }

    /// The token-embedding table `[vocab, hidden]`.
    pub fn token_embeddings(&self) -> Tensor<2> {
        self.text_model.embeddings.token_embedding.weight.val()
    }

    /// `last_hidden_state`: `[b, s, hidden]`. The encoder is causal, so the state at position p depends only on
    /// tokens ≤ p: encoding a prefix gives exactly the prefix of the full encoding.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        self.forward_traced(ids, &mut |_, _| {})
    }

    /// [`forward`](Self::forward), handing the embeddings (index 0) and each layer's output (index k+1, before
    /// the final layer norm) to `trace` — transformers' `hidden_states`.
    pub fn forward_traced(&self, ids: Tensor<2, Int>, trace: &mut dyn FnMut(usize, &Tensor<3>)) -> Tensor<3> {
        let mut x = self.embed(ids);
        trace(0, &x);
        for (k, layer) in self.text_model.encoder.layers.iter().enumerate() {
            x = layer.forward(x);
            trace(k + 1, &x);
        }
        self.text_model.final_layer_norm.forward(x)
    }

    pub fn hidden_size(&self) -> usize {
        self.text_model.final_layer_norm.gamma.dims()[0]
    }
}
