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

/// What the forward sees: tokens, each token's rope position, and the attention blocks that
/// cover them in order. A token attends only within its block, so the cost of attention
/// follows the blocks' lengths, never the batch's square.
#[derive(Debug, Clone, Default)]
pub struct SeqLayout {
    pub input_ids: Vec<u32>,
    pub positions: Vec<u32>,
    pub blocks: Vec<Block>,
}

/// `len` tokens that attend only among themselves: a causal `prefix`, then `branches` (their
/// lengths), each seeing the prefix and itself causally but no other branch; the remaining
/// `len − prefix − Σ branches` tokens are padding, each seeing only itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub len: usize,
    pub prefix: usize,
    pub branches: Vec<usize>,
}

impl Block {
    /// A plain causal sequence.
    pub fn causal(len: usize) -> Self {
        Self { len, prefix: len, branches: vec![] }
    }

    /// Additive mask [len, len]: 0 where query i may see key j, −1e9 elsewhere; `window`
    /// hides keys `window` or more positions back (`positions` are the block's).
    fn mask(&self, positions: &[u32], window: Option<usize>) -> Vec<f32> {
        let t = self.len;
        // Which part each token is in: 0 the prefix, k + 1 branch k, usize::MAX padding.
        let mut part = vec![usize::MAX; t];
        let mut at = self.prefix;
        part[..self.prefix].fill(0);
        for (k, &n) in self.branches.iter().enumerate() {
            part[at..at + n].fill(k + 1);
            at += n;
        }
        let mut m = vec![-1e9f32; t * t];
        for i in 0..t {
            for j in 0..=i {
                let ok = if part[i] == usize::MAX { i == j } else { j < self.prefix || part[j] == part[i] };
                let in_window = window.is_none_or(|w| (positions[i] as i64 - positions[j] as i64) < w as i64);
                if ok && in_window {
                    m[i * t + j] = 0.0;
                }
            }
        }
        m
    }
}

impl SeqLayout {
    /// One causal sequence.
    pub fn causal(ids: &[u32]) -> Self {
        Self { input_ids: ids.to_vec(), positions: (0..ids.len() as u32).collect(), blocks: vec![Block::causal(ids.len())] }
    }

    /// Runs of consecutive equal-length blocks, computed as one batched attention each:
    /// (first token, blocks, block length).
    fn groups(&self) -> Vec<(usize, usize, usize)> {
        let mut out: Vec<(usize, usize, usize)> = Vec::new();
        let mut at = 0;
        for b in &self.blocks {
            match out.last_mut() {
                Some((_, n, len)) if *len == b.len => *n += 1,
                _ => out.push((at, 1, b.len)),
            }
            at += b.len;
        }
        out
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
    /// No `lm_head.weight` (a `*ForSequenceClassification` reward model reads hidden states).
    pub without_lm_head: bool,
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
    /// [n, 1, hd] for the n tokens, in the compute dtype.
    cos: Tensor,
    sin: Tensor,
    /// Runs of equal-length blocks: (first token, blocks, block length).
    groups: Vec<(usize, usize, usize)>,
    /// Per sliding window in use, one additive mask [blocks, 1, 1, len, len] per group
    /// (f32, or f64 for f64 models).
    masks: HashMap<Option<usize>, Vec<Tensor>>,
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

/// Rotary embedding of x [n, heads, hd] with cos, sin [n, 1, hd]: the fused CPU op for
/// f32/f64, else composite ops.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if super::fused::applies(x) {
        return Ok(x.contiguous()?.apply_op3(cos, sin, super::fused::Rope)?);
    }
    rope_composite(x, cos, sin)
}

/// x·cos + rotate_half(x)·sin, as transformers' apply_rotary_pos_emb.
pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
}

