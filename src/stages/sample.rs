//! `pipeline sample`: K completions per prompt from a model (optionally with a LoRA adapter),
//! with a key-value cache (see `generate`). Writes `samples.parquet` (one row per sample, in
//! prompt order), `skipped.parquet` (prompts that cannot be sampled, with the reason) and the
//! manifest.
use super::{begin, progress, Begin};
use crate::data::input::{expand_inputs, fields_array, input_hash, Field, Kind, Message, PromptReader, PromptRow, Skip};
use crate::data::samples::{samples_schema, write_skipped, SkippedRow, SAMPLES, SKIPPED};
use crate::data::tokenize::ModelTokenizer;
use crate::generate::{generate, Completion, Request, Sampling};
use crate::model::decoder::DecoderOptions;
use crate::model::quant::QuantSpec;
use crate::model::{self, lora, weights, Decoder, ModelConfig};
use crate::settings::SampleSettings;
use crate::store::{file_hash, write_atomic, InputRef, Manifest, ParquetOut};
use anyhow::{bail, Context, Result};
use arrow_array::builder::{ListBuilder, UInt32Builder};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub const STAGE: &str = "sample";
pub const FORMAT_VERSION: u32 = 1;

/// A model directory loaded for inference, with a PEFT adapter merged in when given.
/// A 4-bit base (pre-quantized, or `quant`) keeps its adapter unmerged, as PEFT runs it.
pub fn load_model(model_dir: &Path, adapter: Option<&Path>, dtype: candle_core::DType, quant: Option<&QuantSpec>) -> Result<Decoder> {
    let device = model::device()?;
    let cfg = ModelConfig::load(model_dir)?;
    let Some(adapter) = adapter else { return model::load_decoder(model_dir, dtype, quant, &device) };
    let w = weights::load_model(model_dir, &cfg, dtype, &device, quant)?;
    if w.quant.is_some() {
        let (lc, a) = lora::load(adapter, &cfg, &device)?;
        let mut tensors = w.tensors;
        tensors.extend(a);
        let opts = DecoderOptions { compute_dtype: Some(dtype), lora_scale: Some(lc.scale()), quantized: w.quant, ..Default::default() };
        return Decoder::with_options(&cfg, &tensors, &opts);
    }
    let mut tensors = weights::load_weights(model_dir, &cfg, candle_core::DType::F32, &device)?;
    let (lc, a) = lora::load(adapter, &cfg, &device)?;
    lora::merge(&mut tensors, &lc, &a)?;
    let tensors = tensors.into_iter().map(|(k, t)| Ok((k, t.to_dtype(dtype)?))).collect::<Result<_>>()?;
    Decoder::new(&cfg, &tensors)
}

