//! The trainable policy: the `Var`s the optimizer updates, a decoder that tracks gradients and
//! one that does not (evaluation), and saving. Two kinds: full fine-tuning (one `Var` per
//! Hugging Face tensor, saved in HF layout) and LoRA (the base frozen, possibly in bf16; one
//! `Var` per adapter tensor, saved in PEFT's layout). Either can be fully sharded over the
//! ranks (`--shard-params`, see `shard.rs`): the `Var`s are then this rank's flat shards.
use crate::model::decoder::{DecoderOptions, Dropout, GradSink};
use crate::model::lora::{self, LoraConfig};
use crate::model::quant::{QuantSpec, QuantWeights};
use crate::model::{weights, Decoder, ModelConfig};
use crate::rng::Rng;
use crate::store::write_atomic;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

/// Tokenizer and generation files copied beside saved weights, so the directory loads alone.
const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json", "generation_config.json"];

/// A LoRA policy's frozen base: full-precision tensors and the 4-bit ones.
struct Base {
    tensors: HashMap<String, Tensor>,
    quant: Option<Arc<QuantWeights>>,
}

/// What the policy trains.
pub enum Trainable {
    /// Every weight.
    Full,
    /// A new LoRA adapter, initialised from the seed as PEFT does.
    NewLora { config: LoraConfig, seed: u64 },
    /// An existing PEFT LoRA adapter (its adapter_config.json gives r, α and targets).
    Adapter(std::path::PathBuf),
}

pub struct Policy {
    pub cfg: ModelConfig,
    /// Names of the trained tensors (HF names, or `<module>.lora_{A,B}.weight`), sorted.
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Tracks gradients.
    pub decoder: Decoder,
    /// Same storage, no autograd, no dropout: for evaluation.
    pub eval_decoder: Decoder,
    /// The adapter's settings when training LoRA.
    pub lora: Option<LoraConfig>,
    /// The adapter dropout's generator, reseeded per micro-batch (see [`Policy::reseed`]).
    dropout_rng: Arc<Mutex<Rng>>,
    /// Where gradients computed outside candle's graph arrive: the trained linear weights'
    /// (full fine-tuning) and, with gradient checkpointing, the rerun layers' parameters'.
    pub grad_sink: Arc<GradSink>,
    /// The frozen base's bytes as held (4-bit layers packed); 0 under full fine-tuning.
    pub frozen_bytes: u64,
    /// Under full sharding: the shards, the layers' source and the step's gradients.
    pub shards: Option<Arc<super::shard::Sharded>>,
}

impl Policy {
    /// Full fine-tuning of `model_dir` in `dtype`.
    pub fn load(model_dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(model_dir, dtype, &Trainable::Full, device)
    }

    /// `base_dtype` is the dtype the (frozen, under LoRA) weights are held in; LoRA math and
    /// adapters are f32 whatever it is.
    pub fn load_with(model_dir: &Path, base_dtype: DType, what: &Trainable, device: &Device) -> Result<Self> {
        Self::load_mixed(model_dir, base_dtype, None, what, false, None, device)
    }

    /// As `load_with`, computing in `compute` (default: the weights' dtype, f32 under LoRA).
    /// Mixed precision is `compute` bf16 over f32 weights: the trained tensors stay f32 (the
    /// master copy AdamW updates, with f32 moments) and are cast to bf16 where they are used;
    /// gradients flow back through the casts to f32, and log-softmax and loss run in f32, as
    /// torch autocast + AdamW do. `checkpoint`: gradient checkpointing (each layer keeps only
    /// its input and reruns in the backward). `quant`: quantize the base to 4 bits on load
    /// (QLoRA; a checkpoint saved in 4 bits is read as it is either way).
    pub fn load_mixed(
        model_dir: &Path,
        base_dtype: DType,
        compute: Option<DType>,
        what: &Trainable,
        checkpoint: bool,
        quant: Option<&QuantSpec>,
        device: &Device,
    ) -> Result<Self> {
        let cfg = ModelConfig::load(model_dir)?;
        let w = weights::load_model(model_dir, &cfg, base_dtype, device, quant)?;
        let sink = Arc::new(GradSink::default());
        if let (Trainable::Full, Some(spec)) = (what, &w.spec) {
            anyhow::bail!(
                "{}: the base is {}-quantized (4-bit): full fine-tuning needs the full-precision weights; train a LoRA adapter over it with --lora-r R (QLoRA)",
                model_dir.display(),
                spec.quant_type.name()
            );
        }
        let frozen_bytes = w.bytes() as u64;
        let base = Base { tensors: w.tensors, quant: w.quant };
        match what {
            Trainable::Full => Self::from_tensors_in(cfg, base.tensors, compute, sink, checkpoint),
            Trainable::NewLora { config, seed } => {
                let config = config.clone().resolve(&cfg)?;
                let adapter = config.init(&cfg, *seed, device)?;
                Self::with_adapter(cfg, base, frozen_bytes, config, adapter, compute.unwrap_or(DType::F32), sink, checkpoint)
            }
            Trainable::Adapter(dir) => {
                let (config, adapter) = lora::load(dir, &cfg, device)?;
                Self::with_adapter(cfg, base, frozen_bytes, config, adapter, compute.unwrap_or(DType::F32), sink, checkpoint)
            }
        }
    }

