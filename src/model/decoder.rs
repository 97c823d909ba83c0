//! One decoder for every family the project serves (Llama, Mistral, Qwen2/3, Qwen3-MoE,
//! Mixtral, Gemma 2/3, Phi-3, OLMo 2, SmolLM3), laid out like transformers' modeling files: one
//! struct per HF module (`Attention`, `Mlp`, `Moe`, `DecoderLayer`, `Decoder` = `*ForCausalLM`),
//! fields named as the checkpoint's tensors. The families differ only in switches read by
//! `ModelConfig` (norm style and placement, q/k norms, activation, fused projections,
//! embedding scale, soft-capping, per-layer windows and rope, dense or sparse MLP), composed
//! here. Only differentiable ops (candle's fused kernels have no backward).
//!
//! The forward takes explicit positions and attention blocks, so callers can right-pad, pack
//! or share a prompt between chosen and rejected; attention never stores (tokens × tokens)
//! scores (`attention`). With gradient checkpointing each layer keeps only its input and
//! reruns in the backward (`Checkpoint`). Under full sharding the decoder holds no layer at
//! all: each layer is built from weights a [`LayerSource`] gathers just before it runs (again
//! for its backward) and dropped after, its gradients handed back to the source. Shapes: n tokens, nh query heads, nkv key/value heads
//! (g = nh / nkv share one), hd head dim, d hidden.
use super::attention::{self, AttnLayout, AttnOptions, Span};
use super::config::{Activation, ExpertNames, LayerSpec, ModelConfig, MoeConfig, NormPlacement, NormStyle, QkNorm};
use super::ops::{accum_dtype, gated_act, rms_norm, rope, softmax_last};
use crate::rng::Rng;
use anyhow::{Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor, TensorId, Var};
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
}

impl SeqLayout {
    /// One causal sequence.
    pub fn causal(ids: &[u32]) -> Self {
        Self { input_ids: ids.to_vec(), positions: (0..ids.len() as u32).collect(), blocks: vec![Block::causal(ids.len())] }
    }

    /// The attention spans of the layout (shared by every layer of a forward).
    pub fn attn_layout(&self) -> AttnLayout {
        let mut spans = Vec::with_capacity(self.blocks.len());
        let mut start = 0;
        for b in &self.blocks {
            let mut at = b.prefix;
            let branches = b
                .branches
                .iter()
                .map(|&n| {
                    at += n;
                    (at - n, n)
                })
                .collect();
            spans.push(Span { start, len: b.len, prefix: b.prefix, branches });
            start += b.len;
        }
        AttnLayout { spans, positions: self.positions.clone() }
    }

    /// How many times each token counts in a padded batch of one row per sequence (TRL's): a
    /// shared prompt once per branch, padding not at all. Weighs MoE routing statistics.
    pub fn token_weights(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.input_ids.len());
        for b in &self.blocks {
            let shared = b.branches.len().max(1) as f32;
            let real: usize = b.prefix + b.branches.iter().sum::<usize>();
            w.extend(std::iter::repeat_n(shared, b.prefix));
            w.extend(std::iter::repeat_n(1.0, real - b.prefix));
            w.extend(std::iter::repeat_n(0.0, b.len - real));
        }
        w
    }
}

/// `nn.Linear`: y = x Wᵀ (+ b), with PEFT's LoRA when the tensors include an adapter for it:
/// + (α/r) · dropout(x) Aᵀ Bᵀ.
struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    lora: Option<Lora>,
    /// The weight gets no gradient (a LoRA base): the backward skips it.
    frozen: bool,
    /// Where a trained weight's gradient goes (see [`SunkLinear`]); None: candle's gradient store.
    grads_to: Option<Arc<GradSink>>,
}

/// A linear layer's weight: a tensor, or a frozen bitsandbytes 4-bit one (`quant`).
enum Weight {
    Dense(Tensor),
    Quant4(Arc<super::quant::Quant4>),
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
    /// Trained linear weights hand their gradients here instead of to candle's gradient
    /// store (see [`SunkLinear`]); the caller collects them after the backward.
    pub weight_grads: Option<Arc<GradSink>>,
    /// No `lm_head.weight` (a `*ForSequenceClassification` reward model reads hidden states).
    pub without_lm_head: bool,
    /// 4-bit weights by tensor name (QLoRA's frozen base): those linear layers use them.
    pub quantized: Option<Arc<super::quant::QuantWeights>>,
    /// Gradient checkpointing: each layer keeps only its input and reruns in the backward;
    /// the parameters' gradients are collected here (see [`GradSink`]).
    pub checkpoint: Option<Arc<GradSink>>,
    /// Fully sharded training: the layers' weights come from here, one layer at a time (the
    /// tensors given to the decoder then hold only the embedding, final norm and head).
    pub layers_from: Option<Arc<dyn LayerSource>>,
}

/// One decoder layer's full weights (HF names), and which of them are trained.
pub struct Gathered {
    pub tensors: HashMap<String, Tensor>,
    pub trained: Vec<String>,
    /// The layer's 4-bit weights (a QLoRA base), by name.
    pub quantized: Option<Arc<super::quant::QuantWeights>>,
}

impl Gathered {
    /// The layer built from these weights.
    fn layer(&self, cfg: &ModelConfig, i: usize, opts: &DecoderOptions) -> Result<DecoderLayer> {
        match &self.quantized {
            Some(q) => DecoderLayer::load(&self.tensors, cfg, i, &DecoderOptions { quantized: Some(q.clone()), ..opts.clone() }),
            None => DecoderLayer::load(&self.tensors, cfg, i, opts),
        }
    }
}

/// Where a decoder's layer weights live when no rank holds them whole (`--shard-params`):
/// `gather` assembles layer i from the ranks' shards, `reduce` hands its weight gradients back
/// (summed over the ranks, each keeping its shard). Both are collectives: every rank calls
/// them in the same order, which the decoder's fixed layer order gives.
pub trait LayerSource: Send + Sync {
    fn gather(&self, layer: usize) -> Result<Gathered>;
    /// Starts gathering layer i, the one the caller will ask for next, so the transfer runs
    /// while the current layer computes; `gather(i)` then finishes it. A collective too.
    fn prefetch(&self, _layer: usize) -> Result<()> {
        Ok(())
    }
    fn reduce(&self, layer: usize, grads: HashMap<String, Tensor>) -> Result<()>;
    /// The embedding or the output head whole, gathered for one use (a collective).
    fn gather_one(&self, name: &str) -> Result<Tensor>;
    /// Its gradient, summed over the ranks into this rank's shard (a collective).
    fn reduce_one(&self, name: &str, grad: Tensor) -> Result<()>;
    fn trains(&self, name: &str) -> bool;
}

