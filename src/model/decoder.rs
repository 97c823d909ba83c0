//! One decoder for Llama/Qwen2/Mistral, laid out like transformers' `modeling_llama.py` /
//! `modeling_qwen2.py`: one struct per HF module (`Attention` = `*Attention`, `Mlp` = `*MLP`,
//! `DecoderLayer` = `*DecoderLayer`, `Decoder` = `*ForCausalLM`), fields named as the
//! checkpoint's tensors. RMSNorm, RoPE, grouped-query attention, SwiGLU, optional biases, tied
//! or untied embeddings, sliding windows. Only differentiable ops (candle's fused
//! rms_norm/rope/softmax kernels have no backward and would drop gradients).
//! The forward takes explicit positions and a visibility matrix, so callers can right-pad, pack
//! or share a prompt between chosen and rejected. Shapes: b rows, t tokens per row,
//! nh query heads, nkv key/value heads (g = nh / nkv share one), hd head dim, d hidden.
use super::config::ModelConfig;
use crate::rng::Rng;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What the forward sees: `batch` rows of `len` tokens, each token's rope position, and
/// which keys each query may attend to.
#[derive(Debug, Clone)]
pub struct SeqLayout {
    pub batch: usize,
    pub len: usize,
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    /// `visible[(b * len + i) * len + j]`: query i of row b may attend to key j.
    pub visible: Vec<bool>,
}

impl SeqLayout {
    /// Additive mask [batch, 1, 1, len, len]; `window` hides keys `window` or more positions back.
    fn mask(&self, window: Option<usize>, dtype: DType, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.batch, self.len);
        let mut m = vec![0f32; b * t * t];
        for r in 0..b {
            for i in 0..t {
                let qi = r * t + i;
                for j in 0..t {
                    let mut ok = self.visible[qi * t + j];
                    if let (true, Some(w)) = (ok, window) {
                        ok = (self.positions[qi] as i64 - self.positions[r * t + j] as i64) < w as i64;
                    }
                    if !ok {
                        m[qi * t + j] = -1e9;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, 1, t, t), device)?.to_dtype(dtype)?)
    }
}

/// `nn.Linear`: y = x Wᵀ (+ b), with PEFT's LoRA when the tensors include an adapter for it:
/// + (α/r) · dropout(x) Aᵀ Bᵀ.
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    /// The weight gets no gradient (a LoRA base): the backward skips it.
    frozen: bool,
}

/// A LoRA adapter on one linear layer.
struct Lora {
    /// [r, in]
    a: Tensor,
    /// [out, r]
    b: Tensor,
    scale: f64,
    dropout: Option<Dropout>,
}

/// Dropout on the adapter's input (training only), drawn from a seeded generator the trainer
/// reseeds for every micro-batch, so a resumed run draws the same masks.
#[derive(Clone)]
pub struct Dropout {
    pub p: f64,
    pub rng: Arc<Mutex<Rng>>,
}

impl Dropout {
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let keep = 1.0 - self.p;
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mask: Vec<f32> = (0..x.elem_count()).map(|_| if rng.uniform() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
        Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?)
    }
}

/// How a decoder computes, beyond its tensors.
#[derive(Clone, Default)]
pub struct DecoderOptions {
    /// Compute dtype (default: the embedding's). Weights stored in another dtype are cast
    /// where they are used, so a frozen base can be held in bf16 under f32 math.
    pub compute_dtype: Option<DType>,
    /// LoRA α/r, for the `*.lora_A.weight` / `*.lora_B.weight` tensors present.
    pub lora_scale: Option<f64>,
    pub lora_dropout: Option<Dropout>,
    /// The linear weights are frozen (LoRA's base): no weight gradients are computed.
    pub frozen_base: bool,
}

/// `t` in `dtype` (a no-op when it already is).
fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? })
}

impl Linear {
    fn load(t: &HashMap<String, Tensor>, prefix: &str, bias: bool, opts: &DecoderOptions) -> Result<Self> {
        let lora = match (t.get(&format!("{prefix}.lora_A.weight")), t.get(&format!("{prefix}.lora_B.weight")), opts.lora_scale) {
            (Some(a), Some(b), Some(scale)) => Some(Lora { a: a.clone(), b: b.clone(), scale, dropout: opts.lora_dropout.clone() }),
            _ => None,
        };
        let bias = if bias { Some(get(t, &format!("{prefix}.bias"))?) } else { None };
        Ok(Self { weight: get(t, &format!("{prefix}.weight"))?, bias, lora, frozen: opts.frozen_base })
    }