    pub fn from_tensors(cfg: ModelConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        Self::from_tensors_in(cfg, tensors, None, Arc::new(GradSink::default()), false)
    }

    fn from_tensors_in(
        cfg: ModelConfig,
        tensors: HashMap<String, Tensor>,
        compute: Option<DType>,
        grad_sink: Arc<GradSink>,
        checkpoint: bool,
    ) -> Result<Self> {
        let names: Vec<String> = {
            let mut n: Vec<String> = tensors.keys().cloned().collect();
            n.sort();
            n
        };
        let vars = names.iter().map(|n| Ok(Var::from_tensor(&tensors[n])?)).collect::<Result<Vec<_>>>()?;
        let tracked: HashMap<String, Tensor> = names.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().clone())).collect();
        let detached: HashMap<String, Tensor> = names.iter().cloned().zip(vars.iter().map(|v| v.as_tensor().detach())).collect();
        let dropout_rng = Arc::new(Mutex::new(Rng::new(0)));
        let opts = DecoderOptions { compute_dtype: compute, ..Default::default() };
        Ok(Self {
            decoder: Decoder::with_options(
                &cfg,
                &tracked,
                &DecoderOptions { checkpoint: checkpoint.then(|| grad_sink.clone()), weight_grads: Some(grad_sink.clone()), ..opts.clone() },
            )?,
            eval_decoder: Decoder::with_options(&cfg, &detached, &opts)?,
            cfg,
            names,
            vars,
            lora: None,
            dropout_rng,
            grad_sink,
            frozen_bytes: 0,
            shards: None,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn with_adapter(
        cfg: ModelConfig,
        base: Base,
        frozen_bytes: u64,
        config: LoraConfig,
        adapter: BTreeMap<String, Tensor>,
        compute: DType,
        grad_sink: Arc<GradSink>,
        checkpoint: bool,
    ) -> Result<Self> {
        let names: Vec<String> = adapter.keys().cloned().collect();
        let vars = names.iter().map(|n| Ok(Var::from_tensor(&adapter[n])?)).collect::<Result<Vec<_>>>()?;
        let dropout_rng = Arc::new(Mutex::new(Rng::new(0)));
        let with = |tracked: bool| -> Result<Decoder> {
            let mut t = base.tensors.clone();
            for (n, v) in names.iter().zip(&vars) {
                t.insert(n.clone(), if tracked { v.as_tensor().clone() } else { v.as_tensor().detach() });
            }
            let dropout = (tracked && config.lora_dropout > 0.0).then(|| Dropout { p: config.lora_dropout, rng: dropout_rng.clone() });
            Decoder::with_options(
                &cfg,
                &t,
                &DecoderOptions {
                    compute_dtype: Some(compute),
                    lora_scale: Some(config.scale()),
                    lora_dropout: dropout,
                    frozen_base: true,
                    quantized: base.quant.clone(),
                    checkpoint: (tracked && checkpoint).then(|| grad_sink.clone()),
                    ..Default::default()
                },
            )
        };
        Ok(Self {
            decoder: with(true)?,
            eval_decoder: with(false)?,
            cfg,
            names,
            vars,
            lora: Some(config),
            dropout_rng,
            grad_sink,
            frozen_bytes,
            shards: None,
        })
    }

    /// As `load_mixed`, fully sharded over `world` (`--shard-params`): each tensor is read, cut to
    /// this rank's shard and dropped, so no rank ever holds the model; the decoder gathers each
    /// layer when it runs. Layers always rerun in the backward (their weights are not kept).
    pub fn load_sharded(
        model_dir: &Path,
        base_dtype: DType,
        compute: Option<DType>,
        what: &Trainable,
        quant: Option<&QuantSpec>,
        world: &super::dist::World,
        device: &Device,
    ) -> Result<Self> {
        use super::shard::{shard_of, Quant, Sharded};
        let cfg = ModelConfig::load(model_dir)?;
        // A 4-bit base (asked for, or as published): each packed weight is held by one rank,
        // the ranks' shares balanced by size as ZeRO-1's owners are.
        let spec = QuantSpec::from_config(&cfg.raw, &model_dir.join("config.json"))?.or(quant.cloned());
        if spec.is_some() && matches!(what, Trainable::Full) {
            anyhow::bail!("{}: a 4-bit base trains a LoRA adapter over it (--lora-r R), not every weight", model_dir.display());
        }
        let shapes_all = weights::tensor_shapes(&cfg);
        let quantized: Vec<(String, usize)> = shapes_all
            .iter()
            .filter(|(n, _)| spec.as_ref().is_some_and(|s| s.quantizes(n)))
            .map(|(n, sh)| (n.clone(), sh.iter().product()))
            .collect();
        let owner = super::dist::owners(&quantized.iter().map(|q| q.1).collect::<Vec<_>>(), world.size);
        let mut q =
            Quant { layers: vec![Vec::new(); cfg.num_hidden_layers], held: HashMap::new(), device: (!device.is_cpu()).then(|| device.clone()) };
        let mine: Vec<String> = quantized.iter().zip(&owner).filter(|(_, &o)| o == world.rank).map(|((n, _), _)| n.clone()).collect();
        for ((n, _), &o) in quantized.iter().zip(&owner) {
            let i = super::shard::layer_of(n, &cfg).context("a 4-bit weight outside the layers")?;
            q.layers[i].push((n.clone(), o));
        }
        if !mine.is_empty() {
            let loaded = weights::load_model_named(model_dir, &cfg, &mine, base_dtype, device, quant)?;
            if let Some(n) = loaded.tensors.keys().next() {
                anyhow::bail!("{}: `{n}` should be 4-bit but is stored in full precision", model_dir.display());
            }
            q.held = loaded.quant.map(|m| (*m).clone()).unwrap_or_default();
        }
        let plain_names: Vec<String> = shapes_all.into_iter().map(|(n, _)| n).filter(|n| !quantized.iter().any(|(m, _)| m == n)).collect();
        if cfg.prefix != "model." {
            anyhow::bail!(
                "{}: a multimodal checkpoint ({}): --shard-params trains text decoders saved alone (drop --shard-params)",
                model_dir.display(),
                cfg.prefix
            );
        }
        let (w, r) = (world.size, world.rank);
        // Layers, the embedding and the head are sharded; what else there is (the final norm)
        // is small and read whole.
        let embedding = format!("{}embed_tokens.weight", cfg.prefix);
        let sharded_tensor = |n: &str| n.starts_with(&format!("{}layers.", cfg.prefix)) || n == embedding || n == "lm_head.weight";
        let full = matches!(what, Trainable::Full);
        let (mut shapes, mut shards, mut root) = (HashMap::new(), HashMap::new(), HashMap::new());
        weights::load_each(model_dir, &plain_names, if full { DType::F32 } else { base_dtype }, device, |n, t| {
            if full || sharded_tensor(n) {
                shapes.insert(n.to_string(), t.dims().to_vec());
                shards.insert(n.to_string(), shard_of(&t, w, r)?);
            }
            if !sharded_tensor(n) {
                root.insert(n.to_string(), t);
            }
            Ok(())
        })?;
        let lora = match what {
            Trainable::Full => None,
            Trainable::NewLora { config, seed } => {
                let config = config.clone().resolve(&cfg)?;
                let adapter = config.init(&cfg, *seed, device)?;
                Some((config, adapter))
            }
            Trainable::Adapter(dir) => Some(lora::load(dir, &cfg, device)?),
        };
        let names: Vec<String> = match &lora {
            None => {
                let mut n: Vec<String> = shapes.keys().cloned().collect();
                n.sort();
                n
            }
            Some((_, adapter)) => {
                for (n, t) in adapter {
                    shapes.insert(n.clone(), t.dims().to_vec());
                    shards.insert(n.clone(), shard_of(t, w, r)?);
                }
                adapter.keys().cloned().collect()
            }
        };
        let (sharded, vars, tensors) = Sharded::build(&cfg, world, shapes, shards, root, &names)?;
        let sharded = sharded.with_quant(q);
        let frozen_bytes =
            sharded.frozen_shard_bytes() + if full { 0 } else { tensors.values().map(|t| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum() };
        let sharded = Arc::new(sharded);
        let dropout_rng = Arc::new(Mutex::new(Rng::new(0)));
        let sink = Arc::new(GradSink::default());
        let with = |tracked: bool| -> Result<Decoder> {
            let t: HashMap<String, Tensor> = tensors.iter().map(|(n, t)| (n.clone(), if tracked { t.clone() } else { t.detach() })).collect();
            let opts = match &lora {
                None => DecoderOptions { compute_dtype: compute, ..Default::default() },
                Some((config, _)) => DecoderOptions {
                    compute_dtype: Some(compute.unwrap_or(DType::F32)),
                    lora_scale: Some(config.scale()),
                    lora_dropout: (tracked && config.lora_dropout > 0.0).then(|| Dropout { p: config.lora_dropout, rng: dropout_rng.clone() }),
                    frozen_base: true,
                    ..Default::default()
                },
            };
            let source: Arc<dyn crate::model::decoder::LayerSource> = sharded.clone();
            Decoder::with_options(&cfg, &t, &DecoderOptions { layers_from: Some(source), checkpoint: tracked.then(|| sink.clone()), ..opts })
        };
        Ok(Self {
            decoder: with(true)?,
            eval_decoder: with(false)?,
            names,
            vars,
            lora: lora.map(|(c, _)| c),
            dropout_rng,
            grad_sink: sink.clone(),
            frozen_bytes,
            shards: Some(sharded),
            cfg,
        })
    }

    /// Turns gradient checkpointing on or off (the memory plan's choice under --max-memory).
    pub fn set_checkpointing(&mut self, on: bool) {
        if self.shards.is_some() {
            return; // fully sharded layers always rerun in the backward
        }
        self.decoder.set_checkpoint(on.then(|| self.grad_sink.clone()));
    }

    /// The trained parameters' count.
    pub fn trainable_params(&self) -> u64 {
        match &self.shards {
            Some(s) => s.total_params(&self.names),
            None => self.vars.iter().map(|v| v.elem_count() as u64).sum(),
        }
    }

    /// The trained weights' bytes (this rank's shards under full sharding).
    pub fn trainable_bytes(&self) -> u64 {
        self.vars.iter().map(|v| (v.elem_count() * v.dtype().size_in_bytes()) as u64).sum()
    }

    /// Reseeds the adapter dropout for one micro-batch, so a resumed run draws the same masks.
    pub fn reseed(&self, seed: u64, step: usize, micro: usize) {
        *self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()) = Rng::new(seed ^ ((step as u64) << 20) ^ micro as u64 ^ 0xD80F);
    }

    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        self.names.iter().cloned().zip(self.vars.iter().map(|v| v.as_tensor().detach())).collect()
    }

    /// Writes what the policy trained: an HF model directory transformers loads (full), or a
    /// PEFT adapter directory (LoRA); with the tokenizer files either way.
    pub fn save(&self, dir: &Path, model_dir: &Path) -> Result<()> {
        if let Some(s) = &self.shards {
            return self.save_sharded(s, dir, model_dir);
        }
        std::fs::create_dir_all(dir)?;
        match &self.lora {
            Some(lc) => lora::save(dir, lc, &self.tensors(), model_dir)?,
            None => {
                let mut tensors = self.tensors();
                if self.cfg.prefix != "model." {
                    // A multimodal checkpoint (Gemma 3): the towers this tool does not train are
                    // kept as they came, so transformers loads the whole model back.
                    // SAFETY: model files are read-only inputs, not modified while mapped.
                    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&weights::weight_files(model_dir)?)? };
                    for (name, _) in st.tensors() {
                        if let std::collections::btree_map::Entry::Vacant(e) = tensors.entry(name) {
                            let t = st.load(e.key(), &candle_core::Device::Cpu)?;
                            e.insert(t);
                        }
                    }
                }
                weights::save_weights(&dir.join("model.safetensors"), &tensors, DType::F32)?;
                save_config(dir, &self.cfg)?;
            }
        }
        copy_tokenizer(model_dir, dir)
    }

    /// `save` under full sharding, called on every rank: the tensors gathered one at a time,
    /// rank 0 writing them as the safetensors writer asks (it picks the order; the other ranks
    /// hear each index from rank 0), so no rank ever holds the whole model.
    fn save_sharded(&self, s: &super::shard::Sharded, dir: &Path, model_dir: &Path) -> Result<()> {
        let world = s.world();
        if let Some(lc) = &self.lora {
            // An adapter is small: gathered whole on rank 0.
            let mut tensors = BTreeMap::new();
            s.each_whole(&self.names, |n, t| {
                tensors.insert(n.to_string(), t);
                Ok(())
            })?;
            if world.is_root() {
                std::fs::create_dir_all(dir)?;
                lora::save(dir, lc, &tensors, model_dir)?;
                copy_tokenizer(model_dir, dir)?;
            }
            return Ok(());
        }
        if !world.is_root() {
            loop {
                let mut i = [0f64];
                world.broadcast_f64(&mut i, 0);
                if i[0] < 0.0 {
                    return Ok(());
                }
                s.each_whole(std::slice::from_ref(&self.names[i[0] as usize]), |_, _| Ok(()))?;
            }
        }
        std::fs::create_dir_all(dir)?;
        let views: Vec<(String, super::shard::WholeView<'_>)> =
            self.names.iter().enumerate().map(|(i, n)| (n.clone(), super::shard::WholeView::new(s, &self.names, i))).collect();
        let written = weights::save_views(&dir.join("model.safetensors"), views);
        world.broadcast_f64(&mut [-1.0], 0);
        written?;
        save_config(dir, &self.cfg)?;
        copy_tokenizer(model_dir, dir)
    }

    /// Sets the trained tensors from a directory [`Policy::save`] wrote.
    pub fn restore(&self, dir: &Path) -> Result<()> {
        let device = self.vars[0].device().clone();
        if let Some(s) = &self.shards {
            return match &self.lora {
                Some(lc) => {
                    let (got, t) = lora::load(dir, &self.cfg, &device)?;
                    if &got != lc {
                        anyhow::bail!("{}: adapter settings differ from this run's", dir.display());
                    }
                    s.set_from(&self.names, &self.vars, |n| t.get(n).cloned().with_context(|| format!("{}: no `{n}`", dir.display())))
                }
                None => {
                    // SAFETY: checkpoint files are ours and not modified while mapped.
                    let st = unsafe { candle_core::safetensors::MmapedSafetensors::multi(&weights::weight_files(dir)?)? };
                    s.set_from(&self.names, &self.vars, |n| {
                        let t = st.load(n, &device).with_context(|| format!("{}: no tensor `{n}`", dir.display()))?;
                        weights::release(&st, n);
                        Ok(t)
                    })
                }
            };
        }
        let saved: HashMap<String, Tensor> = match &self.lora {
            Some(lc) => {
                let (got, t) = lora::load(dir, &self.cfg, &device)?;
                if &got != lc {
                    anyhow::bail!("{}: adapter settings differ from this run's", dir.display());
                }
                t.into_iter().collect()
            }
            None => weights::load_weights(dir, &self.cfg, DType::F32, &device)?,
        };
        for (n, v) in self.names.iter().zip(&self.vars) {
            v.set(&saved[n])?;
        }
        Ok(())
    }
}

