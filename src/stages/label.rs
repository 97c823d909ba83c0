//! `pipeline label`: scores every sample (a reward model, or a judge command) and pairs each
//! prompt's samples into preference rows that `pipeline prepare` reads as they are. Writes
//! `scores.parquet` (every sample with its score), `prefs.parquet`, `skipped.parquet` (prompts
//! that gave no pair: ties, fewer than two samples) and the manifest.
use super::sample::{write_skipped, SAMPLES};
use super::{begin, progress, Begin};
use crate::data::input::{field_at, fields_array, kind_of, str_at, uint_at, Field, Kind, Skip};
use crate::data::tokenize::ModelTokenizer;
use crate::model::reward::RewardModel;
use crate::model::{self, weights};
use crate::settings::{LabelSettings, PairMode};
use crate::store::{file_hash, InputRef, Manifest, ParquetOut};
use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field as ArrowField, Schema};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const STAGE: &str = "label";
pub const FORMAT_VERSION: u32 = 1;
pub const SCORES: &str = "scores.parquet";
pub const PREFS: &str = "prefs.parquet";
pub const SKIPPED: &str = "skipped.parquet";

/// One row of samples.parquet.
pub struct Sample {
    pub source_file: String,
    pub source_row: u64,
    pub sample_index: u32,
    pub prompt: Field,
    pub completion: Field,
}

/// `--samples`: a sample directory or its samples.parquet.
fn samples_file(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join(SAMPLES)
    } else {
        p.to_path_buf()
    }
}

/// Reads samples.parquet (the columns `sample` writes; prompt and completion strings or
/// message lists).
pub fn read_samples(path: &Path) -> Result<(Kind, Vec<Sample>)> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let schema = builder.schema().clone();
    let column = |name: &str| {
        schema
            .field_with_name(name)
            .map_err(|_| anyhow::anyhow!("{}: no column `{name}`: is it the samples.parquet of `pipeline sample`?", path.display()))
    };
    let kind = kind_of(path, "prompt", column("prompt")?.data_type())?;
    let ckind = kind_of(path, "completion", column("completion")?.data_type())?;
    if kind != ckind {
        bail!("{}: `prompt` and `completion` must both be strings or both be message lists", path.display());
    }
    for name in ["source_file", "source_row", "sample_index"] {
        column(name)?;
    }
    let mut out = Vec::new();
    for batch in builder.build()? {
        let batch = batch.with_context(|| format!("{}: cannot decode row group", path.display()))?;
        let col = |n: &str| batch.column_by_name(n).expect("checked").clone();
        let (file, row, index, prompt, completion) = (col("source_file"), col("source_row"), col("sample_index"), col("prompt"), col("completion"));
        for i in 0..batch.num_rows() {
            let at = out.len();
            let field =
                |a: &ArrayRef, name: &str| field_at(a, kind, i, name).map_err(|s| anyhow::anyhow!("{}: row {at}: {}", path.display(), s.detail));
            let bad = |name: &str, what: &str| anyhow::anyhow!("{}: row {at}: column `{name}` is not {what}", path.display());
            out.push(Sample {
                source_file: str_at(file.as_ref(), i).ok_or_else(|| bad("source_file", "a string"))?.to_string(),
                source_row: uint_at(row.as_ref(), i).ok_or_else(|| bad("source_row", "a non-negative integer"))?,
                sample_index: uint_at(index.as_ref(), i).ok_or_else(|| bad("sample_index", "a non-negative integer"))? as u32,
                prompt: field(&prompt, "prompt")?,
                completion: field(&completion, "completion")?,
            });
        }
    }
    Ok((kind, out))
}

/// Token ids a reward model reads: prompt + completion as one text (special tokens added), or
/// the conversation with the completion's messages, chat-templated without a generation prompt.
fn reward_ids(tok: &ModelTokenizer, s: &Sample) -> Result<Vec<u32>> {
    Ok(match (&s.prompt, &s.completion) {
        (Field::Text(p), Field::Text(c)) => tok.encode(&format!("{p}{c}"), true),
        (Field::Messages(p), Field::Messages(c)) => {
            anyhow::ensure!(tok.template.is_some(), "conversational samples need the reward model's chat template, and it has none");
            tok.encode_chat(&[p.as_slice(), c.as_slice()].concat(), false, None, None).map_err(|e| anyhow::anyhow!("chat template: {}", e.detail))?
        }
        _ => bail!("prompt and completion of a sample differ in format"),
    })
}