    /// x: [n, in] -> [n, out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = if self.frozen { super::fused::frozen_linear(x, &self.weight)? } else { x.matmul(&cast(&self.weight, x.dtype())?.t()?)? };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&cast(b, x.dtype())?)?;
        }
        if let Some(l) = &self.lora {
            let xd = match &l.dropout {
                Some(d) if d.p > 0.0 => d.apply(x)?,
                _ => x.clone(),
            };
            let low = xd.matmul(&cast(&l.a, x.dtype())?.t()?)?; // [n, r]
            y = (y + (low.matmul(&cast(&l.b, x.dtype())?.t()?)? * l.scale)?)?; // [n, out]
        }
        Ok(y)
    }
}

fn get(t: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    t.get(name).cloned().with_context(|| format!("tensor `{name}` is missing"))
}

/// What every layer's attention shares for one forward.
struct AttnInputs {
    b: usize,
    t: usize,
    /// [b, t, 1, hd], in the compute dtype.
    cos: Tensor,
    sin: Tensor,
    /// Additive masks [b, 1, 1, t, t] (f32 or f64), one per sliding window in use.
    masks: HashMap<Option<usize>, Tensor>,
}

/// `LlamaAttention` / `Qwen2Attention`.
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    sliding_window: Option<usize>,
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

impl Attention {
    /// x: [b*t, d] -> [b*t, d]
    fn forward(&self, x: &Tensor, a: &AttnInputs) -> Result<Tensor> {
        let (b, t, nh, nkv, hd) = (a.b, a.t, self.num_heads, self.num_kv_heads, self.head_dim);
        let g = nh / nkv;
        let rope = |x: &Tensor| -> Result<Tensor> { Ok((x.broadcast_mul(&a.cos)? + rotate_half(x)?.broadcast_mul(&a.sin)?)?) };
        let q = rope(&self.q_proj.forward(x)?.reshape((b, t, nh, hd))?)?; // [b, t, nh, hd]
        let k = rope(&self.k_proj.forward(x)?.reshape((b, t, nkv, hd))?)?; // [b, t, nkv, hd]
        let v = self.v_proj.forward(x)?.reshape((b, t, nkv, hd))?; // [b, t, nkv, hd]
                                                                   // Grouped-query attention without repeat_kv copies: the g query heads that share a
                                                                   // kv head are stacked along the row axis of one matmul.
        let q = q.reshape((b, t, nkv, g, hd))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((b, nkv, g * t, hd))?; // [b, nkv, g*t, hd]
        let k = k.permute((0, 2, 1, 3))?.contiguous()?; // [b, nkv, t, hd]
        let v = v.permute((0, 2, 1, 3))?.contiguous()?; // [b, nkv, t, hd]
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.reshape((b, nkv, g, t, t))?; // [b, nkv, g, t, t]
                                                                                                     // Softmax in f32 (f64 stays f64), as transformers' eager attention upcasts bf16/f16.
        let dtype = scores.dtype();
        let scores = scores.to_dtype(accum_dtype(dtype))?.broadcast_add(&a.masks[&self.sliding_window])?;
        let probs = softmax_last(&scores)?.to_dtype(dtype)?.reshape((b, nkv, g * t, t))?; // [b, nkv, g*t, t]
        let y = probs.matmul(&v)?.reshape((b, nkv, g, t, hd))?; // [b, nkv, g, t, hd]
        let y = y.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b * t, nh * hd))?; // [b*t, nh*hd]
        self.o_proj.forward(&y)
    }
}

/// `LlamaMLP` / `Qwen2MLP`: SwiGLU.
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    /// x: [n, d] -> [n, d] (intermediate [n, i])
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&(self.gate_proj.forward(x)?.silu()? * self.up_proj.forward(x)?)?)
    }
}

/// `LlamaDecoderLayer` / `Qwen2DecoderLayer`: pre-norm attention and MLP, each residual.
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    eps: f64,
}

