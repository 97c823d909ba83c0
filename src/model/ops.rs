//! The decoder's elementwise and normalising ops, each with a fused CPU kernel (f32/f64, own
//! backward, in `fused`) and a composite twin from candle's differentiable ops that runs on any
//! device and dtype (GPUs, bf16) and is the kernels' test reference: RMSNorm in the families'
//! styles, softmax, RoPE, gated activations; and the accumulation dtype they share. Below the
//! attention, the log-prob head and the decoder, as `candle_nn::ops` is below its models.
use super::config::{Activation, NormStyle};
use super::fused;
use anyhow::Result;
use candle_core::{DType, Tensor, D};

/// Accumulation dtype: f32 for f32/bf16/f16 (as transformers), f64 stays f64 (for gradient checks).
pub fn accum_dtype(d: DType) -> DType {
    if d == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// RMSNorm over the last dim: the fused CPU op for f32/f64, else composite ops.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64, style: NormStyle) -> Result<Tensor> {
    if fused::applies_with_bf16(x) && x.dtype() == w.dtype() {
        let op = fused::RmsNorm { eps, plus_one: style == NormStyle::OnePlusWeight, round_first: style == NormStyle::Weight };
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, op)?);
    }
    rms_norm_composite(x, w, eps, style)
}

/// RMSNorm in f32 as transformers computes it: Llama casts the normalised value to the compute
/// dtype, then scales by w; Gemma scales by (1 + w) in f32 and casts; OLMo 2 scales by w in f32.
pub fn rms_norm_composite(x: &Tensor, w: &Tensor, eps: f64, style: NormStyle) -> Result<Tensor> {
    let dtype = x.dtype();
    let acc = accum_dtype(dtype);
    let x32 = x.to_dtype(acc)?;
    let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    Ok(match style {
        NormStyle::Weight => normed.to_dtype(dtype)?.broadcast_mul(w)?,
        NormStyle::OnePlusWeight => normed.broadcast_mul(&(w.to_dtype(acc)? + 1.0)?)?.to_dtype(dtype)?,
        NormStyle::WeightThenCast => normed.broadcast_mul(&w.to_dtype(acc)?)?.to_dtype(dtype)?,
    })
}

/// Softmax over the last dim, differentiable: the fused CPU op, else composite ops.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fused::applies_with_bf16(x) {
        return Ok(x.contiguous()?.apply_op1(fused::SoftmaxLast)?);
    }
    softmax_last_composite(x)
}

/// Softmax from candle's differentiable ops; the max shift is a constant for autograd.
pub fn softmax_last_composite(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// Rotary embedding of x [n, heads, hd] with cos, sin [n, 1, rotary_dim] (the first
/// `rotary_dim` dims of each head rotate, the rest pass through: Phi-3's partial rotary).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (hd, rd) = (x.dim(D::Minus1)?, cos.dim(D::Minus1)?);
    if rd < hd {
        let rot = rope(&x.narrow(D::Minus1, 0, rd)?.contiguous()?, cos, sin)?;
        return Ok(Tensor::cat(&[&rot, &x.narrow(D::Minus1, rd, hd - rd)?], D::Minus1)?);
    }
    if fused::applies_with_bf16(x) && cos.dtype() == x.dtype() {
        return Ok(x.contiguous()?.apply_op3(cos, sin, fused::Rope)?);
    }
    rope_composite(x, cos, sin)
}

/// x·cos + rotate_half(x)·sin, as transformers' apply_rotary_pos_emb.
pub fn rope_composite(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    Ok((x.broadcast_mul(cos)? + rotate_half(x)?.broadcast_mul(sin)?)?)
}

fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// act(gate) ⊙ up: the fused CPU op for f32/f64, else composite ops.
pub fn gated_act(gate: &Tensor, up: &Tensor, activation: Activation) -> Result<Tensor> {
    let gelu_tanh = activation == Activation::GeluTanh;
    if fused::applies_with_bf16(gate) {
        return Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, fused::GatedAct { gelu_tanh })?);
    }
    let a = if gelu_tanh { gelu_tanh_composite(gate)? } else { gate.silu()? };
    Ok((a * up)?)
}

/// `gelu_pytorch_tanh` from differentiable ops: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
/// (candle's own `gelu` backward rounds its constants to six digits.)
pub fn gelu_tanh_composite(x: &Tensor) -> Result<Tensor> {
    let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * (2.0 / std::f64::consts::PI).sqrt())?;
    Ok(((x * 0.5)? * (inner.tanh()? + 1.0)?)?)
}