/// A detached result's storage, as a custom op's forward returns it (the ops below compute
/// eagerly, then attach their backward).
fn stored_cpu(out: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let (s, l) = out.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok((c.try_clone(l)?, out.shape().clone())),
        _ => Err(candle_core::Error::Msg("result on another device".into())),
    }
}

#[cfg(feature = "cuda")]
fn stored_cuda(out: &Tensor) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    let (s, l) = out.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => Ok((c.try_clone(l)?, out.shape().clone())),
        _ => Err(candle_core::Error::Msg("result on another device".into())),
    }
}

/// An op computed eagerly, whose result `out` is attached to its input with its own backward
/// (the sharded embedding and head, checkpointed layers, linear layers with sunk gradients).
trait Eager: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn out(&self) -> &Tensor;
    /// The input's gradient (None: it has none to pass on).
    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>>;
}

/// An [`Eager`] op as the candle op that records it.
struct Attached<T>(T);

impl<T: Eager> candle_core::CustomOp1 for Attached<T> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        stored_cpu(self.0.out())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        stored_cuda(self.0.out())
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        self.0.backward(x, grad).map_err(|e| candle_core::Error::Msg(format!("{e:#}")))
    }
}

/// Under full sharding, the embedding rows of a forward (looked up from the gathered
/// embedding, which is then freed); the backward index-adds the rows' gradient into the
/// embedding's and hands it to the source. Applied to a zero leaf, so candle records it.
struct EmbedLookup {
    source: Arc<dyn LayerSource>,
    name: String,
    ids: Tensor,
    vocab: usize,
    out: Tensor,
}

impl Eager for EmbedLookup {
    fn name(&self) -> &'static str {
        "sharded-embedding"
    }

    fn out(&self) -> &Tensor {
        &self.out
    }

    fn backward(&self, _x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_dtype(DType::F32)?;
        let full = Tensor::zeros((self.vocab, g.dim(1)?), DType::F32, g.device())?.index_add(&self.ids, &g, 0)?;
        self.source.reduce_one(&self.name, full)?;
        Ok(None)
    }
}

/// Under full sharding, the log-probs of the scored tokens through the gathered output head
/// (freed after the forward); the backward gathers the head again, recomputes, hands the head's
/// gradient to the source and returns the hidden states'.
struct HeadPass {
    source: Arc<dyn LayerSource>,
    name: String,
    scored: super::logprobs::Scored,
    softcap: Option<f64>,
    out: Tensor,
}

impl Eager for HeadPass {
    fn name(&self) -> &'static str {
        "sharded-head"
    }

    fn out(&self) -> &Tensor {
        &self.out
    }

    fn backward(&self, h: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let w = Var::from_tensor(&self.source.gather_one(&self.name)?)?;
        let trains = self.source.trains(&self.name);
        let hv = Var::from_tensor(&h.detach())?;
        let head = if trains { w.as_tensor().clone() } else { w.as_tensor().detach() };
        let lp = super::logprobs::token_logps(hv.as_tensor(), &head, &self.scored, self.softcap)?;
        let acc = accum_dtype(lp.dtype());
        let grads = (lp.to_dtype(acc)? * grad.detach().to_dtype(acc)?)?.sum_all()?.backward()?;
        drop(head);
        if trains {
            let gw = grads.get(w.as_tensor()).context("sharded head: no gradient for the head")?.clone();
            drop(w);
            self.source.reduce_one(&self.name, gw)?;
        }
        Ok(Some(grads.get(hv.as_tensor()).context("sharded head: no gradient for the hidden states")?.clone()))
    }
}

/// y = x·Wᵀ for a trained weight whose gradient goes to a [`GradSink`] rather than through
/// candle's graph. candle's gradient store starts each gradient from zeros and adds it (two
/// weight-sized buffers per use), and a master weight cast to the compute dtype adds the cast
/// node's own (its bf16 gradient, widened, then zeros and add again): under bf16 mixed precision
/// that was most of the step's fresh memory. Here W is cast once for the forward and kept for
/// dx = g·W; dW = gᵀ·x is computed straight into W's dtype (f32 sums of the bf16 products on
/// the CPU, no bf16 rounding) and the sink keeps the first gradient as it is.
struct SunkLinear {
    weight: TensorId,
    weight_dtype: DType,
    /// W in x's dtype, detached.
    cast: Tensor,
    sink: Arc<GradSink>,
    out: Tensor,
}

impl SunkLinear {
    /// x: [n, in], w: [out, in] (tracked: its id names the gradient) -> [n, out].
    fn apply(x: &Tensor, w: &Tensor, sink: &Arc<GradSink>) -> Result<Tensor> {
        let cast = cast(&w.detach(), x.dtype())?;
        let out = super::bf16_gemm::mm(&x.detach(), &cast.t()?)?;
        if !x.track_op() {
            return Ok(out);
        }
        let op = SunkLinear { weight: w.id(), weight_dtype: w.dtype(), cast, sink: sink.clone(), out };
        Ok(x.apply_op1(Attached(op))?)
    }
}

impl Eager for SunkLinear {
    fn name(&self) -> &'static str {
        "sunk-linear"
    }

    fn out(&self) -> &Tensor {
        &self.out
    }

    fn backward(&self, x: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (x.detach(), g.detach());
        let dw = match super::bf16_gemm::mm_f32(&g.t()?, &x)? {
            Some(dw) => cast(&dw, self.weight_dtype)?,
            None => cast(&g.t()?.matmul(&x)?, self.weight_dtype)?,
        };
        self.sink.add(self.weight, dw)?;
        Ok(Some(super::bf16_gemm::mm(&g, &self.cast)?))
    }
}

/// `t` in `dtype` (a no-op when it already is).
fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dtype { t.clone() } else { t.to_dtype(dtype)? })
}

fn get(t: &HashMap<String, Tensor>, name: &str) -> Result<Tensor> {
    t.get(name).cloned().with_context(|| format!("tensor `{name}` is missing"))
}

