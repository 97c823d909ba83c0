//! LoRA adapters with PEFT 0.21's semantics and files: y = W x + (α/r) · B (A (dropout(x))),
//! A [r, in] Kaiming-uniform (a = √5), B [out, r] zero; `adapter_config.json` +
//! `adapter_model.safetensors` with keys `base_model.model.<module>.lora_{A,B}.weight`.
//! In memory the adapter tensors are named `<module>.lora_A.weight` beside the base weights,
//! which is how the decoder finds them.
use super::ModelConfig;
use crate::rng::Rng;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The linear modules of a decoder layer, as PEFT names them (`all-linear` = all of them; the
/// output head is never a target); Phi-3 fuses them into `qkv_proj` and `gate_up_proj`.
pub const LINEAR_MODULES: [&str; 9] = ["q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj", "down_proj"];

/// The linear modules a family's decoder layer has (what `all-linear` means for it).
pub fn family_modules(cfg: &ModelConfig) -> &'static [&'static str] {
    if cfg.fused_projections {
        &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    } else {
        &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    }
}

/// Whether a `target_modules` entry selects the module at `path`, as PEFT matches them: the
/// entry is the module's name (`q_proj`, every layer's) or a whole path's tail
/// (`model.layers.1.mlp.gate_up_proj`, one layer's: PEFT writes those for some families).
fn targets(entry: &str, path: &str) -> bool {
    path == entry || path.strip_suffix(entry).is_some_and(|head| head.ends_with('.'))
}

/// The module name an entry ends with (`q_proj` of `model.layers.0.self_attn.q_proj`).
fn module_name(entry: &str) -> &str {
    entry.rsplit('.').next().unwrap_or(entry)
}

/// `target_modules` for `all-linear` before it meets a model (resolved by [`LoraConfig::resolve`]).
const ALL_LINEAR: &str = "all-linear";
const PEFT_PREFIX: &str = "base_model.model.";

/// A module's key in PEFT's files: `base_model.model.` + its path in transformers' model
/// (Gemma 3's multimodal text tower is `model.language_model.` there, `language_model.model.` on disk).
fn peft_key(module: &str) -> String {
    match module.strip_prefix("language_model.model.") {
        Some(rest) => format!("{PEFT_PREFIX}model.language_model.{rest}"),
        None => format!("{PEFT_PREFIX}{module}"),
    }
}

/// The adapter's settings, as `adapter_config.json` holds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub lora_dropout: f64,
}

impl LoraConfig {
    /// `targets`: module names separated by commas, or `all-linear` (every linear layer of the
    /// model's family but the head, resolved against the model by [`LoraConfig::resolve`]).
    pub fn new(r: usize, lora_alpha: f64, targets: &str, lora_dropout: f64) -> Result<Self> {
        let target_modules: Vec<String> = if targets.trim() == ALL_LINEAR {
            vec![ALL_LINEAR.to_string()]
        } else {
            targets.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
        };
        let me = Self { r, lora_alpha, target_modules, lora_dropout };
        me.check()?;
        Ok(me)
    }