impl DecoderLayer {
    fn load(t: &HashMap<String, Tensor>, cfg: &ModelConfig, i: usize, opts: &DecoderOptions, dtype: DType) -> Result<Self> {
        let p = format!("model.layers.{i}");
        let lin = |name: &str, bias: bool| Linear::load(t, &format!("{p}.{name}"), bias, opts);
        Ok(Self {
            self_attn: Attention {
                q_proj: lin("self_attn.q_proj", cfg.qkv_bias)?,
                k_proj: lin("self_attn.k_proj", cfg.qkv_bias)?,
                v_proj: lin("self_attn.v_proj", cfg.qkv_bias)?,
                o_proj: lin("self_attn.o_proj", cfg.o_bias)?,
                num_heads: cfg.num_attention_heads,
                num_kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
                sliding_window: cfg.layer_windows[i],
            },
            mlp: Mlp {
                gate_proj: lin("mlp.gate_proj", cfg.mlp_bias)?,
                up_proj: lin("mlp.up_proj", cfg.mlp_bias)?,
                down_proj: lin("mlp.down_proj", cfg.mlp_bias)?,
            },
            input_layernorm: cast(&get(t, &format!("{p}.input_layernorm.weight"))?, dtype)?,
            post_attention_layernorm: cast(&get(t, &format!("{p}.post_attention_layernorm.weight"))?, dtype)?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// x: [b*t, d] -> [b*t, d]
    fn forward(&self, x: &Tensor, a: &AttnInputs) -> Result<Tensor> {
        let x = (x + self.self_attn.forward(&rms_norm(x, &self.input_layernorm, self.eps)?, a)?)?;
        Ok((&x + self.mlp.forward(&rms_norm(&x, &self.post_attention_layernorm, self.eps)?)?)?)
    }
}

/// `LlamaForCausalLM` / `Qwen2ForCausalLM` up to the final norm; the output projection is
/// applied by `logprobs` only at scored positions.
pub struct Decoder {
    pub cfg: ModelConfig,
    embed_tokens: Tensor,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    /// `lm_head.weight`; None when tied to the embedding.
    lm_head: Option<Tensor>,
    inv_freq: Vec<f32>,
    pub dtype: DType,
    pub device: Device,
}

/// Accumulation dtype: f32 for f32/bf16/f16 (as transformers), f64 stays f64 (for gradient checks).
pub fn accum_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last dim: the fused CPU op for f32/f64, else composite ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if super::fused::applies(x) && x.dtype() == w.dtype() {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, super::fused::RmsNorm { eps })?);
    }
    rms_norm_composite(x, w, eps)
}

/// RMSNorm in f32, as transformers computes it, scaled by the weight in the compute dtype.
pub fn rms_norm_composite(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(accum_dtype(dtype))?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(w)?)
}

/// Softmax over the last dim, differentiable: the fused CPU op, else composite ops.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        return Ok(x.contiguous()?.apply_op1(super::fused::SoftmaxLast)?);
    }
    softmax_last_composite(x)
}

/// Softmax from candle's differentiable ops; the max shift is a constant for autograd.
pub fn softmax_last_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

impl Decoder {
    /// Builds the decoder from HF-named tensors (plain tensors for inference, or the tensors of
    /// `Var`s when training).
    pub fn new(cfg: &ModelConfig, t: &HashMap<String, Tensor>) -> Result<Self> {
        Self::with_options(cfg, t, &DecoderOptions::default())
    }

    /// As `new`, with a compute dtype and LoRA adapters (see [`DecoderOptions`]).
    pub fn with_options(cfg: &ModelConfig, t: &HashMap<String, Tensor>, opts: &DecoderOptions) -> Result<Self> {
        let embed_tokens = get(t, "model.embed_tokens.weight")?;
        let dtype = opts.compute_dtype.unwrap_or(embed_tokens.dtype());
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(t, cfg, i, opts, dtype)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lm_head: if cfg.tie_word_embeddings { None } else { Some(get(t, "lm_head.weight")?) },
            norm: cast(&get(t, "model.norm.weight")?, dtype)?,
            dtype,
            device: embed_tokens.device().clone(),
            embed_tokens,
            layers,
            inv_freq: cfg.inv_freq(),
            cfg: cfg.clone(),
        })
    }

    /// The output projection [vocab, d] (the embedding when tied), as stored: the log-prob
    /// ops take it in the compute dtype or, frozen, in bf16/f16.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// cos and sin [b, t, 1, hd] for the layout's positions (f32 math, as HF).
    fn rope(&self, layout: &SeqLayout) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let n = layout.positions.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * 2 * half), Vec::with_capacity(n * 2 * half));
        for &p in &layout.positions {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let shape = (layout.batch, layout.len, 1, 2 * half);
        let mk = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, shape, &self.device)?.to_dtype(self.dtype)?) };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// Final-norm hidden states, [b*t, d].
    pub fn hidden(&self, layout: &SeqLayout) -> Result<Tensor> {
        let (b, t) = (layout.batch, layout.len);
        let ids = Tensor::from_slice(&layout.input_ids, b * t, &self.device)?;
        let mut x = cast(&self.embed_tokens.index_select(&ids, 0)?, self.dtype)?; // [b*t, d]
        let (cos, sin) = self.rope(layout)?;
        let mut masks = HashMap::new();
        for l in &self.layers {
            let w = l.self_attn.sliding_window;
            if let std::collections::hash_map::Entry::Vacant(e) = masks.entry(w) {
                e.insert(layout.mask(w, accum_dtype(self.dtype), &self.device)?);
            }
        }
        let a = AttnInputs { b, t, cos, sin, masks };
        for layer in &self.layers {
            x = layer.forward(&x, &a)?;
        }
        rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)
    }
}
