//! One decoder for Llama/Qwen2/Mistral: RMSNorm, RoPE, grouped-query attention, SwiGLU, optional
//! biases, tied or untied embeddings, sliding windows. Only differentiable candle ops are used
//! (candle's fused rms_norm/rope/softmax kernels have no backward and would drop gradients).
//! The forward takes explicit positions and a visibility matrix, so callers can right-pad, pack
//! or share a prompt between chosen and rejected.
use super::config::ModelConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

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

struct Linear {
    w: Tensor,
    b: Option<Tensor>,
}

impl Linear {
    /// x: [n, in] -> [n, out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.matmul(&self.w.t()?)?;
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    ln1: Tensor,
    ln2: Tensor,
    window: Option<usize>,
}

pub struct Decoder {
    pub cfg: ModelConfig,
    embed: Tensor,
    lm_head: Option<Tensor>,
    norm: Tensor,
    layers: Vec<Layer>,
    inv_freq: Vec<f32>,
    pub dtype: DType,
    pub device: Device,
}

/// Accumulation dtype: f32 for f32/bf16/f16 (as transformers), f64 stays f64 (for gradient checks).
pub fn accum_dtype(d: DType) -> DType {
    if d == DType::F64 { DType::F64 } else { DType::F32 }
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

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

impl Decoder {
    /// Builds the decoder from HF-named tensors (plain tensors for inference, or the tensors of
    /// `Var`s when training).
    pub fn new(cfg: &ModelConfig, t: &HashMap<String, Tensor>) -> Result<Self> {
        let get = |n: &str| t.get(n).cloned().with_context(|| format!("tensor `{n}` is missing"));
        let lin = |p: &str, bias: bool| -> Result<Linear> {
            Ok(Linear { w: get(&format!("{p}.weight"))?, b: if bias { Some(get(&format!("{p}.bias"))?) } else { None } })
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Layer {
                    q: lin(&format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
                    k: lin(&format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
                    v: lin(&format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
                    o: lin(&format!("{p}.self_attn.o_proj"), cfg.o_bias)?,
                    gate: lin(&format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                    up: lin(&format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                    down: lin(&format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
                    ln1: get(&format!("{p}.input_layernorm.weight"))?,
                    ln2: get(&format!("{p}.post_attention_layernorm.weight"))?,
                    window: cfg.layer_windows[i],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let embed = get("model.embed_tokens.weight")?;
        Ok(Self {
            lm_head: if cfg.tie_word_embeddings { None } else { Some(get("lm_head.weight")?) },
            norm: get("model.norm.weight")?,
            dtype: embed.dtype(),
            device: embed.device().clone(),
            embed,
            layers,
            inv_freq: cfg.inv_freq(),
            cfg: cfg.clone(),
        })
    }

    /// The output projection [vocab, hidden] (the embedding when tied).
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// cos and sin [batch, len, 1, head_dim] for the layout's positions (f32 math, as HF).
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

    /// Final-norm hidden states, [batch * len, hidden].
    pub fn hidden(&self, layout: &SeqLayout) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, t) = (layout.batch, layout.len);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
        let g = nh / nkv;
        let ids = Tensor::from_slice(&layout.input_ids, b * t, &self.device)?;
        let mut x = self.embed.index_select(&ids, 0)?;
        let (cos, sin) = self.rope(layout)?;
        let mut masks: HashMap<Option<usize>, Tensor> = HashMap::new();
        for l in &self.layers {
            if !masks.contains_key(&l.window) {
                masks.insert(l.window, layout.mask(l.window, self.dtype, &self.device)?);
            }
        }
        let rope = |x: &Tensor| -> Result<Tensor> { Ok((x.broadcast_mul(&cos)? + rotate_half(x)?.broadcast_mul(&sin)?)?) };
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let h = rms_norm(&x, &l.ln1, cfg.rms_norm_eps)?;
            let q = rope(&l.q.forward(&h)?.reshape((b, t, nh, hd))?)?;
            let k = rope(&l.k.forward(&h)?.reshape((b, t, nkv, hd))?)?;
            let v = l.v.forward(&h)?.reshape((b, t, nkv, hd))?;
            // Grouped-query attention without repeat_kv copies: the g query heads that share a
            // kv head are stacked along the row axis of one matmul.
            let q = q.reshape((b, t, nkv, g, hd))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((b, nkv, g * t, hd))?;
            let k = k.permute((0, 2, 1, 3))?.contiguous()?;
            let v = v.permute((0, 2, 1, 3))?.contiguous()?;
            let scores = (q.matmul(&k.t()?)? * scale)?.reshape((b, nkv, g, t, t))?;
            let probs = softmax_last(&scores.broadcast_add(&masks[&l.window])?)?.reshape((b, nkv, g * t, t))?;
            let attn = probs.matmul(&v)?.reshape((b, nkv, g, t, hd))?.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b * t, nh * hd))?;
            x = (x + l.o.forward(&attn)?)?;
            let h = rms_norm(&x, &l.ln2, cfg.rms_norm_eps)?;
            let mlp = l.down.forward(&(l.gate.forward(&h)?.silu()? * l.up.forward(&h)?)?)?;
            x = (x + mlp)?;
        }
        rms_norm(&x, &self.norm, cfg.rms_norm_eps)
    }
}
