//! The decoder of every supported family (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral, Gemma 2/3,
//! Phi-3, OLMo 2, SmolLM3: one row each in `config`), built from differentiable candle ops so
//! the same code computes the reference log-probs (cache-ref), trains the policy and samples:
//! `config` and `weights` (HF files in), `ops` and `fused` (norms, softmax, RoPE, activations,
//! log-probs; CPU kernels with backwards and composite twins), `bf16_gemm` (the AVX-512 BF16
//! kernel under every bf16 matmul on the CPU), `quant` (bitsandbytes 4-bit weights), `attention`, `decoder`,
//! `logprobs`, `lora` (PEFT adapters), `reward` (sequence-classification heads); and the device.
pub mod attention;
pub mod bf16_gemm;
pub mod config;
pub mod decoder;
pub mod fused;
pub mod logprobs;
pub mod lora;
pub mod ops;
pub mod quant;
pub mod reward;
pub mod weights;

pub use config::ModelConfig;
pub use decoder::Decoder;

use anyhow::Result;
use candle_core::{DType, Device};
use std::path::Path;

/// The device the stages compute on, set once from `--device` (default: the first CUDA GPU
/// in a `--features cuda` build, else the CPU).
static DEVICE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Chooses the device for this process: `cpu`, `cuda` or `cuda:N`. Checked when a stage
/// first asks for it.
pub fn set_device(spec: &str) {
    let _ = DEVICE.set(spec.to_string());
}

pub fn device() -> Result<Device> {
    match DEVICE.get() {
        Some(spec) => parse_device(spec),
        // A CUDA build: the GPU of this rank's local rank (one rank per GPU under mpirun/srun).
        None if cfg!(feature = "cuda") => parse_device(&format!("cuda:{}", local_rank())),
        None => parse_device("cpu"),
    }
}

/// This process's index among the ranks on its node (0 outside a launcher).
fn local_rank() -> usize {
    ["OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "SLURM_LOCALID", "LOCAL_RANK"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse().ok())
        .unwrap_or(0)
}

/// `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn parse_device(spec: &str) -> Result<Device> {
    let ordinal = match spec {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        s => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => anyhow::bail!("--device {spec}: expected cpu, cuda or cuda:N"),
        },
    };
    if !cfg!(feature = "cuda") {
        anyhow::bail!("--device {spec}: this binary was built without CUDA (build one with scripts/build-cuda.sh)");
    }
    Ok(Device::new_cuda(ordinal)?)
}

/// Loads an HF model directory into the decoder (inference: plain tensors, no autograd); a
/// bitsandbytes 4-bit checkpoint as it is, or quantized on load when `quant` asks.
pub fn load_decoder(model_dir: &Path, dtype: DType, quant: Option<&quant::QuantSpec>, device: &Device) -> Result<Decoder> {
    let cfg = ModelConfig::load(model_dir)?;
    // A 4-bit base's other tensors (embedding, output head, norms) stay in the checkpoint's
    // 16-bit dtype under f32 math: widened where they are used they give the same values, and
    // in f32 they would be 4 GB more at Llama 3's vocabulary.
    let four_bit = quant.is_some() || cfg.raw.get("quantization_config").is_some();
    let stored = cfg.dtype.as_deref().and_then(|d| serde_json::from_value::<weights::FloatDtype>(d.into()).ok()).map(weights::FloatDtype::dtype);
    let held = match stored {
        Some(s @ (DType::BF16 | DType::F16)) if four_bit && dtype == DType::F32 => s,
        _ => dtype,
    };
    let w = weights::load_model(model_dir, &cfg, held, device, quant)?;
    Decoder::with_options(&cfg, &w.tensors, &decoder::DecoderOptions { quantized: w.quant, compute_dtype: Some(dtype), ..Default::default() })
}
