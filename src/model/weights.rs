//! Safetensors in HF layout: single `model.safetensors` or sharded with
//! `model.safetensors.index.json`; any stored dtype, converted to the compute dtype.
use super::config::ModelConfig;
use super::quant::{Quant4, QuantSpec, QuantWeights};
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

/// Every tensor the decoder needs for this config, in the checkpoint's naming, with its shape.
pub fn tensor_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    use super::config::{ExpertNames, NormPlacement, QkNorm};
    let (h, hd, p) = (cfg.hidden_size, cfg.head_dim, cfg.prefix.as_str());
    let (q, kv) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
    let mut out: Vec<(String, Vec<usize>)> = vec![(format!("{p}embed_tokens.weight"), vec![cfg.vocab_size, h]), (format!("{p}norm.weight"), vec![h])];
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    let linear = |out: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, i: usize, bias: bool| {
        if bias {
            out.push((format!("{name}.bias"), vec![o]));
        }
        out.push((format!("{name}.weight"), vec![o, i]));
    };
    for (l, spec) in cfg.layers.iter().enumerate() {
        let a = format!("{p}layers.{l}.self_attn");
        if cfg.fused_projections {
            linear(&mut out, format!("{a}.qkv_proj"), q + 2 * kv, h, cfg.qkv_bias);
        } else {
            linear(&mut out, format!("{a}.q_proj"), q, h, cfg.qkv_bias);
            linear(&mut out, format!("{a}.k_proj"), kv, h, cfg.qkv_bias);
            linear(&mut out, format!("{a}.v_proj"), kv, h, cfg.qkv_bias);
        }
        linear(&mut out, format!("{a}.o_proj"), h, q, cfg.o_bias);
        match cfg.qk_norm {
            QkNorm::None => {}
            QkNorm::PerHead => out.extend([(format!("{a}.q_norm.weight"), vec![hd]), (format!("{a}.k_norm.weight"), vec![hd])]),
            QkNorm::Whole => out.extend([(format!("{a}.q_norm.weight"), vec![q]), (format!("{a}.k_norm.weight"), vec![kv])]),
        }
        let m = format!("{p}layers.{l}.mlp");
        match (&cfg.moe, spec.moe) {
            (Some(moe), true) => {
                let (e, im) = (moe.num_experts, moe.intermediate_size);
                let (block, [gate, up, down]) = match moe.names {
                    ExpertNames::Mixtral => (format!("{p}layers.{l}.block_sparse_moe"), ["w1", "w3", "w2"]),
                    ExpertNames::Qwen => (m.clone(), ["gate_proj", "up_proj", "down_proj"]),
                };
                out.push((format!("{block}.gate.weight"), vec![e, h]));
                for x in 0..e {
                    linear(&mut out, format!("{block}.experts.{x}.{gate}"), im, h, false);
                    linear(&mut out, format!("{block}.experts.{x}.{up}"), im, h, false);
                    linear(&mut out, format!("{block}.experts.{x}.{down}"), h, im, false);
                }
            }
            _ => {
                let i = cfg.intermediate_size;
                if cfg.fused_projections {
                    linear(&mut out, format!("{m}.gate_up_proj"), 2 * i, h, cfg.mlp_bias);
                } else {
                    linear(&mut out, format!("{m}.gate_proj"), i, h, cfg.mlp_bias);
                    linear(&mut out, format!("{m}.up_proj"), i, h, cfg.mlp_bias);
                }
                linear(&mut out, format!("{m}.down_proj"), h, i, cfg.mlp_bias);
            }
        }
        let norms: &[&str] = match cfg.norm_placement {
            NormPlacement::Pre => &["input_layernorm", "post_attention_layernorm"],
            NormPlacement::Sandwich => &["input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"],
            NormPlacement::Post => &["post_attention_layernorm", "post_feedforward_layernorm"],
        };
        out.extend(norms.iter().map(|n| (format!("{p}layers.{l}.{n}.weight"), vec![h])));
    }
    out
}

/// Every tensor name the decoder needs for this config, in the checkpoint's naming.
pub fn tensor_names(cfg: &ModelConfig) -> Vec<String> {
    tensor_shapes(cfg).into_iter().map(|(n, _)| n).collect()
}