impl Linear {
    fn load(t: &HashMap<String, Tensor>, prefix: &str, bias: bool, opts: &DecoderOptions) -> Result<Self> {
        let lora = match (t.get(&format!("{prefix}.lora_A.weight")), t.get(&format!("{prefix}.lora_B.weight")), opts.lora_scale) {
            (Some(a), Some(b), Some(scale)) => Some(Lora { a: a.clone(), b: b.clone(), scale, dropout: opts.lora_dropout.clone() }),
            _ => None,
        };
        let bias = if bias { Some(get(t, &format!("{prefix}.bias"))?) } else { None };
        let name = format!("{prefix}.weight");
        let weight = match opts.quantized.as_ref().and_then(|q| q.get(&name)) {
            Some(q) => Weight::Quant4(q.clone()),
            None => Weight::Dense(get(t, &name)?),
        };
        let grads_to = if opts.frozen_base { None } else { opts.weight_grads.clone() };
        Ok(Self { weight, bias, lora, frozen: opts.frozen_base, grads_to })
    }

    /// x: [n, in] -> [n, out]
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut y = match &self.weight {
            Weight::Quant4(q) => super::quant::linear(x, q)?,
            Weight::Dense(w) if self.frozen => super::fused::frozen_linear(x, w)?,
            Weight::Dense(w) => match &self.grads_to {
                Some(sink) => SunkLinear::apply(x, w, sink)?,
                None => super::bf16_gemm::mm(x, &cast(w, x.dtype())?.t()?)?,
            },
        };
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

    fn params(&self) -> impl Iterator<Item = &Tensor> {
        let dense = match &self.weight {
            Weight::Dense(w) => Some(w),
            Weight::Quant4(_) => None,
        };
        [dense, self.bias.as_ref()].into_iter().flatten().chain(self.lora.iter().flat_map(|l| [&l.a, &l.b]))
    }
}

/// RMSNorm in the family's style (see `NormStyle`).
struct Norm {
    weight: Tensor,
    eps: f64,
    style: NormStyle,
}

impl Norm {
    fn load(t: &HashMap<String, Tensor>, name: &str, cfg: &ModelConfig) -> Result<Self> {
        Ok(Self { weight: get(t, &format!("{name}.weight"))?, eps: cfg.rms_norm_eps, style: cfg.norm_style })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Weights are cast where they are used, so a trained f32 master copy stays live.
        rms_norm(x, &cast(&self.weight, x.dtype())?, self.eps, self.style)
    }
}

/// What every layer shares for one forward: the attention layout and cos/sin per rope.
struct Shared {
    layout: Arc<AttnLayout>,
    /// Per `ModelConfig::ropes`: cos and sin [n, 1, rotary_dim] in the compute dtype.
    rope: Vec<(Tensor, Tensor)>,
}

/// The query, key and value projections: separate, or Phi-3's fused `qkv_proj`.
enum Qkv {
    Separate { q_proj: Linear, k_proj: Linear, v_proj: Linear },
    Fused { qkv_proj: Linear },
}

/// `*Attention`.
struct Attention {
    qkv: Qkv,
    o_proj: Linear,
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    qk_norm: QkNorm,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Index into the shared rope tables (None: NoPE).
    rope: Option<usize>,
    opts: AttnOptions,
}

impl Attention {
    fn load(t: &HashMap<String, Tensor>, cfg: &ModelConfig, p: &str, spec: &LayerSpec, opts: &DecoderOptions) -> Result<Self> {
        let lin = |name: &str, bias: bool| Linear::load(t, &format!("{p}.{name}"), bias, opts);
        let qkv = if cfg.fused_projections {
            Qkv::Fused { qkv_proj: lin("qkv_proj", cfg.qkv_bias)? }
        } else {
            Qkv::Separate { q_proj: lin("q_proj", cfg.qkv_bias)?, k_proj: lin("k_proj", cfg.qkv_bias)?, v_proj: lin("v_proj", cfg.qkv_bias)? }
        };
        let norm = |n: &str| -> Result<Option<Norm>> {
            if cfg.qk_norm == QkNorm::None {
                Ok(None)
            } else {
                Norm::load(t, &format!("{p}.{n}"), cfg).map(Some)
            }
        };
        Ok(Self {
            qkv,
            o_proj: lin("o_proj", cfg.o_bias)?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            qk_norm: cfg.qk_norm,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            rope: spec.rope,
            opts: AttnOptions { scale: cfg.attn_scale, softcap: cfg.attn_softcap, window: spec.window },
        })
    }