/// Token ids that end a completion, as transformers' `generate` stops: generation_config.json's
/// `eos_token_id` (one id or a list), else config.json's, plus the tokenizer's eos_token.
pub fn eos_ids(model_dir: &Path, tok: &ModelTokenizer) -> Result<Vec<u32>> {
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        match v {
            serde_json::Value::Number(n) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            serde_json::Value::Array(a) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
            _ => vec![],
        }
    };
    let gen = model_dir.join("generation_config.json");
    let source = if gen.exists() { gen } else { model_dir.join("config.json") };
    let text = std::fs::read_to_string(&source).with_context(|| format!("cannot read {}", source.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", source.display()))?;
    let mut out = ids(&json["eos_token_id"]);
    if let Some(id) = tok.eos_token.as_deref().and_then(|t| tok.tokenizer.token_to_id(t)) {
        if !out.contains(&id) {
            out.push(id);
        }
    }
    if out.is_empty() {
        bail!("{}: no eos_token_id, and the tokenizer has no eos_token: completions could only stop at --max-new-tokens", source.display());
    }
    Ok(out)
}

/// A prompt as the model sees it: plain text tokenized as TRL tokenizes a prompt (special
/// tokens added), a conversation rendered with the chat template (and the row's tools and
/// template kwargs) and a generation prompt.
pub fn prompt_ids(tok: &ModelTokenizer, p: &PromptRow) -> Result<Vec<u32>, Skip> {
    match &p.prompt {
        Field::Text(t) => Ok(tok.encode(t, true)),
        Field::Messages(m) => tok.encode_chat(m, true, p.tools.as_ref(), p.template_kwargs.as_ref()),
    }
}

/// One prompt to sample from.
struct Prompt {
    file: Arc<str>,
    file_index: u64,
    row: u64,
    prompt: Field,
    ids: Vec<u32>,
}

/// Each sample's seed: a hash of the run's seed and the sample's place in the inputs.
fn sample_seed(seed: u64, file_index: u64, row: u64, sample: usize) -> u64 {
    let mut h = blake3::Hasher::new();
    for x in [seed, file_index, row, sample as u64] {
        h.update(&x.to_le_bytes());
    }
    u64::from_le_bytes(h.finalize().as_bytes()[..8].try_into().expect("8 bytes"))
}

/// The prompts of every input, in file and row order, read a batch of rows at a time (memory
/// does not grow with their number); the ones that cannot be sampled are kept in `skipped`.
struct PromptStream<'a> {
    cfg: &'a SampleSettings,
    files: &'a [std::path::PathBuf],
    tok: &'a ModelTokenizer,
    max_pos: Option<usize>,
    /// Every input's reader, opened up front (a file without the prompt column is an error
    /// before any sampling), with its name and index; the front one is being read.
    readers: VecDeque<(PromptReader, Arc<str>, u64)>,
    buf: VecDeque<Prompt>,
    kind: Option<Kind>,
    skipped: Vec<SkippedRow>,
    /// Input rows read (sampled or skipped), for the progress bar.
    rows: u64,
}

impl<'a> PromptStream<'a> {
    fn new(cfg: &'a SampleSettings, files: &'a [std::path::PathBuf], tok: &'a ModelTokenizer, max_pos: Option<usize>) -> Result<Self> {
        let mut readers = VecDeque::new();
        for (i, f) in files.iter().enumerate() {
            readers.push_back((PromptReader::open(f, &cfg.prompt_column, 4096)?, Arc::from(f.display().to_string()), i as u64));
        }
        Ok(Self { cfg, files, tok, max_pos, readers, buf: VecDeque::new(), kind: None, skipped: vec![], rows: 0 })
    }

    /// Rows in all inputs, where their format says so up front (parquet).
    fn total_rows(&self) -> Option<u64> {
        self.readers.iter().map(|r| r.0.total_rows()).sum()
    }

    fn peek(&mut self) -> Result<Option<&Prompt>> {
        while self.buf.is_empty() && self.fill()? {}
        Ok(self.buf.front())
    }

    fn next(&mut self) -> Result<Option<Prompt>> {
        self.peek()?;
        Ok(self.buf.pop_front())
    }

    /// Reads the next batch of rows; false when every input is read.
    fn fill(&mut self) -> Result<bool> {
        let Some((reader, name, fi)) = self.readers.front_mut() else { return Ok(false) };
        let Some(batch) = reader.next_batch()? else {
            self.readers.pop_front();
            return Ok(true);
        };
        let (name, fi) = (name.clone(), *fi);
        let path = &self.files[fi as usize];
        for (row, field) in batch {
            self.rows += 1;
            if let Ok(p) = &field {
                let k = Kind::of(&p.prompt);
                match self.kind {
                    None => self.kind = Some(k),
                    Some(first) if first != k => bail!(
                        "{} row {row}: column `{}` holds a {k:?} prompt, but earlier prompts are {first:?}; sample them separately",
                        path.display(),
                        self.cfg.prompt_column
                    ),
                    _ => {}
                }
            }
            let encoded = field.and_then(|p| {
                let ids = prompt_ids(self.tok, &p)?;
                if ids.is_empty() {
                    return Err(Skip::new("empty_prompt", "the prompt has no tokens"));
                }
                if let Some(m) = self.max_pos.filter(|&m| ids.len() + self.cfg.max_new_tokens > m) {
                    return Err(Skip::new(
                        "prompt_too_long",
                        format!("{} prompt tokens + {} new tokens exceed max_position_embeddings {m}", ids.len(), self.cfg.max_new_tokens),
                    ));
                }
                Ok((p.prompt, ids))
            });
            match encoded {
                Ok((prompt, ids)) => self.buf.push_back(Prompt { file: name.clone(), file_index: fi, row, prompt, ids }),
                Err(s) => self.skipped.push((name.clone(), row, s)),
            }
        }
        Ok(true)
    }
}