/// silu(gate) ⊙ up: the fused CPU op for f32/f64, else composite ops.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if super::fused::applies(gate) {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, super::fused::SiluMul)?);
    }
    Ok((gate.silu()? * up)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

impl Attention {
    /// x: [n, d] -> ([n, d], the keys and values [n, nkv, hd] for a key-value cache)
    fn forward(&self, x: &Tensor, a: &AttnInputs) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, nh, nkv, hd) = (x.dim(0)?, self.num_heads, self.num_kv_heads, self.head_dim);
        let g = nh / nkv;
        let rope = |x: &Tensor| rope(x, &a.cos, &a.sin);
        let q = rope(&self.q_proj.forward(x)?.reshape((n, nh, hd))?)?; // [n, nh, hd]
        let k = rope(&self.k_proj.forward(x)?.reshape((n, nkv, hd))?)?; // [n, nkv, hd]
        let v = self.v_proj.forward(x)?.reshape((n, nkv, hd))?; // [n, nkv, hd]
        let mut ys = Vec::with_capacity(a.groups.len());
        for (gi, &(start, b, t)) in a.groups.iter().enumerate() {
            // Grouped-query attention without repeat_kv copies: the g query heads that share a
            // kv head are stacked along the row axis of one matmul.
            let q = q.narrow(0, start, b * t)?.reshape((b, t, nkv, g, hd))?.permute((0, 2, 3, 1, 4))?.contiguous()?.reshape((b, nkv, g * t, hd))?;
            let k = k.narrow(0, start, b * t)?.reshape((b, t, nkv, hd))?.permute((0, 2, 1, 3))?.contiguous()?; // [b, nkv, t, hd]
            let v = v.narrow(0, start, b * t)?.reshape((b, t, nkv, hd))?.permute((0, 2, 1, 3))?.contiguous()?; // [b, nkv, t, hd]
            let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?.reshape((b, nkv, g, t, t))?; // [b, nkv, g, t, t]
                                                                                                         // Softmax in f32 (f64 stays f64), as transformers' eager attention upcasts bf16/f16.
            let dtype = scores.dtype();
            let scores = scores.to_dtype(accum_dtype(dtype))?.broadcast_add(&a.masks[&self.sliding_window][gi])?;
            let probs = softmax_last(&scores)?.to_dtype(dtype)?.reshape((b, nkv, g * t, t))?; // [b, nkv, g*t, t]
            let y = probs.matmul(&v)?.reshape((b, nkv, g, t, hd))?; // [b, nkv, g, t, hd]
            ys.push(y.permute((0, 3, 1, 2, 4))?.contiguous()?.reshape((b * t, nh * hd))?);
            // [b*t, nh*hd]
        }
        let y = if ys.len() == 1 { ys.pop().expect("one group") } else { Tensor::cat(&ys, 0)? };
        Ok((self.o_proj.forward(&y)?, k, v))
    }

    /// One new token for each row of a batch cache, x: [b, d]; its keys and values go to
    /// slot `cache.len` of layer `layer`, and it attends to the row's slots so far.
    fn decode(&self, x: &Tensor, a: &DecodeInputs, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let (cos, sin) = (&a.cos, &a.sin);
        let (b, nh, nkv, hd) = (x.dim(0)?, self.num_heads, self.num_kv_heads, self.head_dim);
        let g = nh / nkv;
        let q = rope(&self.q_proj.forward(x)?.reshape((b, nh, hd))?, cos, sin)?.reshape((b, nkv, g, hd))?;
        let k = rope(&self.k_proj.forward(x)?.reshape((b, nkv, hd))?, cos, sin)?;
        let v = self.v_proj.forward(x)?.reshape((b, nkv, hd))?;
        let t = cache.len + 1;
        cache.k[layer].slice_set(&k.unsqueeze(2)?.contiguous()?, 2, cache.len)?;
        cache.v[layer].slice_set(&v.unsqueeze(2)?.contiguous()?, 2, cache.len)?;
        let keys = cache.k[layer].narrow(2, 0, t)?.contiguous()?; // [b, nkv, t, hd]
        let values = cache.v[layer].narrow(2, 0, t)?.contiguous()?;
        let scores = (q.matmul(&keys.t()?)? * (1.0 / (hd as f64).sqrt()))?; // [b, nkv, g, t]
        let dtype = scores.dtype();
        let mask = &a.masks[&self.sliding_window]; // [b, 1, 1, t]
        let probs = softmax_last(&scores.to_dtype(accum_dtype(dtype))?.broadcast_add(mask)?)?.to_dtype(dtype)?;
        self.o_proj.forward(&probs.matmul(&values)?.reshape((b, nh * hd))?)
    }
}

/// What every layer's attention shares for one decoding step.
struct DecodeInputs {
    /// [b, 1, hd] for the new tokens' positions.
    cos: Tensor,
    sin: Tensor,
    /// Per sliding window in use, the additive mask [b, 1, 1, t] over the cache's slots.
    masks: HashMap<Option<usize>, Tensor>,
}

