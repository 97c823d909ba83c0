//! Safetensors in HF layout: single `model.safetensors` or sharded with
//! `model.safetensors.index.json`; any stored dtype, converted to the compute dtype.
use super::config::ModelConfig;
use anyhow::{bail, Context, Result};
use candle_core::{safetensors::MmapedSafetensors, DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The safetensors files of a model directory, in a stable order.
pub fn weight_files(model_dir: &Path) -> Result<Vec<PathBuf>> {
    let index = model_dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&index)?).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v["weight_map"].as_object().with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| model_dir.join(f)).collect());
    }
    let single = model_dir.join("model.safetensors");
    if !single.exists() {
        bail!("{}: no model.safetensors or model.safetensors.index.json", model_dir.display());
    }
    Ok(vec![single])
}

/// blake3 over the tensors' names, dtypes, shapes and bytes: the same weights stored sharded
/// or not hash alike only if their bytes do, so a dtype change is a new fingerprint.
pub fn weights_hash(model_dir: &Path) -> Result<String> {
    let mut h = blake3::Hasher::new();
    for f in weight_files(model_dir)? {
        h.update(super::super::store::file_hash(&f)?.blake3.as_bytes());
    }
    Ok(h.finalize().to_hex().to_string())
}

/// Every tensor name the decoder needs for this config, in HF naming.
pub fn tensor_names(cfg: &ModelConfig) -> Vec<String> {
    let mut names = vec!["model.embed_tokens.weight".to_string(), "model.norm.weight".to_string()];
    if !cfg.tie_word_embeddings {
        names.push("lm_head.weight".into());
    }
    for i in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{i}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("{p}.self_attn.{proj}.weight"));
            let bias = if proj == "o_proj" { cfg.o_bias } else { cfg.qkv_bias };
            if bias {
                names.push(format!("{p}.self_attn.{proj}.bias"));
            }
        }
        for proj in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("{p}.mlp.{proj}.weight"));
            if cfg.mlp_bias {
                names.push(format!("{p}.mlp.{proj}.bias"));
            }
        }
        names.push(format!("{p}.input_layernorm.weight"));
        names.push(format!("{p}.post_attention_layernorm.weight"));
    }
    names
}

/// Loads the decoder's tensors, converted to `dtype`. A missing tensor is an error naming it.
pub fn load_weights(model_dir: &Path, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_named(model_dir, &tensor_names(cfg), dtype, device)
}

/// Loads these tensors, converted to `dtype`. A missing tensor is an error naming it.
pub fn load_named(model_dir: &Path, names: &[String], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let files = weight_files(model_dir)?;
    // SAFETY: weights are read-only inputs; we do not expect them to change while mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }.with_context(|| format!("{}: cannot read safetensors", model_dir.display()))?;
    let mut out = HashMap::new();
    for name in names {
        let t =
            st.load(name, device).map_err(|_| anyhow::anyhow!("{}: tensor `{name}` is missing from the safetensors files", model_dir.display()))?;
        out.insert(name.clone(), t.to_dtype(dtype)?);
    }
    Ok(out)
}

/// Saves tensors as one `model.safetensors` with `{"format": "pt"}` metadata (what
/// transformers expects), in the given dtype.
pub fn save_weights(path: &Path, tensors: &BTreeMap<String, Tensor>, dtype: DType) -> Result<()> {
    let converted: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?.contiguous()?))).collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // Streamed to the partial file (no second copy of the weights in memory), then renamed.
    let partial = crate::store::atomic::partial_path(path);
    safetensors::serialize_to_file(converted.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), &partial)?;
    std::fs::File::open(&partial)?.sync_all()?;
    crate::store::atomic::rename_durable(&partial, path)
}

pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("unsupported dtype `{other}` (use f32, bf16 or f16)"),
    })
}