    /// x: [n, d] -> q [n, nh, hd], k and v [n, nkv, hd], normed and rotated (`rope`: this
    /// layer's cos and sin).
    fn qkv(&self, x: &Tensor, rope_cs: Option<&(Tensor, Tensor)>) -> Result<(Tensor, Tensor, Tensor)> {
        let (n, nh, nkv, hd) = (x.dim(0)?, self.num_heads, self.num_kv_heads, self.head_dim);
        let (q, k, v) = match &self.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => (q_proj.forward(x)?, k_proj.forward(x)?, v_proj.forward(x)?),
            Qkv::Fused { qkv_proj } => {
                let y = qkv_proj.forward(x)?;
                (y.narrow(1, 0, nh * hd)?, y.narrow(1, nh * hd, nkv * hd)?, y.narrow(1, (nh + nkv) * hd, nkv * hd)?)
            }
        };
        let (mut q, mut k) = match (self.qk_norm, &self.q_norm, &self.k_norm) {
            (QkNorm::Whole, Some(qn), Some(kn)) => {
                (qn.forward(&q.contiguous()?)?.reshape((n, nh, hd))?, kn.forward(&k.contiguous()?)?.reshape((n, nkv, hd))?)
            }
            (QkNorm::PerHead, Some(qn), Some(kn)) => (qn.forward(&q.reshape((n, nh, hd))?)?, kn.forward(&k.reshape((n, nkv, hd))?)?),
            _ => (q.reshape((n, nh, hd))?, k.reshape((n, nkv, hd))?),
        };
        if let Some((cos, sin)) = rope_cs {
            q = rope(&q, cos, sin)?;
            k = rope(&k, cos, sin)?;
        }
        Ok((q, k, v.reshape((n, nkv, hd))?))
    }

    /// x: [n, d] -> ([n, d], the keys and values [n, nkv, hd] for a key-value cache)
    fn forward(&self, x: &Tensor, s: &Shared) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.qkv(x, self.rope.map(|r| &s.rope[r]))?;
        let y = attention::attention(&q, &k, &v, &s.layout, self.opts)?;
        let n = x.dim(0)?;
        Ok((self.o_proj.forward(&y.reshape((n, self.num_heads * self.head_dim))?)?, k, v))
    }

    /// One new token for each row of a batch cache, x: [b, d]; its keys and values go to
    /// slot `cache.len` of layer `layer`, and it attends to the row's slots so far.
    fn decode(&self, x: &Tensor, a: &DecodeInputs, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let (b, nh, nkv, hd) = (x.dim(0)?, self.num_heads, self.num_kv_heads, self.head_dim);
        let g = nh / nkv;
        let (q, k, v) = self.qkv(x, self.rope.map(|r| &a.rope[r]))?;
        let q = q.reshape((b, nkv, g, hd))?;
        let t = cache.len + 1;
        cache.k[layer].slice_set(&k.unsqueeze(2)?.contiguous()?, 2, cache.len)?;
        cache.v[layer].slice_set(&v.unsqueeze(2)?.contiguous()?, 2, cache.len)?;
        let keys = cache.k[layer].narrow(2, 0, t)?.contiguous()?; // [b, nkv, t, hd]
        let values = cache.v[layer].narrow(2, 0, t)?.contiguous()?;
        let dtype = q.dtype();
        let mut scores = (super::bf16_gemm::mm(&q, &keys.t()?)?.to_dtype(accum_dtype(dtype))? * self.opts.scale)?; // [b, nkv, g, t]
        if let Some(cap) = self.opts.softcap {
            scores = ((scores / cap)?.tanh()? * cap)?;
        }
        let mask = &a.masks[&self.opts.window]; // [b, 1, 1, t]
        let probs = softmax_last(&scores.broadcast_add(mask)?)?.to_dtype(dtype)?;
        self.o_proj.forward(&super::bf16_gemm::mm(&probs, &values)?.reshape((b, nh * hd))?)
    }

    fn params(&self) -> Vec<&Tensor> {
        let mut out: Vec<&Tensor> = match &self.qkv {
            Qkv::Separate { q_proj, k_proj, v_proj } => q_proj.params().chain(k_proj.params()).chain(v_proj.params()).collect(),
            Qkv::Fused { qkv_proj } => qkv_proj.params().collect(),
        };
        out.extend(self.o_proj.params());
        out.extend(self.q_norm.iter().chain(&self.k_norm).map(|n| &n.weight));
        out
    }
}

/// What every layer's attention shares for one decoding step.
struct DecodeInputs {
    /// Per rope: cos and sin [b, 1, rotary_dim] for the new tokens' positions.
    rope: Vec<(Tensor, Tensor)>,
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

/// The gate and up projections of a gated MLP: separate, or Phi-3's fused `gate_up_proj`
/// (gate rows first).
enum GateUp {
    Separate { gate_proj: Linear, up_proj: Linear },
    Fused { gate_up_proj: Linear },
}

/// `*MLP`: act(gate(x)) ⊙ up(x), projected down.
struct Mlp {
    gate_up: GateUp,
    down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    /// x: [n, d] -> [n, d] (intermediate [n, i])
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => gated_act(&gate_proj.forward(x)?, &up_proj.forward(x)?, self.activation)?,
            GateUp::Fused { gate_up_proj } => {
                let y = gate_up_proj.forward(x)?;
                let i = y.dim(1)? / 2;
                gated_act(&y.narrow(1, 0, i)?, &y.narrow(1, i, i)?, self.activation)?
            }
        };
        self.down_proj.forward(&h)
    }

    fn params(&self) -> Vec<&Tensor> {
        let mut out: Vec<&Tensor> = match &self.gate_up {
            GateUp::Separate { gate_proj, up_proj } => gate_proj.params().chain(up_proj.params()).collect(),
            GateUp::Fused { gate_up_proj } => gate_up_proj.params().collect(),
        };
        out.extend(self.down_proj.params());
        out
    }
}

/// A sparse mixture of experts (`Qwen3MoeSparseMoeBlock`, `MixtralSparseMoeBlock`): the router
/// picks `top_k` experts per token, only those experts run on their tokens (grouped per
/// expert), and their outputs are summed with the routing weights.
struct Moe {
    /// The router, [experts, d].
    gate: Tensor,
    experts: Vec<Mlp>,
    cfg: MoeConfig,
}

/// The experts each token is routed to (not differentiable), [n·k] row by row: the k largest
/// router probabilities of `probs` [n, experts], the lower expert index first among equals.
fn top_k_experts(probs: &Tensor, k: usize) -> Result<Vec<u32>> {
    let host: Vec<Vec<f32>> = probs.detach().to_dtype(DType::F32)?.to_vec2()?;
    let mut chosen = Vec::with_capacity(host.len() * k);
    for row in &host {
        let mut idx: Vec<u32> = (0..row.len() as u32).collect();
        idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        chosen.extend_from_slice(&idx[..k]);
    }
    Ok(chosen)
}

impl Moe {
    /// x: [n, d] -> ([n, d], the router logits [n, experts])
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, d) = x.dims2()?;
        let dtype = x.dtype();
        let acc = accum_dtype(dtype);
        let logits = x.matmul(&cast(&self.gate, dtype)?.t()?)?; // [n, E]
        let probs = softmax_last(&logits.to_dtype(acc)?)?;
        let k = self.cfg.top_k;
        let chosen = top_k_experts(&probs, k)?;
        let mut weights = probs.gather(&Tensor::from_slice(&chosen, (n, k), x.device())?, 1)?; // [n, k]
        if self.cfg.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        // Qwen3-MoE rounds the routing weights to the compute dtype and multiplies there;
        // Mixtral multiplies in f32. Either way the sum over experts accumulates in f32.
        let weights = match self.cfg.names {
            ExpertNames::Qwen => weights.to_dtype(dtype)?,
            ExpertNames::Mixtral => weights,
        }
        .flatten_all()?;
        let mut out = Tensor::zeros((n, d), acc, x.device())?;
        for (e, expert) in self.experts.iter().enumerate() {
            let slots: Vec<u32> = (0..chosen.len() as u32).filter(|&s| chosen[s as usize] == e as u32).collect();
            if slots.is_empty() {
                continue;
            }
            let tokens: Vec<u32> = slots.iter().map(|&s| s / k as u32).collect();
            let (slots, tokens) = (Tensor::from_vec(slots, tokens.len(), x.device())?, Tensor::from_vec(tokens.clone(), tokens.len(), x.device())?);
            let h = expert.forward(&x.index_select(&tokens, 0)?)?; // [m, d]
            let w = weights.index_select(&slots, 0)?.unsqueeze(1)?;
            let y = h.to_dtype(w.dtype())?.broadcast_mul(&w)?.to_dtype(acc)?;
            out = out.index_add(&tokens, &y, 0)?;
        }
        Ok((out.to_dtype(dtype)?, logits))
    }

    fn params(&self) -> Vec<&Tensor> {
        let mut out = vec![&self.gate];
        out.extend(self.experts.iter().flat_map(|e| e.params()));
        out
    }
}