fn reward_scores(dir: &Path, tok: &ModelTokenizer, samples: &[Sample], batch_tokens: usize) -> Result<Vec<f64>> {
    let rm = RewardModel::load(dir, candle_core::DType::F32, &model::device()?)?;
    let ids: Vec<Vec<u32>> = samples.iter().map(|s| reward_ids(tok, s)).collect::<Result<_>>()?;
    let pb = progress(samples.len() as u64, "label", "samples");
    let mut out = Vec::with_capacity(samples.len());
    let mut start = 0;
    while start < ids.len() {
        let mut end = start + 1;
        let mut n = ids[start].len();
        while end < ids.len() && n + ids[end].len() <= batch_tokens {
            n += ids[end].len();
            end += 1;
        }
        let seqs: Vec<&[u32]> = ids[start..end].iter().map(|v| v.as_slice()).collect();
        out.extend(rm.scores(&seqs)?.into_iter().map(f64::from));
        pb.inc((end - start) as u64);
        start = end;
    }
    pb.finish_and_clear();
    Ok(out)
}

/// A field as JSON: a string, or a list of {role, content}.
fn field_json(f: &Field) -> serde_json::Value {
    match f {
        Field::Text(t) => serde_json::Value::String(t.clone()),
        Field::Messages(m) => serde_json::to_value(m).expect("messages serialize"),
    }
}

/// Runs `sh -c CMD`, writing one JSON line {"prompt", "completion"} per sample to its stdin and
/// reading one number per line from its stdout.
pub fn judge_scores(cmd: &str, samples: &[Sample]) -> Result<Vec<f64>> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start --judge-cmd `{cmd}`"))?;
    let mut stdin = child.stdin.take().expect("piped");
    let lines: Vec<String> =
        samples.iter().map(|s| serde_json::json!({"prompt": field_json(&s.prompt), "completion": field_json(&s.completion)}).to_string()).collect();
    // Written from another thread so a judge that answers as it reads cannot deadlock on a full pipe.
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for l in lines {
            writeln!(stdin, "{l}")?;
        }
        Ok(())
    });
    let stdout = child.stdout.take().expect("piped");
    let mut scores = Vec::with_capacity(samples.len());
    for (i, line) in std::io::BufReader::new(stdout).lines().enumerate() {
        let line = line.context("reading --judge-cmd output")?;
        let v: f64 = line.trim().parse().map_err(|_| {
            anyhow::anyhow!("--judge-cmd `{cmd}`: output line {} is `{}`, not a number (one score per input line)", i + 1, line.trim())
        })?;
        if !v.is_finite() {
            bail!("--judge-cmd `{cmd}`: output line {} is {v}; scores must be finite", i + 1);
        }
        scores.push(v);
    }
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    let _ = writer.join();
    if !status.success() {
        bail!("--judge-cmd `{cmd}` failed ({status}): {}", err.trim());
    }
    if scores.len() != samples.len() {
        bail!("--judge-cmd `{cmd}` wrote {} scores for {} samples (one number per input line)", scores.len(), samples.len());
    }
    Ok(scores)
}

/// A preference row: indices into the samples.
pub struct Pair {
    pub chosen: usize,
    pub rejected: usize,
}