/// Loads the decoder's tensors, converted to `dtype`. A missing tensor is an error naming it.
pub fn load_weights(model_dir: &Path, cfg: &ModelConfig, dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    load_named(model_dir, &tensor_names(cfg), dtype, device)
}

/// Loads these tensors, converted to `dtype`. A missing tensor is an error naming it.
pub fn load_named(model_dir: &Path, names: &[String], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    load_each(model_dir, names, dtype, device, |name, t| {
        out.insert(name.to_string(), t);
        Ok(())
    })?;
    Ok(out)
}

/// Hands each of these tensors, converted to `dtype`, to `f` in turn, its file pages released
/// after: memory holds what `f` keeps (a rank's shard, under full sharding), not the model.
pub fn load_each(model_dir: &Path, names: &[String], dtype: DType, device: &Device, mut f: impl FnMut(&str, Tensor) -> Result<()>) -> Result<()> {
    let files = weight_files(model_dir)?;
    // SAFETY: weights are read-only inputs; we do not expect them to change while mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }.with_context(|| format!("{}: cannot read safetensors", model_dir.display()))?;
    for name in names {
        let t =
            st.load(name, device).map_err(|_| anyhow::anyhow!("{}: tensor `{name}` is missing from the safetensors files", model_dir.display()))?;
        f(name, t.to_dtype(dtype)?)?;
        release(&st, name);
    }
    Ok(())
}

/// Drops tensor `name`'s pages of the mapped weight files from this process once it has been
/// copied out (the page cache keeps them): otherwise the whole file counts in the resident set
/// beside the copies made from it, 16 GB more at 8B in bf16.
pub(crate) fn release(st: &MmapedSafetensors, name: &str) {
    let Ok(view) = st.get(name) else { return };
    let data = view.data();
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
    let (a, b) = (data.as_ptr() as usize, data.as_ptr() as usize + data.len());
    let (start, end) = (a.div_ceil(page) * page, b / page * page);
    if end > start {
        // SAFETY: the range lies inside a read-only file mapping: MADV_DONTNEED only drops its
        // page-table entries, and a later read faults the same bytes back in from the file.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// Saves tensors as one `model.safetensors` with `{"format": "pt"}` metadata (what
/// transformers expects), in the given dtype.
pub fn save_weights(path: &Path, tensors: &BTreeMap<String, Tensor>, dtype: DType) -> Result<()> {
    let converted: Vec<(String, Tensor)> = tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?.contiguous()?))).collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // Streamed to the partial file (no second copy of the weights in memory), then renamed.
    let file = crate::store::PartialFile::create(path)?;
    safetensors::serialize_to_file(converted.iter().map(|(k, t)| (k.as_str(), t)), Some(meta), file.partial())
        .map_err(|e| crate::store::space::write_error(file.partial(), e))?;
    file.commit()
}

/// Saves tensors whose bytes come when the writer asks for them (`View`s), as `save_weights`'s
/// file: memory holds one tensor at a time.
pub fn save_views<V: safetensors::View>(path: &Path, views: Vec<(String, V)>) -> Result<()> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let file = crate::store::PartialFile::create(path)?;
    safetensors::serialize_to_file(views, Some(meta), file.partial()).map_err(|e| crate::store::space::write_error(file.partial(), e))?;
    file.commit()
}

/// A floating-point dtype as users name it (`--dtype`, `--base-dtype`; torch's names too).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FloatDtype {
    #[value(alias = "float32")]
    #[serde(alias = "float32")]
    F32,
    #[value(alias = "bfloat16")]
    #[serde(alias = "bfloat16")]
    Bf16,
    #[value(alias = "float16")]
    #[serde(alias = "float16")]
    F16,
}

impl FloatDtype {
    pub fn dtype(self) -> DType {
        match self {
            FloatDtype::F32 => DType::F32,
            FloatDtype::Bf16 => DType::BF16,
            FloatDtype::F16 => DType::F16,
        }
    }
}