enum Ffn {
    Dense(Mlp),
    Sparse(Moe),
}

/// `*DecoderLayer`: attention and MLP, each residual, with the family's norms around them.
struct DecoderLayer {
    self_attn: Attention,
    mlp: Ffn,
    input_layernorm: Option<Norm>,
    /// Before the MLP (Pre) or after attention (Sandwich, Post).
    post_attention_layernorm: Option<Norm>,
    pre_feedforward_layernorm: Option<Norm>,
    post_feedforward_layernorm: Option<Norm>,
    placement: NormPlacement,
}

/// A layer's output: hidden states, keys and values (for a cache), router logits (MoE).
struct LayerOut {
    x: Tensor,
    k: Tensor,
    v: Tensor,
    router_logits: Option<Tensor>,
}

impl DecoderLayer {
    fn load(t: &HashMap<String, Tensor>, cfg: &ModelConfig, i: usize, opts: &DecoderOptions) -> Result<Self> {
        let p = format!("{}layers.{i}", cfg.prefix);
        let spec = &cfg.layers[i];
        let lin = |name: &str, bias: bool| Linear::load(t, name, bias, opts);
        let mlp = |m: &str, gate: &str, up: &str, down: &str, bias: bool| -> Result<Mlp> {
            let gate_up = if gate == "gate_up_proj" {
                GateUp::Fused { gate_up_proj: lin(&format!("{m}.gate_up_proj"), bias)? }
            } else {
                GateUp::Separate { gate_proj: lin(&format!("{m}.{gate}"), bias)?, up_proj: lin(&format!("{m}.{up}"), bias)? }
            };
            Ok(Mlp { gate_up, down_proj: lin(&format!("{m}.{down}"), bias)?, activation: cfg.activation })
        };
        let ffn = match (&cfg.moe, spec.moe) {
            (Some(moe), true) => {
                let (block, names) = match moe.names {
                    ExpertNames::Mixtral => (format!("{p}.block_sparse_moe"), ["w1", "w3", "w2"]),
                    ExpertNames::Qwen => (format!("{p}.mlp"), ["gate_proj", "up_proj", "down_proj"]),
                };
                let experts = (0..moe.num_experts)
                    .map(|e| mlp(&format!("{block}.experts.{e}"), names[0], names[1], names[2], false))
                    .collect::<Result<Vec<_>>>()?;
                Ffn::Sparse(Moe { gate: get(t, &format!("{block}.gate.weight"))?, experts, cfg: moe.clone() })
            }
            _ if cfg.fused_projections => Ffn::Dense(mlp(&format!("{p}.mlp"), "gate_up_proj", "", "down_proj", cfg.mlp_bias)?),
            _ => Ffn::Dense(mlp(&format!("{p}.mlp"), "gate_proj", "up_proj", "down_proj", cfg.mlp_bias)?),
        };
        let norm = |name: &str| Norm::load(t, &format!("{p}.{name}"), cfg).map(Some);
        let (input, post_attn, pre_ff, post_ff) = match cfg.norm_placement {
            NormPlacement::Pre => (norm("input_layernorm")?, norm("post_attention_layernorm")?, None, None),
            NormPlacement::Sandwich => {
                (norm("input_layernorm")?, norm("post_attention_layernorm")?, norm("pre_feedforward_layernorm")?, norm("post_feedforward_layernorm")?)
            }
            NormPlacement::Post => (None, norm("post_attention_layernorm")?, None, norm("post_feedforward_layernorm")?),
        };
        Ok(Self {
            self_attn: Attention::load(t, cfg, &format!("{p}.self_attn"), spec, opts)?,
            mlp: ffn,
            input_layernorm: input,
            post_attention_layernorm: post_attn,
            pre_feedforward_layernorm: pre_ff,
            post_feedforward_layernorm: post_ff,
            placement: cfg.norm_placement,
        })
    }

    fn apply(norm: &Option<Norm>, x: &Tensor) -> Result<Tensor> {
        match norm {
            Some(n) => n.forward(x),
            None => Ok(x.clone()),
        }
    }

    /// The MLP half: (residual stream after it, router logits).
    fn ffn(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let pre = if self.placement == NormPlacement::Pre { &self.post_attention_layernorm } else { &self.pre_feedforward_layernorm };
        let h = Self::apply(pre, x)?;
        let (y, router) = match &self.mlp {
            Ffn::Dense(m) => (m.forward(&h)?, None),
            Ffn::Sparse(m) => {
                let (y, r) = m.forward(&h)?;
                (y, Some(r))
            }
        };
        Ok(((x + Self::apply(&self.post_feedforward_layernorm, &y)?)?, router))
    }

    /// The attention output after its norm (Sandwich and Post norm it; Pre does not).
    fn attn_out(&self, y: Tensor) -> Result<Tensor> {
        if self.placement == NormPlacement::Pre {
            return Ok(y);
        }
        Self::apply(&self.post_attention_layernorm, &y)
    }

    fn forward(&self, x: &Tensor, s: &Shared) -> Result<LayerOut> {
        let (y, k, v) = self.self_attn.forward(&Self::apply(&self.input_layernorm, x)?, s)?;
        let x = (x + self.attn_out(y)?)?;
        let (x, router_logits) = self.ffn(&x)?;
        Ok(LayerOut { x, k, v, router_logits })
    }

    fn decode(&self, x: &Tensor, a: &DecodeInputs, cache: &mut KvCache, layer: usize) -> Result<Tensor> {
        let y = self.self_attn.decode(&Self::apply(&self.input_layernorm, x)?, a, cache, layer)?;
        let x = (x + self.attn_out(y)?)?;
        Ok(self.ffn(&x)?.0)
    }