/// Pairs each prompt's samples; prompts that give none come back with the reason.
pub fn make_pairs(samples: &[Sample], scores: &[f64], mode: PairMode, min_margin: f64) -> (Vec<Pair>, Vec<(usize, Skip)>) {
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut index: BTreeMap<(&str, u64), usize> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        let g = *index.entry((&s.source_file, s.source_row)).or_insert_with(|| {
            groups.push(vec![]);
            groups.len() - 1
        });
        groups[g].push(i);
    }
    let (mut pairs, mut skipped) = (Vec::new(), Vec::new());
    for g in groups {
        if g.len() < 2 {
            skipped.push((g[0], Skip::new("too_few_samples", format!("{} sample(s); a pair needs two", g.len()))));
            continue;
        }
        let before = pairs.len();
        match mode {
            PairMode::BestWorst => {
                // The first of equal best and the first of equal worst, in sample order.
                let best = g.iter().copied().fold(g[0], |b, i| if scores[i] > scores[b] { i } else { b });
                let worst = g.iter().copied().fold(g[0], |w, i| if scores[i] < scores[w] { i } else { w });
                if scores[best] - scores[worst] > min_margin {
                    pairs.push(Pair { chosen: best, rejected: worst });
                }
            }
            PairMode::AllPairs => {
                for &a in &g {
                    for &b in &g {
                        if scores[a] - scores[b] > min_margin {
                            pairs.push(Pair { chosen: a, rejected: b });
                        }
                    }
                }
            }
        }
        if pairs.len() == before {
            let (lo, hi) = g.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &i| (lo.min(scores[i]), hi.max(scores[i])));
            skipped.push((
                g[0],
                Skip::new("tie", format!("{} samples scored {lo}..{hi}: no two differ by more than --min-margin {min_margin}", g.len())),
            ));
        }
    }
    (pairs, skipped)
}

pub fn run(cfg: &LabelSettings) -> Result<Manifest> {
    cfg.validate()?;
    let file = samples_file(&cfg.samples);
    let mut inputs = vec![InputRef::new("samples", &file, &file_hash(&file)?.blake3)];
    let reward_tok = cfg.reward_model.as_deref().map(|m| ModelTokenizer::load(m, crate::data::chat::Date::today())).transpose()?;
    if let (Some(rm), Some(tok)) = (&cfg.reward_model, &reward_tok) {
        inputs.push(InputRef::new("reward_model", rm, &weights::weights_hash(rm)?));
        inputs.extend(tok.identity.iter().cloned());
    }
    let settings = serde_json::json!({"judge_cmd": cfg.judge_cmd, "pairs": cfg.pairs, "min_margin": cfg.min_margin});
    let sd = match begin(STAGE, FORMAT_VERSION, &cfg.out, inputs, settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let t0 = Instant::now();
    let (kind, samples) = read_samples(&file)?;
    let scores = match (&cfg.reward_model, &reward_tok, &cfg.judge_cmd) {
        (Some(rm), Some(tok), _) => reward_scores(rm, tok, &samples, cfg.batch_tokens)?,
        (None, _, Some(cmd)) => judge_scores(cmd, &samples)?,
        _ => unreachable!("validated"),
    };
    let (pairs, skipped) = make_pairs(&samples, &scores, cfg.pairs, cfg.min_margin);
    write_scores(&cfg.out.join(SCORES), kind, &samples, &scores)?;
    write_prefs(&cfg.out.join(PREFS), kind, &samples, &scores, &pairs)?;
    let skipped_rows: Vec<(Arc<str>, u64, Skip)> =
        skipped.iter().map(|(i, s)| (Arc::from(samples[*i].source_file.as_str()), samples[*i].source_row, s.clone())).collect();
    write_skipped(&cfg.out.join(SKIPPED), &skipped_rows)?;

    let prompts = samples.iter().map(|s| (&s.source_file, s.source_row)).collect::<std::collections::BTreeSet<_>>().len() as u64;
    let mut counts: BTreeMap<String, u64> = [
        ("samples".to_string(), samples.len() as u64),
        ("prompts".into(), prompts),
        ("pairs".into(), pairs.len() as u64),
        ("skipped".into(), skipped.len() as u64),
    ]
    .into();
    for (_, s) in &skipped {
        *counts.entry(format!("skipped_{}", s.reason)).or_default() += 1;
    }
    let mean = scores.iter().sum::<f64>() / scores.len().max(1) as f64;
    let stats = serde_json::json!({"mean_score": mean, "samples_per_s": samples.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9)});
    let manifest = sd.manifest(counts, stats);
    let manifest = sd.finish(manifest, &[SCORES, PREFS, SKIPPED])?;
    eprintln!(
        "label: {} samples of {prompts} prompts scored (mean {mean:.4}), {} pairs -> {}{}",
        samples.len(),
        pairs.len(),
        cfg.out.join(PREFS).display(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; {} prompts gave no pair (see {})", skipped.len(), cfg.out.join(SKIPPED).display())
        }
    );
    Ok(manifest)
}

