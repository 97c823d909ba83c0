//! HF `config.json` for every family the decoder serves, in both dialects: transformers 5
//! (`rope_parameters`, `dtype`, `layer_types`) and older files (top-level `rope_theta` /
//! `rope_scaling`, `torch_dtype`). The families differ in a handful of switches, read here into
//! one [`ModelConfig`]; the decoder composes them. Each family is a row of [`FAMILIES`]; nothing
//! else in the project matches on `model_type`.
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// How an RMSNorm scales the normalised value (transformers computes it in f32 and casts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormStyle {
    /// Llama: cast to the compute dtype, then × w.
    Weight,
    /// Gemma: × (1 + w) in f32, then cast.
    OnePlusWeight,
    /// OLMo 2: × w in f32, then cast.
    WeightThenCast,
}

/// Where a decoder layer's norms sit, under the checkpoint's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormPlacement {
    /// `input_layernorm` before attention, `post_attention_layernorm` before the MLP (Llama).
    Pre,
    /// Gemma: `input_layernorm` → attention → `post_attention_layernorm`,
    /// `pre_feedforward_layernorm` → MLP → `post_feedforward_layernorm`.
    Sandwich,
    /// OLMo 2: attention → `post_attention_layernorm`, MLP → `post_feedforward_layernorm`.
    Post,
}

/// RMSNorm of the queries and keys before RoPE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` (Qwen3, Gemma 3): weights [head_dim].
    PerHead,
    /// Over the whole projection (OLMo 2): weights [heads × head_dim].
    Whole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// `gelu_pytorch_tanh`.
    GeluTanh,
}

/// How RoPE frequencies are computed (transformers' `rope_type`s).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeType {
    Default,
    Linear {
        factor: f64,
    },
    /// NTK scaling once a forward's positions pass `max_position_embeddings`.
    Dynamic {
        factor: f64,
        max_position_embeddings: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
    Yarn {
        factor: f64,
        original_max_position_embeddings: f64,
        beta_fast: f64,
        beta_slow: f64,
        truncate: bool,
    },
    /// Phi-3's short and long factors, the long ones once positions pass the original length.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        original_max_position_embeddings: f64,
    },
}

/// One rotary embedding: base, type, how many dims of each head it rotates, and the factor
/// transformers multiplies cos and sin by (`attention_scaling`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub kind: RopeType,
    pub rotary_dim: usize,
    pub attention_scaling: f64,
}

/// What differs between the layers of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// The sliding attention window (keys j with i − w < j ≤ i), if this layer slides.
    pub window: Option<usize>,
    /// Which of `ModelConfig::ropes` rotates this layer's queries and keys (None: NoPE).
    pub rope: Option<usize>,
    /// A sparse mixture-of-experts MLP instead of the dense one.
    pub moe: bool,
}