    /// Every tensor of the layer (for gradient checkpointing's local backward).
    fn params(&self) -> Vec<&Tensor> {
        let mut out = self.self_attn.params();
        match &self.mlp {
            Ffn::Dense(m) => out.extend(m.params()),
            Ffn::Sparse(m) => out.extend(m.params()),
        }
        let norms = [&self.input_layernorm, &self.post_attention_layernorm, &self.pre_feedforward_layernorm, &self.post_feedforward_layernorm];
        out.extend(norms.into_iter().flatten().map(|n| &n.weight));
        out
    }
}

/// Parameter gradients gradient checkpointing computes in its local backward passes (they
/// never reach the outer autograd graph), by tensor id; the trainer adds them to the outer
/// backward's.
#[derive(Default)]
pub struct GradSink(Mutex<HashMap<TensorId, Tensor>>);

impl GradSink {
    fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let g = match m.remove(&id) {
            Some(old) => (old + g)?,
            None => g,
        };
        m.insert(id, g);
        Ok(())
    }

    /// The gradients collected since the last call.
    pub fn take(&self) -> HashMap<TensorId, Tensor> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// One checkpointed layer: the forward ran detached (nothing of the layer kept but its
/// input); the backward reruns the layer on the saved input with a local graph, runs that
/// graph's backward with the incoming gradient, hands the parameters' gradients to the sink
/// and returns the input's. The layer's output and, for MoE layers, its router logits travel
/// as one tensor [n, d + experts].
struct Checkpoint {
    layer: Held,
    shared: Arc<Shared>,
    sink: Arc<GradSink>,
    /// The adapter dropout's generator state when the layer first ran, so the rerun draws
    /// the same masks.
    dropout_state: Option<(Arc<Mutex<Rng>>, Rng)>,
    out: Tensor,
}

/// A checkpointed layer's weights: held by the decoder, or gathered again for the backward.
enum Held {
    Layer(Arc<DecoderLayer>),
    Gathered { source: Arc<dyn LayerSource>, index: usize, cfg: Arc<ModelConfig>, opts: DecoderOptions },
}

impl Checkpoint {
    fn packed(o: &LayerOut) -> Result<Tensor> {
        Ok(match &o.router_logits {
            Some(r) => Tensor::cat(&[&o.x, &r.to_dtype(o.x.dtype())?], 1)?,
            None => o.x.clone(),
        })
    }

    fn recompute(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        if let Some((rng, state)) = &self.dropout_state {
            *rng.lock().unwrap_or_else(|e| e.into_inner()) = *state;
        }
        let x = Var::from_tensor(&x.detach())?;
        let backward = |layer: &DecoderLayer| -> Result<candle_core::backprop::GradStore> {
            let out = Self::packed(&layer.forward(x.as_tensor(), &self.shared)?)?;
            Ok((out.to_dtype(accum_dtype(out.dtype()))? * grad.detach().to_dtype(accum_dtype(out.dtype()))?)?.sum_all()?.backward()?)
        };
        let grads = match &self.layer {
            Held::Layer(layer) => {
                let grads = backward(layer)?;
                for p in layer.params() {
                    if let Some(g) = grads.get(p) {
                        self.sink.add(p.id(), g.clone())?;
                    }
                }
                grads
            }
            Held::Gathered { source, index, cfg, opts } => {
                // The trained weights become leaves of this local graph; the layer is dropped
                // (its full weights freed) before the gradients go back to the source.
                let mut g = source.gather(*index)?;
                // The backward runs the layers last to first.
                if *index > 0 {
                    source.prefetch(*index - 1)?;
                }
                let mut leaves = Vec::with_capacity(g.trained.len());
                for n in &g.trained {
                    let v = Var::from_tensor(&g.tensors[n])?;
                    g.tensors.insert(n.clone(), v.as_tensor().clone());
                    leaves.push((n.clone(), v));
                }
                let grads = backward(&g.layer(cfg, *index, opts)?)?;
                drop(g);
                let mut out = HashMap::with_capacity(leaves.len());
                for (n, v) in leaves {
                    // An expert no token was routed to gets no gradient: zero.
                    let g = match grads.get(v.as_tensor()) {
                        Some(g) => g.clone(),
                        None => v.as_tensor().zeros_like()?,
                    };
                    out.insert(n, g);
                }
                source.reduce(*index, out)?;
                grads
            }
        };
        Ok(grads.get(x.as_tensor()).context("checkpointed layer: no gradient for its input")?.clone())
    }
}

impl Eager for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn out(&self) -> &Tensor {
        &self.out
    }

    fn backward(&self, x: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        self.recompute(x, grad).map(Some)
    }
}

/// `*ForCausalLM` up to the final norm; the output projection is applied by `logprobs` only
/// at scored positions.
pub struct Decoder {
    pub cfg: ModelConfig,
    /// None under full sharding (gathered for each lookup).
    embed_tokens: Option<Tensor>,
    layers: Vec<Arc<DecoderLayer>>,
    norm: Norm,
    /// `lm_head.weight`; None when tied to the embedding.
    lm_head: Option<Tensor>,
    pub dtype: DType,
    pub device: Device,
    checkpoint: Option<Arc<GradSink>>,
    dropout_rng: Option<Arc<Mutex<Rng>>>,
    /// Under full sharding: where the layers come from, and how to build them.
    source: Option<(Arc<dyn LayerSource>, Arc<ModelConfig>, DecoderOptions)>,
}

/// What a forward returns: final-norm hidden states, every layer's keys and values (to start
/// a cache) and the MoE layers' router logits.
pub struct Forward {
    pub hidden: Tensor,
    pub kv: Vec<(Tensor, Tensor)>,
    pub router_logits: Vec<Tensor>,
}

impl Decoder {
    /// Builds the decoder from HF-named tensors (plain tensors for inference, or the tensors of
    /// `Var`s when training).
    pub fn new(cfg: &ModelConfig, t: &HashMap<String, Tensor>) -> Result<Self> {
        Self::with_options(cfg, t, &DecoderOptions::default())
    }