/// Where an unfinished run keeps its finished waves (one parquet part each) and its progress.
pub const PARTS_DIR: &str = "sample.parts";
const STATE: &str = "state.json";

/// Progress of a run, rewritten after each finished wave: a rerun with the same fingerprint
/// continues after `prompts_done`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SampleState {
    fingerprint: String,
    prompts_done: u64,
    waves: u64,
    tokens: u64,
    finish_counts: BTreeMap<String, u64>,
}

fn part_path(parts: &Path, wave: u64) -> std::path::PathBuf {
    parts.join(format!("wave-{wave:07}.parquet"))
}

pub fn run(cfg: &SampleSettings) -> Result<Manifest> {
    cfg.validate()?;
    let model = crate::hub::model_dir(&cfg.model)?;
    let mut hub: Vec<serde_json::Value> = model.record().into_iter().collect();
    let model = model.path;
    let adapter = crate::hub::optional_model(cfg.adapter.as_deref(), &mut hub)?;
    let cfg = &SampleSettings { model, adapter, ..cfg.clone() };
    let files = expand_inputs(&cfg.prompts)?;
    let tok = ModelTokenizer::load(&cfg.model, cfg.template_date()?)?;
    let dtype = cfg.compute_dtype().dtype();
    let model_cfg = ModelConfig::load(&cfg.model)?;
    let mut inputs = Vec::new();
    for f in &files {
        inputs.push(InputRef::new("prompts", f, &input_hash(f)?));
    }
    inputs.push(InputRef::new("model", &cfg.model, &weights::weights_hash(&cfg.model)?));
    if let Some(a) = &cfg.adapter {
        inputs.push(InputRef::new("adapter", a, &file_hash(&a.join("adapter_model.safetensors"))?.blake3));
    }
    inputs.extend(tok.identity.iter().cloned());
    let eos = eos_ids(&cfg.model, &tok)?;
    // What changes the samples; --batch-tokens does not.
    let mut settings = serde_json::json!({
        "prompt_column": cfg.prompt_column, "num_samples": cfg.num_samples, "max_new_tokens": cfg.max_new_tokens,
        "temperature": cfg.temperature, "top_k": cfg.top_k, "top_p": cfg.top_p, "seed": cfg.seed, "dtype": cfg.dtype,
        "eos_token_ids": eos, "config": model_cfg.raw, "tokenizer_construction": tok.construction,
    });
    if tok.template_uses_date {
        settings["template_date"] = cfg.template_date()?.to_string().into();
    }
    if !hub.is_empty() {
        settings["hub"] = hub.into();
    }
    let sd = match begin(STAGE, FORMAT_VERSION, &cfg.out, inputs, settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let t0 = Instant::now();

    // Finished waves of an interrupted run with these inputs and settings are kept; anything
    // else under the parts directory is from another run.
    let parts = cfg.out.join(PARTS_DIR);
    let state_path = parts.join(STATE);
    let old = std::fs::read_to_string(&state_path).ok().and_then(|t| serde_json::from_str::<SampleState>(&t).ok());
    let mut state = match old {
        Some(s) if s.fingerprint == sd.fingerprint && !cfg.force => {
            eprintln!("sample: resuming: {} prompts ({} waves) already sampled", s.prompts_done, s.waves);
            s
        }
        _ => {
            if parts.exists() {
                std::fs::remove_dir_all(&parts).with_context(|| format!("cannot clear {}", parts.display()))?;
            }
            SampleState { fingerprint: sd.fingerprint.clone(), ..Default::default() }
        }
    };
    std::fs::create_dir_all(&parts).with_context(|| format!("cannot create {}", parts.display()))?;

    let max_pos = model_cfg.raw["max_position_embeddings"].as_u64().map(|v| v as usize);
    let mut stream = PromptStream::new(cfg, &files, &tok, max_pos)?;
    let total_rows = stream.total_rows();
    for _ in 0..state.prompts_done {
        stream.next()?.context("the prompts changed since the interrupted run (fewer than it sampled); rerun with --force")?;
    }
    let decoder = load_model(&cfg.model, cfg.adapter.as_deref(), dtype, cfg.quant().as_ref())?;
    let sampling = Sampling { temperature: cfg.temperature, top_k: cfg.top_k, top_p: cfg.top_p };
    let pb = progress(total_rows, "sample", "prompts");
    pb.set_position(stream.rows);
    let mut tokens_run = 0u64;
    loop {
        let mut wave_tokens = 0u64;
        // As many prompts as fit the token budget with all their samples (at least one); rows
        // are left-padded to the longest prompt, so that is what each row costs.
        let mut wave = Vec::new();
        let mut longest = 0;
        while let Some(p) = stream.peek()? {
            let l = longest.max(p.ids.len());
            if !wave.is_empty() && (wave.len() + 1) * cfg.num_samples * (l + cfg.max_new_tokens) > cfg.batch_tokens {
                break;
            }
            longest = l;
            wave.push(stream.next()?.expect("peeked"));
        }
        if wave.is_empty() {
            break;
        }
        let requests: Vec<Request> = wave
            .iter()
            .map(|p| Request { prompt: p.ids.clone(), seeds: (0..cfg.num_samples).map(|k| sample_seed(cfg.seed, p.file_index, p.row, k)).collect() })
            .collect();
        let mut on_token = |n: usize| {
            tokens_run += n as u64;
            wave_tokens += n as u64;
            pb.set_message(format!("{:.1} tokens/s", tokens_run as f64 / t0.elapsed().as_secs_f64().max(1e-9)));
        };
        let done = generate(&decoder, &requests, cfg.max_new_tokens, &eos, &sampling, &mut on_token)?;
        let kind = stream.kind.unwrap_or(Kind::Text);
        let batch = samples_batch(&tok, kind, &wave, &done, &eos)?;
        let path = part_path(&parts, state.waves);
        // Refused before writing when even the uncompressed rows could not fit.
        crate::store::ensure_free(&[(path.clone(), batch.get_array_memory_size() as u64)], "sample")?;
        let mut part = ParquetOut::create(&path, samples_schema(kind))?;
        part.write(&batch)?;
        part.finish()?;
        for c in done.iter().flatten() {
            *state.finish_counts.entry(format!("finish_{}", c.finish.as_str())).or_default() += 1;
        }
        state.tokens += wave_tokens;
        state.prompts_done += wave.len() as u64;
        state.waves += 1;
        write_atomic(&state_path, serde_json::to_string(&state)?.as_bytes())?;
        pb.set_position(stream.rows - stream.buf.len() as u64);
        if cfg.stop_after_waves > 0 && state.waves == cfg.stop_after_waves as u64 {
            pb.abandon();
            eprintln!("sample: stopping after {} waves as asked; rerun to resume", state.waves);
            return Ok(Manifest::unfinished(STAGE, FORMAT_VERSION, &sd.fingerprint));
        }
    }
    pb.finish_and_clear();

    // The parts, in order, into one file: the same bytes whether or not the run was interrupted.
    let kind = stream.kind.unwrap_or(Kind::Text);
    let schema = samples_schema(kind);
    let mut out = ParquetOut::create(&cfg.out.join(SAMPLES), schema.clone())?;
    for w in 0..state.waves {
        let path = part_path(&parts, w);
        let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        for batch in ParquetRecordBatchReaderBuilder::try_new(file)?.build()? {
            out.write(&RecordBatch::try_new(schema.clone(), batch?.columns().to_vec())?)?;
        }
    }
    out.finish()?;
    let skipped = stream.skipped;
    write_skipped(&cfg.out.join(SKIPPED), &skipped)?;

    let wall = t0.elapsed().as_secs_f64();
    let total = state.prompts_done * cfg.num_samples as u64;
    let mut counts: BTreeMap<String, u64> = state.finish_counts.clone();
    counts.insert("prompts".into(), state.prompts_done);
    counts.insert("samples".into(), total);
    counts.insert("tokens".into(), state.tokens);
    counts.insert("skipped".into(), skipped.len() as u64);
    for (_, _, s) in &skipped {
        *counts.entry(format!("skipped_{}", s.reason)).or_default() += 1;
    }
    let stats = serde_json::json!({"samples_per_s": total as f64 / wall.max(1e-9), "tokens_per_s": tokens_run as f64 / wall.max(1e-9)});
    let manifest = sd.manifest(counts, stats);
    let manifest = sd.finish(manifest, &[SAMPLES, SKIPPED])?;
    let _ = std::fs::remove_dir_all(&parts);
    eprintln!(
        "sample: {total} samples of {} prompts, {} tokens in {wall:.1}s ({:.1} samples/s, {:.1} tokens/s this run) -> {}",
        state.prompts_done,
        state.tokens,
        total as f64 / wall.max(1e-9),
        tokens_run as f64 / wall.max(1e-9),
        cfg.out.join(SAMPLES).display()
    );
    if !skipped.is_empty() {
        eprintln!("sample: {} prompts skipped; see {}", skipped.len(), cfg.out.join(SKIPPED).display());
    }
    Ok(manifest)
}

/// Rows of samples.parquet for one wave of prompts.
fn samples_batch(tok: &ModelTokenizer, kind: Kind, wave: &[Prompt], done: &[Vec<Completion>], eos: &[u32]) -> Result<RecordBatch> {
    let (mut file, mut row, mut index, mut prompt, mut completion, mut finish, mut logp) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut ids = ListBuilder::new(UInt32Builder::new());
    for (p, samples) in wave.iter().zip(done) {
        for (k, c) in samples.iter().enumerate() {
            let text_ids = match c.ids.last() {
                Some(last) if eos.contains(last) => &c.ids[..c.ids.len() - 1],
                _ => &c.ids[..],
            };
            let text = tok.tokenizer.decode(text_ids, true).map_err(|e| anyhow::anyhow!("cannot decode a completion: {e}"))?;
            file.push(p.file.to_string());
            row.push(p.row);
            index.push(k as u32);
            prompt.push(p.prompt.clone());
            completion.push(match kind {
                Kind::Text => Field::Text(text),
                Kind::Messages => Field::Messages(vec![Message::new("assistant", &text)]),
            });
            ids.append_value(c.ids.iter().map(|&x| Some(x)));
            finish.push(c.finish.as_str());
            logp.push(c.logp);
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(file)),
        Arc::new(UInt64Array::from(row)),
        Arc::new(UInt32Array::from(index)),
        fields_array(kind, &prompt)?,
        fields_array(kind, &completion)?,
        Arc::new(ids.finish()),
        Arc::new(StringArray::from(finish)),
        Arc::new(Float64Array::from(logp)),
    ];
    Ok(RecordBatch::try_new(samples_schema(kind), columns)?)
}