/// A model's tensors as the decoder takes them: full-precision ones by name, and the 4-bit
/// linear weights (a pre-quantized checkpoint's, or quantized on load) by name.
pub struct ModelWeights {
    pub tensors: HashMap<String, Tensor>,
    pub quant: Option<std::sync::Arc<QuantWeights>>,
    /// How the 4-bit weights are quantized (None: none are).
    pub spec: Option<QuantSpec>,
}

/// Loads the decoder's tensors: a bitsandbytes 4-bit checkpoint as it is (its
/// `quantization_config`), else full precision converted to `dtype`, with the linear layers
/// transformers would quantize quantized here when `request` (`--load-in-4bit`) asks.
pub fn load_model(model_dir: &Path, cfg: &ModelConfig, dtype: DType, device: &Device, request: Option<&QuantSpec>) -> Result<ModelWeights> {
    load_model_named(model_dir, cfg, &tensor_names(cfg), dtype, device, request)
}

/// As `load_model`, for these tensors (a reward model's, say).
pub fn load_model_named(
    model_dir: &Path,
    cfg: &ModelConfig,
    names: &[String],
    dtype: DType,
    device: &Device,
    request: Option<&QuantSpec>,
) -> Result<ModelWeights> {
    let config = model_dir.join("config.json");
    let published = QuantSpec::from_config(&cfg.raw, &config)?;
    if let (Some(p), Some(r)) = (&published, request) {
        if p.quant_type != r.quant_type || p.double_quant != r.double_quant {
            bail!(
                "{}: the checkpoint is already quantized ({}, double quantization {}) but the flags ask for {} with double quantization {}: \
                 drop --load-in-4bit's settings or load the full-precision model",
                config.display(),
                p.quant_type.name(),
                p.double_quant,
                r.quant_type.name(),
                r.double_quant
            );
        }
    }
    let Some(spec) = published.clone().or_else(|| request.cloned()) else {
        return Ok(ModelWeights { tensors: load_named(model_dir, names, dtype, device)?, quant: None, spec: None });
    };
    let files = weight_files(model_dir)?;
    // SAFETY: weights are read-only inputs; we do not expect them to change while mapped.
    let st = unsafe { MmapedSafetensors::multi(&files) }.with_context(|| format!("{}: cannot read safetensors", model_dir.display()))?;
    let mut tensors = HashMap::new();
    let mut quant = QuantWeights::new();
    for name in names.iter().cloned() {
        let loaded = Quant4::load(&st, &name, model_dir)?;
        let mut q = match loaded {
            Some(q) => q,
            None if published.is_none() && spec.quantizes(&name) => {
                let t = st
                    .load(&name, &Device::Cpu)
                    .map_err(|_| anyhow::anyhow!("{}: tensor `{name}` is missing from the safetensors files", model_dir.display()))?;
                let (rows, cols) = t.dims2()?;
                Quant4::quantize(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, rows, cols, &spec)
            }
            None => {
                let t = st
                    .load(&name, device)
                    .map_err(|_| anyhow::anyhow!("{}: tensor `{name}` is missing from the safetensors files", model_dir.display()))?;
                tensors.insert(name.clone(), t.to_dtype(dtype)?);
                release(&st, &name);
                continue;
            }
        };
        release(&st, &name);
        q.place(device)?;
        quant.insert(name, std::sync::Arc::new(q));
    }
    Ok(ModelWeights { tensors, quant: Some(std::sync::Arc::new(quant)), spec: Some(spec) })
}

impl ModelWeights {
    /// Every weight in full precision (`dtype`): the 4-bit ones dequantized (merging, saving).
    pub fn dequantized(mut self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let device = self.tensors.values().next().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        for (name, q) in self.quant.iter().flat_map(|q| q.iter()) {
            self.tensors.insert(name.clone(), q.to_tensor(dtype, &device)?);
        }
        Ok(self.tensors)
    }

    /// Bytes the weights hold (4-bit ones packed).
    pub fn bytes(&self) -> usize {
        self.tensors.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum::<usize>()
            + self.quant.iter().flat_map(|q| q.values()).map(|q| q.bytes()).sum::<usize>()
    }
}