    /// As `new`, with a compute dtype, LoRA adapters, checkpointing (see [`DecoderOptions`]).
    pub fn with_options(cfg: &ModelConfig, t: &HashMap<String, Tensor>, opts: &DecoderOptions) -> Result<Self> {
        let p = &cfg.prefix;
        let sharded = opts.layers_from.is_some();
        let embed_tokens = if sharded { None } else { Some(get(t, &format!("{p}embed_tokens.weight"))?) };
        let norm = Norm::load(t, &format!("{p}norm"), cfg)?;
        let dtype = opts.compute_dtype.or(embed_tokens.as_ref().map(|e| e.dtype())).unwrap_or(DType::F32);
        let layers = match &opts.layers_from {
            Some(_) => Vec::new(),
            None => (0..cfg.num_hidden_layers).map(|i| DecoderLayer::load(t, cfg, i, opts).map(Arc::new)).collect::<Result<Vec<_>>>()?,
        };
        let layer_opts = DecoderOptions { layers_from: None, checkpoint: None, ..opts.clone() };
        Ok(Self {
            lm_head: if cfg.tie_word_embeddings || opts.without_lm_head || sharded { None } else { Some(get(t, "lm_head.weight")?) },
            dtype,
            device: norm.weight.device().clone(),
            norm,
            embed_tokens,
            layers,
            cfg: cfg.clone(),
            checkpoint: opts.checkpoint.clone(),
            dropout_rng: opts.lora_dropout.as_ref().map(|d| d.rng.clone()),
            source: opts.layers_from.clone().map(|s| (s, Arc::new(cfg.clone()), layer_opts)),
        })
    }

    /// Whether the layers rerun in the backward.
    pub fn checkpointing(&self) -> bool {
        self.checkpoint.is_some() || self.source.is_some()
    }

    /// Turns gradient checkpointing on (where the layers' parameter gradients go) or off.
    pub fn set_checkpoint(&mut self, sink: Option<Arc<GradSink>>) {
        self.checkpoint = sink;
    }