/// How a family names its experts in the checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertNames {
    /// Mixtral: `block_sparse_moe.gate`, `block_sparse_moe.experts.E.{w1 (gate), w3 (up), w2 (down)}`.
    Mixtral,
    /// Qwen3-MoE: `mlp.gate`, `mlp.experts.E.{gate_proj, up_proj, down_proj}`.
    Qwen,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub top_k: usize,
    /// Renormalise the chosen experts' probabilities to sum to 1 (Mixtral always does).
    pub norm_topk_prob: bool,
    /// Each expert's intermediate size.
    pub intermediate_size: usize,
    pub names: ExpertNames,
    /// Train adds `router_aux_loss_coef` × the load-balancing loss (when `output_router_logits`).
    pub output_router_logits: bool,
    pub router_aux_loss_coef: f64,
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    /// The dense MLP's intermediate size.
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v (Qwen2 always; Llama-style `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (`attention_bias` covers it, except Qwen2).
    pub o_bias: bool,
    pub mlp_bias: bool,
    pub norm_style: NormStyle,
    pub norm_placement: NormPlacement,
    pub qk_norm: QkNorm,
    pub activation: Activation,
    /// Phi-3: one `qkv_proj` and one `gate_up_proj` instead of separate projections.
    pub fused_projections: bool,
    /// Gemma: embeddings × √hidden_size (rounded to the compute dtype first).
    pub embed_scale: bool,
    /// The factor on q·k (1/√head_dim, or Gemma's `query_pre_attn_scalar`^−½).
    pub attn_scale: f64,
    /// Gemma 2: scores → c·tanh(scores/c) before the mask.
    pub attn_softcap: Option<f64>,
    /// Gemma 2: logits → c·tanh(logits/c) before the log-softmax.
    pub final_softcap: Option<f64>,
    pub ropes: Vec<Rope>,
    pub layers: Vec<LayerSpec>,
    pub moe: Option<MoeConfig>,
    /// Prefix of the text model's tensors (`model.`, or `language_model.model.` for Gemma 3's
    /// multimodal checkpoints).
    pub prefix: String,
    /// The checkpoint's own dtype (`dtype` or `torch_dtype`), for saving back.
    pub dtype: Option<String>,
    /// config.json as read, written back unchanged with checkpoints.
    pub raw: Value,
}

/// Which layers slide when config.json has a `sliding_window` and no `layer_types`.
#[derive(Debug, Clone, Copy)]
enum Sliding {
    Never,
    Every,
    /// Layers from `max_window_layers` on (this default when absent): Qwen2, Qwen3.
    FromMaxWindowLayers(usize),
    /// Every other layer, starting with the first (Gemma 2).
    Alternate,
    /// All but every `sliding_window_pattern`-th (default 6) layer (Gemma 3).
    AllButEveryNth,
    /// The NoPE layers (SmolLM3).
    NoRope,
}

/// A soft-capping setting: never applied, or read from config.json with a default.
#[derive(Debug, Clone, Copy)]
enum Cap {
    Never,
    Read(&'static str, Option<f64>),
}

/// A family's switches and defaults (transformers 5.23's config classes and modeling files):
/// one row of [`FAMILIES`] per family, read once by [`ModelConfig::from_json`].
#[derive(Debug, Clone, Copy)]
struct Family {
    /// config.json's `model_type` values this row serves.
    model_types: &'static [&'static str],
    default_theta: f64,
    default_eps: f64,
    default_tied: bool,
    norm_style: NormStyle,
    norm_placement: NormPlacement,
    qk_norm: QkNorm,
    activation: Activation,
    fused_projections: bool,
    embed_scale: bool,
    /// Whether the default rope honours `partial_rotary_factor` (only Phi-3's does).
    partial_rotary: bool,
    /// `head_dim` when config.json has none (else hidden / heads).
    default_head_dim: Option<usize>,
    /// `sliding_window` counts only with `use_sliding_window: true`.
    window_needs_flag: bool,
    sliding: Sliding,
    /// The text model's settings are under `text_config` and its tensors under
    /// `language_model.model.` (Gemma 3's multimodal checkpoints).
    text_config: bool,
    /// q/k/v always carry a bias and o_proj never (Qwen2); else `attention_bias` sets both.
    qkv_bias_always: bool,
    /// The factor on q·k is `query_pre_attn_scalar`^−½ (default 256), not 1/√head_dim.
    query_pre_attn_scalar: bool,
    attn_softcap: Cap,
    final_softcap: Cap,
    /// A second rope (`rope_local_base_freq`) rotates the sliding layers.
    local_rope: bool,
    /// NoPE layers from `no_rope_layers` / `no_rope_layer_interval`.
    no_rope_layers: bool,
    /// The legacy rope names `su` and `yarn` mean `longrope` (transformers rewrites Phi-3's).
    legacy_longrope: bool,
    /// A sparse MoE MLP, with the checkpoint's expert names.
    experts: Option<ExpertNames>,
}

const LLAMA: Family = Family {
    model_types: &["llama"],
    default_theta: 10_000.0,
    default_eps: 1e-6,
    default_tied: false,
    norm_style: NormStyle::Weight,
    norm_placement: NormPlacement::Pre,
    qk_norm: QkNorm::None,
    activation: Activation::Silu,
    fused_projections: false,
    embed_scale: false,
    partial_rotary: false,
    default_head_dim: None,
    window_needs_flag: false,
    sliding: Sliding::Never,
    text_config: false,
    qkv_bias_always: false,
    query_pre_attn_scalar: false,
    attn_softcap: Cap::Never,
    final_softcap: Cap::Never,
    local_rope: false,
    no_rope_layers: false,
    legacy_longrope: false,
    experts: None,
};

const GEMMA3: Family = Family {
    model_types: &["gemma3_text"],
    default_theta: 1e6,
    default_tied: true,
    norm_style: NormStyle::OnePlusWeight,
    norm_placement: NormPlacement::Sandwich,
    qk_norm: QkNorm::PerHead,
    activation: Activation::GeluTanh,
    embed_scale: true,
    default_head_dim: Some(256),
    sliding: Sliding::AllButEveryNth,
    query_pre_attn_scalar: true,
    // Gemma 3 never applies attention soft-capping.
    final_softcap: Cap::Read("final_logit_softcapping", None),
    local_rope: true,
    ..LLAMA
};

const FAMILIES: &[Family] = &[
    LLAMA,
    Family { model_types: &["mistral"], sliding: Sliding::Every, ..LLAMA },
    Family { model_types: &["qwen2"], window_needs_flag: true, sliding: Sliding::FromMaxWindowLayers(0), qkv_bias_always: true, ..LLAMA },
    Family {
        model_types: &["qwen3"],
        qk_norm: QkNorm::PerHead,
        default_head_dim: Some(128),
        window_needs_flag: true,
        sliding: Sliding::FromMaxWindowLayers(28),
        ..LLAMA
    },
    Family {
        model_types: &["qwen3_moe"],
        qk_norm: QkNorm::PerHead,
        window_needs_flag: true,
        sliding: Sliding::Every,
        experts: Some(ExpertNames::Qwen),
        ..LLAMA
    },
    Family {
        model_types: &["mixtral"],
        default_theta: 1e6,
        default_eps: 1e-5,
        sliding: Sliding::Every,
        experts: Some(ExpertNames::Mixtral),
        ..LLAMA
    },
    Family {
        model_types: &["gemma2"],
        default_theta: 10_000.0,
        qk_norm: QkNorm::None,
        sliding: Sliding::Alternate,
        attn_softcap: Cap::Read("attn_logit_softcapping", Some(50.0)),
        final_softcap: Cap::Read("final_logit_softcapping", Some(30.0)),
        local_rope: false,
        ..GEMMA3
    },
    GEMMA3,
    // The multimodal checkpoint: no final soft-capping either.
    Family { model_types: &["gemma3"], text_config: true, final_softcap: Cap::Never, ..GEMMA3 },
    Family {
        model_types: &["phi3"],
        default_eps: 1e-5,
        fused_projections: true,
        partial_rotary: true,
        sliding: Sliding::Every,
        legacy_longrope: true,
        ..LLAMA
    },
    Family {
        model_types: &["olmo2"],
        default_eps: 1e-5,
        norm_style: NormStyle::WeightThenCast,
        norm_placement: NormPlacement::Post,
        qk_norm: QkNorm::Whole,
        ..LLAMA
    },
    Family {
        model_types: &["smollm3"],
        default_theta: 2e6,
        default_tied: true,
        window_needs_flag: true,
        sliding: Sliding::NoRope,
        no_rope_layers: true,
        ..LLAMA
    },
];

/// Every `model_type` the decoder serves.
pub fn supported() -> Vec<&'static str> {
    FAMILIES.iter().flat_map(|f| f.model_types.iter().copied()).collect()
}

fn family(model_type: &str) -> Result<&'static Family> {
    FAMILIES
        .iter()
        .find(|f| f.model_types.contains(&model_type))
        .with_context(|| format!("unsupported model_type `{model_type}` (supported: {})", supported().join(", ")))
}

fn usize_of(v: &Value) -> Option<usize> {
    v.as_u64().map(|x| x as usize)
}

impl ModelConfig {
    pub fn load(model_dir: &Path) -> Result<Self> {
        let path = model_dir.join("config.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
        Self::from_json(raw).with_context(|| format!("{}", path.display()))
    }

    pub fn from_json(raw: Value) -> Result<Self> {
        let model_type = raw["model_type"].as_str().unwrap_or("").to_string();
        let f = family(&model_type)?;
        let (c, prefix) = if f.text_config {
            let mut t = raw.get("text_config").cloned().with_context(|| format!("a {model_type} config needs `text_config`"))?;
            if t.get("tie_word_embeddings").is_none() {
                t["tie_word_embeddings"] = raw.get("tie_word_embeddings").cloned().unwrap_or(Value::Bool(true));
            }
            (t, "language_model.model.")
        } else {
            (raw.clone(), "model.")
        };
        let req = |k: &str| -> Result<usize> { usize_of(&c[k]).with_context(|| format!("missing or invalid `{k}`")) };
        let hidden_size = req("hidden_size")?;
        let num_attention_heads = req("num_attention_heads")?;
        let num_hidden_layers = req("num_hidden_layers")?;
        let num_key_value_heads = usize_of(&c["num_key_value_heads"]).unwrap_or(num_attention_heads);
        let head_dim = usize_of(&c["head_dim"]).or(f.default_head_dim).unwrap_or(hidden_size / num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            bail!("num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}");
        }
        let max_pos = c["max_position_embeddings"].as_f64().unwrap_or(2048.0);
        let nope = if f.no_rope_layers { nope_layers(&c, num_hidden_layers) } else { vec![false; num_hidden_layers] };
        let sliding = sliding_layers(f, &c, num_hidden_layers, &nope)?;
        let window = if f.window_needs_flag && !c["use_sliding_window"].as_bool().unwrap_or(false) { None } else { usize_of(&c["sliding_window"]) };
        // RoPE: one embedding, or one for full and one for sliding layers.
        let rope_dim = |prf: f64| if f.partial_rotary { (head_dim as f64 * prf) as usize } else { head_dim };
        let params = rope_params(&c, f)?;
        let mut ropes = vec![Rope::new(&params, rope_dim(params.prf), max_pos)?];
        if f.local_rope {
            let theta = c["rope_local_base_freq"].as_f64().unwrap_or(10_000.0);
            let local = match c.get("rope_parameters").and_then(|p| p.get("sliding_attention")) {
                Some(nested) => RopeParams::from_obj(nested, theta, f),
                None => RopeParams { theta, kind: "default".into(), obj: Value::Null, prf: 1.0 },
            };
            ropes.push(Rope::new(&local, head_dim, max_pos)?);
        }
        let moe = moe_config(f, &c)?;
        let mlp_only: Vec<usize> = c["mlp_only_layers"].as_array().map(|a| a.iter().filter_map(usize_of).collect()).unwrap_or_default();
        let sparse_step = usize_of(&c["decoder_sparse_step"]).unwrap_or(1).max(1);
        let layers = (0..num_hidden_layers)
            .map(|i| LayerSpec {
                window: if sliding[i] { window } else { None },
                rope: match (nope[i], f.local_rope && sliding[i]) {
                    (true, _) => None,
                    (false, true) => Some(1),
                    (false, false) => Some(0),
                },
                moe: moe.is_some() && !mlp_only.contains(&i) && (i + 1) % sparse_step == 0,
            })
            .collect();
        let attention_bias = c["attention_bias"].as_bool().unwrap_or(false);
        let attn_scale =
            if f.query_pre_attn_scalar { c["query_pre_attn_scalar"].as_f64().unwrap_or(256.0).powf(-0.5) } else { (head_dim as f64).powf(-0.5) };
        let cap = |rule: Cap| -> Option<f64> {
            match rule {
                Cap::Never => None,
                Cap::Read(k, default) => match c.get(k) {
                    Some(Value::Null) => None,
                    Some(v) => v.as_f64(),
                    None => default,
                },
            }
        };
        Ok(Self {
            vocab_size: req("vocab_size")?,
            hidden_size,
            intermediate_size: req("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(f.default_eps),
            tie_word_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(f.default_tied),
            qkv_bias: f.qkv_bias_always || attention_bias,
            o_bias: !f.qkv_bias_always && attention_bias,
            mlp_bias: c["mlp_bias"].as_bool().unwrap_or(false),
            norm_style: f.norm_style,
            norm_placement: f.norm_placement,
            qk_norm: f.qk_norm,
            activation: f.activation,
            fused_projections: f.fused_projections,
            embed_scale: f.embed_scale,
            attn_scale,
            attn_softcap: cap(f.attn_softcap),
            final_softcap: cap(f.final_softcap),
            ropes,
            layers,
            moe,
            prefix: prefix.into(),
            dtype: raw["dtype"].as_str().or(raw["torch_dtype"].as_str()).map(String::from),
            model_type,
            raw,
        })
    }

    /// Parameter count (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let (h, i, hd) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_attention_heads * hd, self.num_key_value_heads * hd);
        let qk_norm = match self.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * hd,
            QkNorm::Whole => q + kv,
        };
        let norms = match self.norm_placement {
            NormPlacement::Pre | NormPlacement::Post => 2 * h,
            NormPlacement::Sandwich => 4 * h,
        };
        let attn = h * q + 2 * h * kv + q * h + if self.qkv_bias { q + 2 * kv } else { 0 } + if self.o_bias { h } else { 0 } + qk_norm;
        let dense = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let sparse = self.moe.as_ref().map_or(0, |m| m.num_experts * (3 * h * m.intermediate_size + h));
        let layers: usize = self.layers.iter().map(|l| attn + norms + if l.moe { sparse } else { dense }).sum();
        let emb = self.vocab_size * h;
        emb + layers + h + if self.tie_word_embeddings { 0 } else { emb }
    }

    /// RoPE inverse frequencies of the model's first rope (tests and tools).
    pub fn inv_freq(&self) -> Vec<f32> {
        self.ropes[0].inv_freq(0)
    }
}

/// Per layer: whether it is a NoPE layer (`no_rope_layers`: 0 = no rope; else every
/// `no_rope_layer_interval`-th layer, default 4).
fn nope_layers(c: &Value, layers: usize) -> Vec<bool> {
    let interval = usize_of(&c["no_rope_layer_interval"]).unwrap_or(4).max(1);
    (0..layers)
        .map(|i| match c["no_rope_layers"].as_array() {
            Some(a) => a.get(i).and_then(|v| v.as_u64()) == Some(0),
            None => (i + 1) % interval == 0,
        })
        .collect()
}

/// Per layer: whether it uses sliding attention (`layer_types`, or the family's pattern).
fn sliding_layers(f: &Family, c: &Value, layers: usize, nope: &[bool]) -> Result<Vec<bool>> {
    if let Some(types) = c["layer_types"].as_array() {
        if types.len() != layers {
            bail!("`layer_types` has {} entries for {layers} layers", types.len());
        }
        return Ok(types.iter().map(|t| t.as_str() == Some("sliding_attention")).collect());
    }
    Ok((0..layers)
        .map(|i| match f.sliding {
            Sliding::Never => false,
            Sliding::Every => true,
            Sliding::FromMaxWindowLayers(default) => i >= usize_of(&c["max_window_layers"]).unwrap_or(default),
            Sliding::Alternate => i % 2 == 0,
            Sliding::AllButEveryNth => (i + 1) % usize_of(&c["sliding_window_pattern"]).unwrap_or(6).max(1) != 0,
            Sliding::NoRope => nope[i],
        })
        .collect())
}

/// The rope settings of a config: theta, type and its parameters, partial rotary factor.
struct RopeParams {
    theta: f64,
    kind: String,
    obj: Value,
    prf: f64,
}

impl RopeParams {
    fn from_obj(obj: &Value, theta: f64, f: &Family) -> Self {
        let mut kind = obj["rope_type"].as_str().or(obj["type"].as_str()).unwrap_or("default").to_string();
        if f.legacy_longrope && (kind == "su" || kind == "yarn") {
            kind = "longrope".into();
        }
        Self { theta: obj["rope_theta"].as_f64().unwrap_or(theta), kind, obj: obj.clone(), prf: obj["partial_rotary_factor"].as_f64().unwrap_or(1.0) }
    }
}

fn rope_params(c: &Value, f: &Family) -> Result<RopeParams> {
    // transformers 5 keeps rope settings in `rope_parameters` (Gemma 3: per layer type); older
    // files have `rope_scaling` and top-level `rope_theta` / `partial_rotary_factor`.
    let nested = c.get("rope_parameters").and_then(|p| p.get("full_attention")).filter(|v| v.is_object());
    let obj = nested
        .or(c.get("rope_parameters").filter(|v| v.is_object()))
        .or(c.get("rope_scaling").filter(|v| v.is_object()))
        .cloned()
        .unwrap_or(Value::Null);
    let theta = c["rope_theta"].as_f64().or_else(|| obj["rope_theta"].as_f64()).unwrap_or(f.default_theta);
    let mut p = RopeParams::from_obj(&obj, theta, f);
    p.theta = theta;
    if let Some(prf) = c["partial_rotary_factor"].as_f64() {
        p.prf = prf;
    }
    // Phi-3: the top-level original length wins over the one in the rope dict.
    if let (Some(o), true) = (c["original_max_position_embeddings"].as_f64(), p.obj.is_object()) {
        p.obj["original_max_position_embeddings"] = o.into();
    }
    if p.obj["original_max_position_embeddings"].is_null() && p.obj.is_object() {
        p.obj["original_max_position_embeddings"] = c["max_position_embeddings"].clone();
    }
    Ok(p)
}

impl Rope {
    fn new(p: &RopeParams, rotary_dim: usize, max_pos: f64) -> Result<Self> {
        let o = &p.obj;
        let f = |k: &str| o[k].as_f64().with_context(|| format!("{} rope scaling needs `{k}`", p.kind));
        let orig = || o["original_max_position_embeddings"].as_f64().unwrap_or(max_pos);
        let (kind, scaling) = match p.kind.as_str() {
            "default" => (RopeType::Default, 1.0),
            "linear" => match o["factor"].as_f64() {
                Some(x) if x != 1.0 => (RopeType::Linear { factor: x }, 1.0),
                _ => (RopeType::Default, 1.0),
            },
            "dynamic" => (RopeType::Dynamic { factor: f("factor")?, max_position_embeddings: max_pos }, 1.0),
            "llama3" => (
                RopeType::Llama3 {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?,
                },
                1.0,
            ),
            "yarn" => {
                let orig = orig();
                let factor = o["factor"].as_f64().unwrap_or(max_pos / orig);
                let mscale = |s: f64, m: f64| if s <= 1.0 { 1.0 } else { 0.1 * m * s.ln() + 1.0 };
                let scaling = match (o["attention_factor"].as_f64(), o["mscale"].as_f64(), o["mscale_all_dim"].as_f64()) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(ma)) if m != 0.0 && ma != 0.0 => mscale(factor, m) / mscale(factor, ma),
                    _ => mscale(factor, 1.0),
                };
                let beta = |k: &str, d: f64| o[k].as_f64().filter(|&x| x != 0.0).unwrap_or(d);
                let truncate = o["truncate"].as_bool().unwrap_or(true);
                (
                    RopeType::Yarn {
                        factor,
                        original_max_position_embeddings: orig,
                        beta_fast: beta("beta_fast", 32.0),
                        beta_slow: beta("beta_slow", 1.0),
                        truncate,
                    },
                    scaling,
                )
            }
            "longrope" => {
                let orig = orig();
                let list = |k: &str| -> Result<Vec<f64>> {
                    let v: Vec<f64> = o[k].as_array().with_context(|| format!("longrope needs `{k}`"))?.iter().filter_map(|x| x.as_f64()).collect();
                    if v.len() != rotary_dim / 2 {
                        bail!("longrope `{k}` has {} entries; the rotary dims need {}", v.len(), rotary_dim / 2);
                    }
                    Ok(v)
                };
                let factor = o["factor"].as_f64().unwrap_or(max_pos / orig);
                let scaling = o["attention_factor"].as_f64().unwrap_or(if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / orig.ln()).sqrt() });
                (
                    RopeType::LongRope {
                        short_factor: list("short_factor")?,
                        long_factor: list("long_factor")?,
                        original_max_position_embeddings: orig,
                    },
                    scaling,
                )
            }
            other => bail!("unsupported rope type `{other}` (supported: default, linear, dynamic, llama3, yarn, longrope)"),
        };
        Ok(Self { theta: p.theta, kind, rotary_dim, attention_scaling: scaling })
    }

    /// Inverse frequencies (f32, as transformers computes them) for a forward whose positions
    /// reach `seq_len` (= max position + 1; dynamic and longrope depend on it).
    pub fn inv_freq(&self, seq_len: usize) -> Vec<f32> {
        let d = self.rotary_dim;
        let exps: Vec<f32> = (0..d / 2).map(|k| (2 * k) as f32 / d as f32).collect();
        let default = |base: f32| -> Vec<f32> { exps.iter().map(|&e| 1.0 / base.powf(e)).collect() };
        let base = self.theta as f32;
        match &self.kind {
            RopeType::Default => default(base),
            RopeType::Linear { factor } => default(base).iter().map(|&x| x / *factor as f32).collect(),
            RopeType::Dynamic { factor, max_position_embeddings: m } => {
                let s = seq_len as f64;
                if s <= *m {
                    return default(base);
                }
                let b = self.theta * ((factor * s / m) - (factor - 1.0)).powf(d as f64 / (d as f64 - 2.0));
                default(b as f32)
            }
            RopeType::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
                let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
                default(base)
                    .into_iter()
                    .map(|f| {
                        let wl = 2.0 * std::f64::consts::PI / f as f64;
                        let v = f as f64;
                        if wl < high_wl {
                            f
                        } else if wl > low_wl {
                            (v / factor) as f32
                        } else {
                            let smooth = (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            ((1.0 - smooth) * v / factor + smooth * v) as f32
                        }
                    })
                    .collect()
            }
            RopeType::Yarn { factor, original_max_position_embeddings: orig, beta_fast, beta_slow, truncate } => {
                let dimf = d as f64;
                let corr = |r: f64| dimf * (orig / (r * 2.0 * std::f64::consts::PI)).ln() / (2.0 * self.theta.ln());
                let (mut low, mut high) = (corr(*beta_fast), corr(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                low = low.max(0.0);
                high = high.min(dimf - 1.0);
                if low == high {
                    high += 0.001;
                }
                exps.iter()
                    .enumerate()
                    .map(|(i, &e)| {
                        let ramp = (((i as f32) - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                        let pos_freq = base.powf(e);
                        let (extrap, interp) = (1.0 / pos_freq, 1.0 / (*factor as f32 * pos_freq));
                        let extrap_factor = 1.0 - ramp;
                        interp * (1.0 - extrap_factor) + extrap * extrap_factor
                    })
                    .collect()
            }
            RopeType::LongRope { short_factor, long_factor, original_max_position_embeddings: orig } => {
                let ext = if seq_len as f64 > *orig { long_factor } else { short_factor };
                exps.iter().zip(ext).map(|(&e, &x)| 1.0 / (x as f32 * base.powf(e))).collect()
            }
        }
    }
}

fn moe_config(f: &Family, c: &Value) -> Result<Option<MoeConfig>> {
    let Some(names) = f.experts else { return Ok(None) };
    let num_experts = usize_of(&c["num_local_experts"]).or(usize_of(&c["num_experts"])).context("missing `num_experts`")?;
    let top_k = usize_of(&c["num_experts_per_tok"]).unwrap_or(2);
    if top_k == 0 || top_k > num_experts {
        bail!("num_experts_per_tok {top_k} must be between 1 and num_experts {num_experts}");
    }
    Ok(Some(MoeConfig {
        num_experts,
        top_k,
        norm_topk_prob: names == ExpertNames::Mixtral || c["norm_topk_prob"].as_bool().unwrap_or(false),
        intermediate_size: match names {
            ExpertNames::Mixtral => usize_of(&c["intermediate_size"]).context("missing `intermediate_size`")?,
            ExpertNames::Qwen => usize_of(&c["moe_intermediate_size"]).unwrap_or(768),
        },
        names,
        output_router_logits: c["output_router_logits"].as_bool().unwrap_or(false),
        router_aux_loss_coef: c["router_aux_loss_coef"].as_f64().unwrap_or(0.001),
    }))
}