/// config.json for float32 weights.
pub fn save_config(dir: &Path, cfg: &ModelConfig) -> Result<()> {
    let mut config = cfg.raw.clone();
    config["dtype"] = "float32".into();
    // Saved weights are full precision, even when trained over a 4-bit base.
    if let Some(o) = config.as_object_mut() {
        o.remove("quantization_config");
    }
    if config.get("torch_dtype").is_some() {
        config["torch_dtype"] = "float32".into();
    }
    write_atomic(&dir.join("config.json"), (serde_json::to_string_pretty(&config)? + "\n").as_bytes())
}

/// Copies the tokenizer and generation files of `from` into `to`.
pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.exists() {
            write_atomic(&to.join(f), &std::fs::read(&src)?)?;
        }
    }
    Ok(())
}

/// `pipeline merge-lora`: the base model with a LoRA adapter merged into its weights
/// (W + (α/r) · B A), written as an HF model directory (float32).
pub fn merge_lora(model_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<()> {
    let device = Device::Cpu;
    let cfg = ModelConfig::load(model_dir)?;
    // A 4-bit base is dequantized (as PEFT's merge_and_unload on bitsandbytes layers).
    let mut base = weights::load_model(model_dir, &cfg, DType::F32, &device, None)?.dequantized(DType::F32)?;
    let (lc, adapter) = lora::load(adapter_dir, &cfg, &device)?;
    lora::merge(&mut base, &lc, &adapter)?;
    std::fs::create_dir_all(out)?;
    weights::save_weights(&out.join("model.safetensors"), &base.into_iter().collect(), DType::F32)?;
    save_config(out, &cfg)?;
    copy_tokenizer(model_dir, out)
}