    fn check(&self) -> Result<()> {
        if self.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bail!("lora_alpha must be a positive number, got {}", self.lora_alpha);
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bail!("lora_dropout must be in [0, 1), got {}", self.lora_dropout);
        }
        if self.target_modules.is_empty() {
            bail!("LoRA needs at least one target module ({} or all-linear)", LINEAR_MODULES.join(", "));
        }
        if let Some(bad) = self.target_modules.iter().find(|m| !LINEAR_MODULES.contains(&module_name(m)) && *m != ALL_LINEAR) {
            bail!("unknown LoRA target module `{bad}`: use {} or all-linear", LINEAR_MODULES.join(", "));
        }
        Ok(())
    }

    /// The targets for this model: `all-linear` becomes the family's linear modules (as PEFT
    /// writes them into adapter_config.json); a module the family does not have is an error.
    pub fn resolve(mut self, cfg: &ModelConfig) -> Result<Self> {
        let have = family_modules(cfg);
        if self.target_modules.iter().any(|m| m == ALL_LINEAR) {
            if cfg.moe.is_some() {
                bail!(
                    "--lora-targets all-linear on a mixture-of-experts model: PEFT then adapts the experts and the router as 3-D \
                     parameters (`target_parameters`, rank 2r on gate_up_proj), which this tool does not train; adapt the attention \
                     with --lora-targets q_proj,k_proj,v_proj,o_proj (and the dense layers' gate_proj,up_proj,down_proj)"
                );
            }
            self.target_modules = have.iter().map(|s| s.to_string()).collect();
        }
        if let Some(bad) = self.target_modules.iter().find(|m| !have.contains(&module_name(m))) {
            bail!("LoRA target `{bad}`: a {} layer has no such module (it has {})", cfg.model_type, have.join(", "));
        }
        let paths = self.modules(cfg);
        if let Some(bad) = self.target_modules.iter().find(|t| !paths.iter().any(|(p, _, _)| targets(t, p))) {
            bail!("LoRA target `{bad}` matches no module of this {} model", cfg.model_type);
        }
        Ok(self)
    }

    /// α / r, the factor on B A x.
    pub fn scale(&self) -> f64 {
        self.lora_alpha / self.r as f64
    }

    /// Every adapted module's path (`model.layers.3.self_attn.q_proj`) with its (in, out) sizes;
    /// MLP modules only in dense layers (an MoE layer's experts are not nn.Linear modules).
    pub fn modules(&self, cfg: &ModelConfig) -> Vec<(String, usize, usize)> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let mut out = Vec::new();
        for (l, spec) in cfg.layers.iter().enumerate() {
            for m in family_modules(cfg) {
                let (group, fan_in, fan_out) = match *m {
                    "q_proj" => ("self_attn", h, q),
                    "k_proj" | "v_proj" => ("self_attn", h, kv),
                    "qkv_proj" => ("self_attn", h, q + 2 * kv),
                    "o_proj" => ("self_attn", q, h),
                    "gate_proj" | "up_proj" => ("mlp", h, i),
                    "gate_up_proj" => ("mlp", h, 2 * i),
                    _ => ("mlp", i, h),
                };
                let path = format!("{}layers.{l}.{group}.{m}", cfg.prefix);
                if (group == "mlp" && spec.moe) || !self.target_modules.iter().any(|t| targets(t, &path)) {
                    continue;
                }
                out.push((path, fan_in, fan_out));
            }
        }
        out
    }

    /// A fresh adapter as PEFT initialises one: A ~ U(−1/√in, 1/√in) (Kaiming-uniform with
    /// a = √5), B = 0, so the adapted model starts equal to the base.
    pub fn init(&self, cfg: &ModelConfig, seed: u64, device: &Device) -> Result<BTreeMap<String, Tensor>> {
        let mut rng = Rng::new(seed ^ 0x10_7A);
        let mut out = BTreeMap::new();
        for (m, fan_in, fan_out) in self.modules(cfg) {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let a: Vec<f32> = (0..self.r * fan_in).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
            out.insert(format!("{m}.lora_A.weight"), Tensor::from_vec(a, (self.r, fan_in), device)?);
            out.insert(format!("{m}.lora_B.weight"), Tensor::zeros((fan_out, self.r), DType::F32, device)?);
        }
        Ok(out)
    }
}