    /// The output projection [vocab, d] (the embedding when tied), as stored: the log-prob
    /// ops take it in the compute dtype or, frozen, in bf16/f16.
    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().or(self.embed_tokens.as_ref()).expect("a decoder that holds its output head (not fully sharded)")
    }

    /// The output head's checkpoint name (the embedding's when tied).
    fn head_name(&self) -> String {
        if self.cfg.tie_word_embeddings {
            format!("{}embed_tokens.weight", self.cfg.prefix)
        } else {
            "lm_head.weight".to_string()
        }
    }

    /// Per-token log-probs (and statistics) of the scored positions of final-norm `hidden`
    /// (see `logprobs::token_logps_stats`); under full sharding through the head gathered for
    /// this pass, and again for its backward.
    pub fn token_logps_stats(&self, hidden: &Tensor, sc: &super::logprobs::Scored, stats: bool) -> Result<(Tensor, super::logprobs::TokenStats)> {
        let softcap = self.cfg.final_softcap;
        let Some((source, ..)) = &self.source else { return super::logprobs::token_logps_stats(hidden, self.lm_head(), sc, softcap, stats) };
        let name = self.head_name();
        let (lp, st) = {
            let w = source.gather_one(&name)?;
            super::logprobs::token_logps_stats(&hidden.detach(), &w, sc, softcap, stats)?
        };
        if !hidden.track_op() {
            return Ok((lp, st));
        }
        let op = HeadPass { source: source.clone(), name, scored: sc.clone(), softcap, out: lp.detach() };
        Ok((hidden.apply_op1(Attached(op))?, st))
    }

    /// cos and sin [n, 1, rotary_dim] of every rope for these positions (f32 math, as HF,
    /// times the rope's attention scaling).
    fn rope_tables(&self, positions: &[u32]) -> Result<Vec<(Tensor, Tensor)>> {
        let seq_len = positions.iter().max().map_or(0, |&p| p as usize + 1);
        let n = positions.len();
        self.cfg
            .ropes
            .iter()
            .map(|r| {
                let inv = r.inv_freq(seq_len);
                let half = inv.len();
                let scale = r.attention_scaling as f32;
                let (mut cos, mut sin) = (Vec::with_capacity(n * 2 * half), Vec::with_capacity(n * 2 * half));
                for &p in positions {
                    for _ in 0..2 {
                        for &f in &inv {
                            let a = p as f32 * f;
                            cos.push(a.cos() * scale);
                            sin.push(a.sin() * scale);
                        }
                    }
                }
                let mk = |v: Vec<f32>| -> Result<Tensor> { Ok(Tensor::from_vec(v, (n, 1, 2 * half), &self.device)?.to_dtype(self.dtype)?) };
                Ok((mk(cos)?, mk(sin)?))
            })
            .collect()
    }

    /// The embeddings of `ids` in the compute dtype (Gemma: × √hidden, the factor rounded to
    /// the compute dtype first, as transformers does).
    fn embed(&self, ids: &[u32]) -> Result<Tensor> {
        let idx = Tensor::from_slice(ids, ids.len(), &self.device)?;
        let x = match (&self.embed_tokens, &self.source) {
            (Some(e), _) => cast(&e.index_select(&idx, 0)?, self.dtype)?,
            (None, Some((source, ..))) => {
                let name = format!("{}embed_tokens.weight", self.cfg.prefix);
                let (rows, vocab) = {
                    let e = source.gather_one(&name)?;
                    (cast(&e.index_select(&idx, 0)?, self.dtype)?, e.dim(0)?)
                };
                if self.checkpoint.is_some() && source.trains(&name) {
                    let leaf = Var::zeros(rows.shape(), rows.dtype(), &self.device)?;
                    leaf.as_tensor().apply_op1(Attached(EmbedLookup { source: source.clone(), name, ids: idx, vocab, out: rows }))?
                } else {
                    rows
                }
            }
            (None, None) => anyhow::bail!("a decoder without its embedding"),
        };
        if !self.cfg.embed_scale {
            return Ok(x);
        }
        let scale = Tensor::new((self.cfg.hidden_size as f32).sqrt(), &self.device)?.to_dtype(self.dtype)?;
        Ok(x.broadcast_mul(&scale)?)
    }

    /// Final-norm hidden states, [n, d] for the layout's n tokens.
    pub fn hidden(&self, layout: &SeqLayout) -> Result<Tensor> {
        Ok(self.forward(layout)?.hidden)
    }

    /// `hidden`, and every layer's keys and values [n, nkv, hd] (after RoPE) to start a cache.
    pub fn hidden_kv(&self, layout: &SeqLayout) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        let f = self.forward(layout)?;
        Ok((f.hidden, f.kv))
    }

    pub fn forward(&self, layout: &SeqLayout) -> Result<Forward> {
        let n = layout.input_ids.len();
        anyhow::ensure!(
            layout.positions.len() == n && layout.blocks.iter().map(|b| b.len).sum::<usize>() == n,
            "layout blocks do not cover its tokens"
        );
        let mut x = self.embed(&layout.input_ids)?; // [n, d]
        let shared = Arc::new(Shared { layout: Arc::new(layout.attn_layout()), rope: self.rope_tables(&layout.positions)? });
        let mut kv = Vec::with_capacity(self.layers.len());
        let mut router_logits = Vec::new();
        for i in 0..self.cfg.num_hidden_layers {
            // Under full sharding the layer is gathered now and dropped once it has run.
            let layer = match &self.source {
                Some((source, cfg, opts)) => {
                    let gathered = source.gather(i)?;
                    // The next layer's weights, or under checkpointing the last layer's for the
                    // backward (which starts there once the head has run).
                    let n = self.cfg.num_hidden_layers;
                    if i + 1 < n || self.checkpoint.is_some() {
                        source.prefetch(if i + 1 < n { i + 1 } else { n - 1 })?;
                    }
                    Arc::new(gathered.layer(cfg, i, opts)?)
                }
                None => self.layers[i].clone(),
            };
            match &self.checkpoint {
                Some(sink) if self.source.is_some() || x.track_op() || layer.params().iter().any(|p| p.track_op()) => {
                    let dropout_state = self.dropout_rng.as_ref().map(|r| (r.clone(), *r.lock().unwrap_or_else(|e| e.into_inner())));
                    let out = {
                        let o = layer.forward(&x.detach(), &shared)?;
                        Checkpoint::packed(&o)?.detach()
                    };
                    let held = match &self.source {
                        Some((source, cfg, opts)) => Held::Gathered { source: source.clone(), index: i, cfg: cfg.clone(), opts: opts.clone() },
                        None => Held::Layer(layer),
                    };
                    let op = Checkpoint { layer: held, shared: shared.clone(), sink: sink.clone(), dropout_state, out };
                    // candle records an op only when its input takes part in autograd; under
                    // LoRA the first layer's input (a frozen embedding) does not, so it becomes a
                    // leaf that does (its gradient is computed and dropped).
                    let input = if x.track_op() { x.clone() } else { Var::from_tensor(&x)?.as_tensor().clone() };
                    let packed = input.apply_op1(Attached(op))?;
                    let d = x.dim(1)?;
                    if packed.dim(1)? > d {
                        router_logits.push(packed.narrow(1, d, packed.dim(1)? - d)?);
                    }
                    x = packed.narrow(1, 0, d)?;
                }
                _ => {
                    let o = layer.forward(&x, &shared)?;
                    kv.push((o.k, o.v));
                    router_logits.extend(o.router_logits);
                    x = o.x;
                }
            }
        }
        Ok(Forward { hidden: self.norm.forward(&x)?, kv, router_logits })
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
        anyhow::ensure!(self.source.is_none(), "a fully sharded decoder does not decode: sample from a saved model");
        let b = ids.len();
        anyhow::ensure!(cache.rows() == b, "one token per cache row");
        let capacity = cache.k.first().map_or(0, |t| t.dim(2).unwrap_or(0));
        anyhow::ensure!(cache.len < capacity, "key-value cache is full ({capacity} slots)");
        let positions: Vec<u32> = cache.pad.iter().map(|&p| (cache.len - p) as u32).collect();
        let mut masks = HashMap::new();
        for l in &self.layers {
            let w = l.self_attn.opts.window;
            if let std::collections::hash_map::Entry::Vacant(e) = masks.entry(w) {
                e.insert(cache.mask(cache.len + 1, w, &self.device, accum_dtype(self.dtype))?);
            }
        }
        let a = DecodeInputs { rope: self.rope_tables(&positions)?, masks };
        let mut x = self.embed(ids)?;
        for (l, layer) in self.layers.iter().enumerate() {
            x = layer.decode(&x, &a, cache, l)?;
        }
        cache.len += 1;
        self.norm.forward(&x)
    }

    /// Next-token logits [b, vocab] (f32, soft-capped where the family caps them) from
    /// final-norm hidden states [b, d].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let w = cast(self.lm_head(), hidden.dtype())?;
        let logits = super::bf16_gemm::mm(hidden, &w.t()?)?.to_dtype(DType::F32)?;
        Ok(match self.cfg.final_softcap {
            Some(cap) => ((logits / cap)?.tanh()? * cap)?,
            None => logits,
        })
    }

    /// MoE layers' load-balancing loss (transformers' `load_balancing_loss_func`) over this
    /// forward's router logits, each token counted with `weights` (see
    /// [`SeqLayout::token_weights`]); None for dense models.
    pub fn aux_loss(&self, router_logits: &[Tensor], weights: &[f32]) -> Result<Option<Tensor>> {
        let Some(moe) = &self.cfg.moe else { return Ok(None) };
        if router_logits.is_empty() {
            return Ok(None);
        }
        let e = moe.num_experts;
        let acc = accum_dtype(router_logits[0].dtype());
        let w = Tensor::from_slice(weights, (weights.len(), 1), &self.device)?.to_dtype(acc)?;
        let rows: f64 = weights.iter().map(|&x| x as f64).sum::<f64>() * router_logits.len() as f64;
        let (mut tokens, mut probs) = (vec![0f64; e], Tensor::zeros(e, acc, &self.device)?);
        for logits in router_logits {
            let p = softmax_last(&logits.to_dtype(acc)?)?; // [n, E]
            for (row, &wt) in top_k_experts(&p, moe.top_k)?.chunks(moe.top_k).zip(weights) {
                for &x in row {
                    tokens[x as usize] += wt as f64;
                }
            }
            probs = (probs + p.broadcast_mul(&w)?.sum(0)?)?;
        }
        let tokens = Tensor::from_vec(tokens.iter().map(|t| t / rows).collect::<Vec<f64>>(), e, &self.device)?.to_dtype(acc)?;
        Ok(Some(((tokens * (probs / rows)?)?.sum_all()? * e as f64)?))
    }
}