/// The `score` column of a scores.parquet.
pub fn read_scores(path: &Path) -> Result<Vec<f64>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).with_context(|| format!("{}: not a readable parquet file", path.display()))?;
    let mask = parquet::arrow::ProjectionMask::columns(builder.parquet_schema(), ["score"]);
    let mut out = Vec::new();
    for batch in builder.with_projection(mask).build()? {
        let batch = batch?;
        let col = batch.column_by_name("score").with_context(|| format!("{}: no `score` column", path.display()))?;
        let col = col.as_any().downcast_ref::<Float64Array>().with_context(|| format!("{}: `score` is not f64", path.display()))?;
        out.extend(col.values().iter().copied());
    }
    Ok(out)
}

fn write_scores(path: &Path, kind: Kind, samples: &[Sample], scores: &[f64]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        ArrowField::new("source_file", DataType::Utf8, false),
        ArrowField::new("source_row", DataType::UInt64, false),
        ArrowField::new("sample_index", DataType::UInt32, false),
        ArrowField::new("prompt", kind.data_type(), false),
        ArrowField::new("completion", kind.data_type(), false),
        ArrowField::new("score", DataType::Float64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(samples.iter().map(|s| s.source_file.clone()).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(samples.iter().map(|s| s.source_row).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(samples.iter().map(|s| s.sample_index).collect::<Vec<_>>())),
        fields_array(kind, samples.iter().map(|s| &s.prompt))?,
        fields_array(kind, samples.iter().map(|s| &s.completion))?,
        Arc::new(Float64Array::from(scores.to_vec())),
    ];
    let mut out = ParquetOut::create(path, schema.clone())?;
    out.write(&RecordBatch::try_new(schema, columns)?)?;
    out.finish()
}

fn write_prefs(path: &Path, kind: Kind, samples: &[Sample], scores: &[f64], pairs: &[Pair]) -> Result<()> {
    let schema = Arc::new(Schema::new(vec![
        ArrowField::new("prompt", kind.data_type(), false),
        ArrowField::new("chosen", kind.data_type(), false),
        ArrowField::new("rejected", kind.data_type(), false),
        ArrowField::new("chosen_score", DataType::Float64, false),
        ArrowField::new("rejected_score", DataType::Float64, false),
        ArrowField::new("source_file", DataType::Utf8, false),
        ArrowField::new("source_row", DataType::UInt64, false),
        ArrowField::new("chosen_sample_index", DataType::UInt32, false),
        ArrowField::new("rejected_sample_index", DataType::UInt32, false),
    ]));
    let (c, r): (Vec<&Sample>, Vec<&Sample>) = pairs.iter().map(|p| (&samples[p.chosen], &samples[p.rejected])).unzip();
    let columns: Vec<ArrayRef> = vec![
        fields_array(kind, c.iter().map(|s| &s.prompt))?,
        fields_array(kind, c.iter().map(|s| &s.completion))?,
        fields_array(kind, r.iter().map(|s| &s.completion))?,
        Arc::new(Float64Array::from(pairs.iter().map(|p| scores[p.chosen]).collect::<Vec<_>>())),
        Arc::new(Float64Array::from(pairs.iter().map(|p| scores[p.rejected]).collect::<Vec<_>>())),
        Arc::new(StringArray::from(c.iter().map(|s| s.source_file.clone()).collect::<Vec<_>>())),
        Arc::new(UInt64Array::from(c.iter().map(|s| s.source_row).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(c.iter().map(|s| s.sample_index).collect::<Vec<_>>())),
        Arc::new(UInt32Array::from(r.iter().map(|s| s.sample_index).collect::<Vec<_>>())),
    ];
    let mut out = ParquetOut::create(path, schema.clone())?;
    out.write(&RecordBatch::try_new(schema, columns)?)?;
    out.finish()
}