/// Reads a PEFT LoRA adapter directory: its config and tensors (f32, in-memory names), checked
/// against the model's shapes.
pub fn load(dir: &Path, cfg: &ModelConfig, device: &Device) -> Result<(LoraConfig, BTreeMap<String, Tensor>)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let raw: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg_path).with_context(|| format!("cannot read {}", cfg_path.display()))?)
            .with_context(|| format!("{}: invalid JSON", cfg_path.display()))?;
    if raw.get("peft_type").and_then(|v| v.as_str()) != Some("LORA") {
        bail!("{}: not a LoRA adapter (peft_type {})", cfg_path.display(), raw.get("peft_type").unwrap_or(&serde_json::Value::Null));
    }
    for (key, plain) in [("use_dora", false), ("use_rslora", false)] {
        if raw.get(key).and_then(|v| v.as_bool()).unwrap_or(plain) != plain {
            bail!("{}: `{key}` adapters are not supported", cfg_path.display());
        }
    }
    if raw.get("bias").and_then(|v| v.as_str()).is_some_and(|b| b != "none") {
        bail!("{}: adapters that train biases (bias != \"none\") are not supported", cfg_path.display());
    }
    let mut lc: LoraConfig = serde_json::from_value(raw.clone()).with_context(|| format!("{}: not a LoRA config", cfg_path.display()))?;
    if let Some(s) = raw.get("target_modules").and_then(|v| v.as_str()) {
        lc = LoraConfig::new(lc.r, lc.lora_alpha, s, lc.lora_dropout)?;
    }
    lc.check().with_context(|| cfg_path.display().to_string())?;
    let lc = lc.resolve(cfg).with_context(|| cfg_path.display().to_string())?;
    let path = dir.join(WEIGHTS_FILE);
    // SAFETY: adapter files are read-only inputs, not modified while mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&path) }.with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = BTreeMap::new();
    let mut expected = std::collections::BTreeSet::new();
    for (m, fan_in, fan_out) in lc.modules(cfg) {
        for (part, shape) in [("lora_A", (lc.r, fan_in)), ("lora_B", (fan_out, lc.r))] {
            let key = format!("{}.{part}.weight", peft_key(&m));
            let t = st.load(&key, device).map_err(|_| anyhow::anyhow!("{}: tensor `{key}` is missing", path.display()))?;
            if t.dims() != [shape.0, shape.1] {
                bail!(
                    "{}: `{key}` has shape {:?}, but this model needs {:?}: the adapter was made for another base",
                    path.display(),
                    t.dims(),
                    shape
                );
            }
            out.insert(format!("{m}.{part}.weight"), t.to_dtype(DType::F32)?);
            expected.insert(key);
        }
    }
    if let Some((extra, _)) = st.tensors().into_iter().find(|(k, _)| !expected.contains(k)) {
        bail!("{}: unexpected tensor `{extra}` (more layers or targets than adapter_config.json and the model say)", path.display());
    }
    Ok((lc, out))
}

/// Writes an adapter directory PEFT loads with `PeftModel.from_pretrained(base, DIR)`.
pub fn save(dir: &Path, lc: &LoraConfig, tensors: &BTreeMap<String, Tensor>, base_model: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let renamed: BTreeMap<String, Tensor> = tensors.iter().map(|(k, t)| (peft_key(k), t.clone())).collect();
    super::weights::save_weights(&dir.join(WEIGHTS_FILE), &renamed, DType::F32)?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lc.r,
        "lora_alpha": lc.lora_alpha,
        "lora_dropout": lc.lora_dropout,
        "target_modules": lc.target_modules,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
        "modules_to_save": null,
        "base_model_name_or_path": base_model.display().to_string(),
    });
    crate::store::write_atomic(&dir.join(CONFIG_FILE), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())
}

/// The base weights with each adapted module merged: W + (α/r) · B A.
pub fn merge(base: &mut HashMap<String, Tensor>, lc: &LoraConfig, adapter: &BTreeMap<String, Tensor>) -> Result<()> {
    for m in adapter.keys().filter_map(|k| k.strip_suffix(".lora_A.weight")) {
        let w = base.get(&format!("{m}.weight")).with_context(|| format!("base has no `{m}.weight`"))?;
        let (a, b) = (&adapter[&format!("{m}.lora_A.weight")], &adapter[&format!("{m}.lora_B.weight")]);
        let merged = (w + (b.matmul(a)? * lc.scale())?.to_dtype(w.dtype())?)?;
        base.insert(format!("{m}.weight"), merged);
    }
    Ok(())
}
