//! The Llama/Qwen2/Mistral decoder family, built from differentiable candle ops so the same
//! code computes the reference log-probs (cache-ref) and trains the policy.
pub mod config;
pub mod decoder;
pub mod fused;
pub mod logprobs;
pub mod lora;
pub mod weights;

pub use config::ModelConfig;
pub use decoder::Decoder;

use anyhow::Result;
use candle_core::{DType, Device};
use std::path::Path;

/// The device tensors live on: the first CUDA GPU when built with `--features cuda`, else CPU.
pub fn device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::new_cuda(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// Loads an HF model directory into the decoder (inference: plain tensors, no autograd).
pub fn load_decoder(model_dir: &Path, dtype: DType, device: &Device) -> Result<Decoder> {
    let cfg = ModelConfig::load(model_dir)?;
    let tensors = weights::load_weights(model_dir, &cfg, dtype, device)?;
    Decoder::new(&cfg, &tensors)
}