/// Keys and values of a batch of sequences for incremental decoding, per layer
/// [rows, nkv, capacity, hd]. Prompts are left-padded to end at the same slot, so each step
/// writes every row's new token to one slot and attention runs as one batched matmul.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Left padding of each row (its slots below are masked; its positions start after it).
    pad: Vec<usize>,
    /// Slots filled (padding included), the same for every row.
    pub len: usize,
}

impl KvCache {
    pub fn rows(&self) -> usize {
        self.pad.len()
    }

    /// Keeps only these rows (sequences that have not finished), in this order.
    pub fn keep(&mut self, rows: &[u32]) -> Result<()> {
        let Some(dev) = self.k.first().map(|t| t.device().clone()) else { return Ok(()) };
        let idx = Tensor::from_slice(rows, rows.len(), &dev)?;
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(&idx, 0)?;
        }
        self.pad = rows.iter().map(|&r| self.pad[r as usize]).collect();
        Ok(())
    }

    /// Additive mask [rows, 1, 1, t]: a row sees its own slots, within `window` positions.
    fn mask(&self, t: usize, window: Option<usize>, dev: &Device, dtype: DType) -> Result<Tensor> {
        let mut m = vec![-1e9f32; self.rows() * t];
        for (r, &pad) in self.pad.iter().enumerate() {
            for j in pad..t {
                if window.is_none_or(|w| t - 1 - j < w) {
                    m[r * t + j] = 0.0;
                }
            }
        }
        Ok(Tensor::from_vec(m, (self.rows(), 1, 1, t), dev)?.to_dtype(dtype)?)
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
        self.down_proj.forward(&silu_mul(&self.gate_proj.forward(x)?, &self.up_proj.forward(x)?)?)
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
    fn load(t: &HashMap<String, Tensor>, cfg: &ModelConfig, i: usize, opts: &DecoderOptions) -> Result<Self> {
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
            input_layernorm: get(t, &format!("{p}.input_layernorm.weight"))?,
            post_attention_layernorm: get(t, &format!("{p}.post_attention_layernorm.weight"))?,
            eps: cfg.rms_norm_eps,
        })
    }

    /// x: [n, d] -> ([n, d], this layer's keys and values)
    fn forward(&self, x: &Tensor, a: &AttnInputs) -> Result<(Tensor, Tensor, Tensor)> {
        // Norm weights are cast where they are used, so a trained f32 master copy stays live.
        let (y, k, v) = self.self_attn.forward(&rms_norm(x, &cast(&self.input_layernorm, x.dtype())?, self.eps)?, a)?;
        let x = (x + y)?;
        Ok(((&x + self.mlp.forward(&rms_norm(&x, &cast(&self.post_attention_layernorm, x.dtype())?, self.eps)?)?)?, k, v))
    }

    fn decode(&self, x: &Tensor, a: &DecodeInputs, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let y = self.self_attn.decode(&rms_norm(x, &cast(&self.input_layernorm, x.dtype())?, self.eps)?, a, cache, layer)?;
        let x = (x + y)?;
        Ok((&x + self.mlp.forward(&rms_norm(&x, &cast(&self.post_attention_layernorm, x.dtype())?, self.eps)?)?)?)
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
        let layers = (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(t, cfg, i, opts)).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            lm_head: if cfg.tie_word_embeddings || opts.without_lm_head { None } else { Some(get(t, "lm_head.weight")?) },
            norm: get(t, "model.norm.weight")?,
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

    /// cos and sin [n, 1, hd] for these positions (f32 math, as HF).
    fn rope(&self, positions: &[u32]) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let n = positions.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n * 2 * half), Vec::with_capacity(n * 2 * half));
        for &p in positions {
            for _ in 0..2 {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        let mk = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (n, 1, 2 * half), &self.device)?.to_dtype(self.dtype)?) };
        Ok((mk(cos)?, mk(sin)?))
    }

    /// The additive masks of every group of blocks for one sliding window.
    fn masks(&self, layout: &SeqLayout, groups: &[(usize, usize, usize)], window: Option<usize>) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(groups.len());
        let mut bi = 0;
        for &(start, n, len) in groups {
            let mut m = Vec::with_capacity(n * len * len);
            for k in 0..n {
                let at = start + k * len;
                m.extend(layout.blocks[bi + k].mask(&layout.positions[at..at + len], window));
            }
            bi += n;
            out.push(Tensor::from_vec(m, (n, 1, 1, len, len), &self.device)?.to_dtype(accum_dtype(self.dtype))?);
        }
        Ok(out)
    }

    /// Final-norm hidden states, [n, d] for the layout's n tokens.
    pub fn hidden(&self, layout: &SeqLayout) -> Result<Tensor> {
        Ok(self.hidden_kv(layout)?.0)
    }

    /// `hidden`, and every layer's keys and values [n, nkv, hd] (after RoPE) to start a cache.
    pub fn hidden_kv(&self, layout: &SeqLayout) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let n = layout.input_ids.len();
        anyhow::ensure!(
            layout.positions.len() == n && layout.blocks.iter().map(|b| b.len).sum::<usize>() == n,
            "layout blocks do not cover its tokens"
        );
        let ids = Tensor::from_slice(&layout.input_ids, n, &self.device)?;
        let mut x = cast(&self.embed_tokens.index_select(&ids, 0)?, self.dtype)?; // [n, d]
        let (cos, sin) = self.rope(&layout.positions)?;
        let groups = layout.groups();
        let mut masks = HashMap::new();
        for l in &self.layers {
            let w = l.self_attn.sliding_window;
            if let std::collections::hash_map::Entry::Vacant(e) = masks.entry(w) {
                e.insert(self.masks(layout, &groups, w)?);
            }
        }
        let a = AttnInputs { cos, sin, groups, masks };
        let mut kv = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let (y, k, v) = layer.forward(&x, &a)?;
            x = y;
            kv.push((k, v));
        }
        Ok((rms_norm(&x, &cast(&self.norm, self.dtype)?, self.cfg.rms_norm_eps)?, kv))
    }

    /// A batch cache with one row per (start, len): rows `start..start + len` of a `hidden_kv`
    /// forward (a sequence whose positions start at 0; several rows may share one), left-padded
    /// to end together, with room for `extra` more tokens.
    pub fn batch_cache(&self, kv: &[(Tensor, Tensor)], rows: &[(usize, usize)], extra: usize) -> Result<KvCache> {
        let (nkv, hd) = (self.cfg.num_key_value_heads, self.cfg.head_dim);
        let longest = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let pad: Vec<usize> = rows.iter().map(|r| longest - r.1).collect();
        let zeros = |n: usize| Tensor::zeros((nkv, n, hd), self.dtype, &self.device);
        let tail = zeros(extra)?;
        let mut c = KvCache { k: Vec::with_capacity(kv.len()), v: Vec::with_capacity(kv.len()), pad: pad.clone(), len: longest };
        for (k, v) in kv {
            for (src, dst) in [(k, &mut c.k), (v, &mut c.v)] {
                let seqs = rows
                    .iter()
                    .zip(&pad)
                    .map(|(&(start, len), &p)| {
                        Ok(Tensor::cat(&[&zeros(p)?, &src.narrow(0, start, len)?.transpose(0, 1)?.to_dtype(self.dtype)?, &tail], 1)?)
                    })
                    .collect::<Result<Vec<_>>>()?;
                dst.push(Tensor::stack(&seqs, 0)?);
            }
        }
        Ok(c)
    }

    /// One decoding step: `ids[r]` appended to row r of the cache; returns the final-norm
    /// hidden states [rows, d] of the new tokens.
    pub fn decode(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor> {
        let b = ids.len();
        anyhow::ensure!(cache.rows() == b, "one token per cache row");
        let capacity = cache.k.first().map_or(0, |t| t.dim(2).unwrap_or(0));
        anyhow::ensure!(cache.len < capacity, "key-value cache is full ({capacity} slots)");
        let positions: Vec<u32> = cache.pad.iter().map(|&p| (cache.len - p) as u32).collect();
        let (cos, sin) = self.rope(&positions)?;
        let mut masks = HashMap::new();
        for l in &self.layers {
            let w = l.self_attn.sliding_window;
            if let std::collections::hash_map::Entry::Vacant(e) = masks.entry(w) {
                e.insert(cache.mask(cache.len + 1, w, &self.device, accum_dtype(self.dtype))?);
            }
        }
        let a = DecodeInputs { cos, sin, masks };
        let mut x = cast(&self.embed_tokens.index_select(&Tensor::from_slice(ids, b, &self.device)?, 0)?, self.dtype)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.decode(&x, &a, cache, l)?;
        }
        cache.len += 1;
        rms_norm(&x, &cast(&self.norm, self.dtype)?, self.cfg.rms_norm_eps)
    }

    /// Next-token logits [b, vocab] (f32) from final-norm hidden states [b, d].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = cast(self.lm_head(), hidden.dtype())?;
        Ok(hidden.matmul(&w.t()?)?.to_dtype(DType::F32)?)
    }
}
