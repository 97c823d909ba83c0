//! `pipeline label`: scores every sample (a reward model, or a judge command) and pairs each
//! prompt's samples into preference rows that `pipeline prepare` reads as they are (or, with
//! `--pairs unpaired`, labels each sample against `--threshold` for KTO). Writes
//! `scores.parquet` (every sample with its score), `prefs.parquet`, `skipped.parquet` (prompts
//! that gave no pair: ties, fewer than two samples) and the manifest.
use super::{begin, progress, Begin};
use crate::data::input::{fields_array, Field, Kind, Skip};
use crate::data::samples::{
    prefs_schema, samples_file, scores_schema, unpaired_prefs_schema, write_skipped, Sample, SampleReader, SkippedRow, PREFS, SCORES, SKIPPED,
};
use crate::data::tokenize::ModelTokenizer;
use crate::model::reward::RewardModel;
use crate::model::{self, weights};
use crate::settings::{LabelSettings, PairMode};
use crate::store::{file_hash, InputRef, Manifest, ParquetOut};
use anyhow::{bail, Context, Result};
use arrow_array::{ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use indicatif::ProgressBar;
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub const STAGE: &str = "label";
pub const FORMAT_VERSION: u32 = 1;

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

/// Scores samples `done..` with a reward model, in batches of `batch_tokens` planned from the
/// first sample (so a resumed run cuts the same batches), each batch's scores journaled.
fn reward_scores(
    dir: &Path,
    cfg: &LabelSettings,
    tok: &ModelTokenizer,
    samples: impl Iterator<Item = Result<Sample>>,
    batch_tokens: usize,
    journal: &mut Journal,
    pb: &ProgressBar,
) -> Result<()> {
    let rm = RewardModel::load(dir, cfg.compute_dtype().dtype(), cfg.quant().as_ref(), &model::device()?)?;
    let mut batch: Vec<Vec<u32>> = Vec::new();
    let mut n = 0;
    let mut run = |batch: &mut Vec<Vec<u32>>| -> Result<()> {
        let seqs: Vec<&[u32]> = batch.iter().map(|v| v.as_slice()).collect();
        let scores: Vec<f64> = rm.scores(&seqs)?.into_iter().map(f64::from).collect();
        journal.append(&scores)?;
        pb.inc(scores.len() as u64);
        batch.clear();
        Ok(())
    };
    for s in samples {
        let ids = reward_ids(tok, &s?)?;
        if !batch.is_empty() && n + ids.len() > batch_tokens {
            run(&mut batch)?;
            n = 0;
        }
        n += ids.len();
        batch.push(ids);
    }
    if !batch.is_empty() {
        run(&mut batch)?;
    }
    Ok(())
}

/// A field as JSON: a string, or a list of {role, content}.
fn field_json(f: &Field) -> serde_json::Value {
    match f {
        Field::Text(t) => serde_json::Value::String(t.clone()),
        Field::Messages(m) => serde_json::to_value(m).expect("messages serialize"),
    }
}

/// Runs `sh -c CMD` once for samples `done..`: one JSON line {"prompt", "completion"} per
/// sample on its stdin, one number per line read back from its stdout, each journaled as it
/// arrives (a rerun does not ask again for what is already answered).
fn judge_scores(cmd: &str, samples: SampleReader, done: u64, journal: &mut Journal, pb: &ProgressBar) -> Result<()> {
    let expected = samples.total - done;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start --judge-cmd `{cmd}`"))?;
    let mut stdin = std::io::BufWriter::new(child.stdin.take().expect("piped"));
    // Written from another thread, reading the samples itself, so a judge that answers as it
    // reads cannot deadlock on a full pipe, and one that reads everything first still works.
    let writer = std::thread::spawn(move || -> Result<()> {
        for s in samples.into_rows_from(done) {
            let s = s?;
            let line = serde_json::json!({"prompt": field_json(&s.prompt), "completion": field_json(&s.completion)});
            if writeln!(stdin, "{line}").is_err() {
                break; // the judge stopped reading: its exit status says why
            }
        }
        let _ = stdin.flush();
        Ok(())
    });
    let stdout = child.stdout.take().expect("piped");
    let mut got = 0u64;
    for (i, line) in std::io::BufReader::new(stdout).lines().enumerate() {
        let line = line.context("reading --judge-cmd output")?;
        let v: f64 = line.trim().parse().map_err(|_| {
            anyhow::anyhow!("--judge-cmd `{cmd}`: output line {} is `{}`, not a number (one score per input line)", i + 1, line.trim())
        })?;
        if !v.is_finite() {
            bail!("--judge-cmd `{cmd}`: output line {} is {v}; scores must be finite", i + 1);
        }
        journal.append(&[v])?;
        pb.inc(1);
        got += 1;
    }
    let status = child.wait()?;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    writer.join().map_err(|_| anyhow::anyhow!("the judge's input writer panicked"))??;
    if !status.success() {
        bail!("--judge-cmd `{cmd}` failed ({status}): {}", err.trim());
    }
    if got != expected {
        bail!("--judge-cmd `{cmd}` wrote {got} scores for {expected} samples (one number per input line)");
    }
    Ok(())
}

/// Scores as they are computed, appended to `label.parts/scores.txt`: one line per scoring batch
/// (one per judge answer), written whole and flushed, so a killed run loses at most the batch
/// in flight and a rerun continues after the last whole line.
pub struct Journal {
    file: std::fs::File,
    path: PathBuf,
    /// Scores in the journal.
    pub len: u64,
}

pub const PARTS_DIR: &str = "label.parts";
const JOURNAL: &str = "scores.txt";
const JOURNAL_OWNER: &str = "fingerprint";

impl Journal {
    /// The journal of an interrupted run with this fingerprint (a torn last line dropped), or a
    /// new one.
    fn open(out: &Path, fingerprint: &str, force: bool) -> Result<Self> {
        let parts = out.join(PARTS_DIR);
        let path = parts.join(JOURNAL);
        let owner = std::fs::read_to_string(parts.join(JOURNAL_OWNER)).unwrap_or_default();
        if owner.trim() != fingerprint || force {
            if parts.exists() {
                std::fs::remove_dir_all(&parts).with_context(|| format!("cannot clear {}", parts.display()))?;
            }
            std::fs::create_dir_all(&parts).with_context(|| format!("cannot create {}", parts.display()))?;
            crate::store::write_atomic(&parts.join(JOURNAL_OWNER), fingerprint.as_bytes())?;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let whole = text.rfind('\n').map_or(0, |i| i + 1);
        let len = text[..whole].split_ascii_whitespace().count() as u64;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        file.set_len(whole as u64)?;
        if len > 0 {
            eprintln!("label: resuming: {len} samples already scored ({})", path.display());
        }
        Ok(Self { file, path, len })
    }

    fn append(&mut self, scores: &[f64]) -> Result<()> {
        // f64's Display is the shortest text that parses back to the same bits.
        let line = scores.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" ") + "\n";
        self.file.write_all(line.as_bytes()).map_err(|e| crate::store::space::write_error(&self.path, e))?;
        self.len += scores.len() as u64;
        Ok(())
    }

    /// Every journaled score, in sample order.
    fn scores(&self) -> Result<impl Iterator<Item = Result<f64>>> {
        let path = self.path.clone();
        let text = std::io::BufReader::new(std::fs::File::open(&self.path)?);
        Ok(text.lines().flat_map(move |l| {
            let p = path.clone();
            let words: Vec<Result<f64>> = match l {
                Ok(l) => {
                    l.split_ascii_whitespace().map(|w| w.parse::<f64>().with_context(|| format!("{}: `{w}` is not a score", p.display()))).collect()
                }
                Err(e) => vec![Err(e.into())],
            };
            words
        }))
    }
}

/// A preference row: indices into one prompt's samples.
pub struct Pair {
    pub chosen: usize,
    pub rejected: usize,
}

/// Pairs one prompt's samples (with their scores); a prompt that gives none comes back with
/// the reason.
pub fn pair_group(scores: &[f64], mode: PairMode, min_margin: f64) -> Result<Vec<Pair>, Skip> {
    let n = scores.len();
    if n < 2 {
        return Err(Skip::new("too_few_samples", format!("{n} sample(s); a pair needs two")));
    }
    let mut pairs = Vec::new();
    match mode {
        PairMode::BestWorst => {
            // The first of equal best and the first of equal worst, in sample order.
            let best = (0..n).fold(0, |b, i| if scores[i] > scores[b] { i } else { b });
            let worst = (0..n).fold(0, |w, i| if scores[i] < scores[w] { i } else { w });
            if scores[best] - scores[worst] > min_margin {
                pairs.push(Pair { chosen: best, rejected: worst });
            }
        }
        PairMode::AllPairs => {
            for a in 0..n {
                for b in 0..n {
                    if scores[a] - scores[b] > min_margin {
                        pairs.push(Pair { chosen: a, rejected: b });
                    }
                }
            }
        }
        PairMode::Unpaired => unreachable!("unpaired samples are labelled one by one, not paired"),
    }
    if pairs.is_empty() {
        let (lo, hi) = scores.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &x| (lo.min(x), hi.max(x)));
        return Err(Skip::new("tie", format!("{n} samples scored {lo}..{hi}: no two differ by more than --min-margin {min_margin}")));
    }
    Ok(pairs)
}

pub fn run(cfg: &LabelSettings) -> Result<Manifest> {
    cfg.validate()?;
    let mut hub = Vec::new();
    let reward_model = crate::hub::optional_model(cfg.reward_model.as_deref(), &mut hub)?;
    let cfg = &LabelSettings { reward_model, ..cfg.clone() };
    let file = samples_file(&cfg.samples);
    let mut inputs = vec![InputRef::new("samples", &file, &file_hash(&file)?.blake3)];
    let reward_tok = cfg.reward_model.as_deref().map(|m| ModelTokenizer::load(m, crate::data::chat::Date::today())).transpose()?;
    if let (Some(rm), Some(tok)) = (&cfg.reward_model, &reward_tok) {
        inputs.push(InputRef::new("reward_model", rm, &weights::weights_hash(rm)?));
        inputs.extend(tok.identity.iter().cloned());
    }
    let mut settings = serde_json::json!({"judge_cmd": cfg.judge_cmd, "pairs": cfg.pairs, "min_margin": cfg.min_margin});
    if cfg.pairs == PairMode::Unpaired {
        settings["threshold"] = cfg.threshold.into();
    }
    if !hub.is_empty() {
        settings["hub"] = hub.into();
    }
    let sd = match begin(STAGE, FORMAT_VERSION, &cfg.out, inputs, settings, cfg.force)? {
        Begin::UpToDate(m) => return Ok(m),
        Begin::Run(sd) => sd,
    };
    let t0 = Instant::now();
    let reader = SampleReader::open(&file)?;
    let (kind, total) = (reader.kind, reader.total);

    // 1. Scores, journaled as they come: a rerun after a kill scores only the rest.
    let mut journal = Journal::open(&cfg.out, &sd.fingerprint, cfg.force)?;
    let done = journal.len.min(total);
    let pb = progress(total, "label", "samples");
    pb.set_position(done);
    if done < total {
        match (&cfg.reward_model, &reward_tok, &cfg.judge_cmd) {
            // Reward batches are planned from the first sample, so skip whole batches only:
            // the journal ends on a batch boundary.
            (Some(rm), Some(tok), _) => reward_scores(rm, cfg, tok, reader.into_rows_from(done), cfg.batch_tokens, &mut journal, &pb)?,
            (None, _, Some(cmd)) => judge_scores(cmd, reader, done, &mut journal, &pb)?,
            _ => unreachable!("validated"),
        }
    }
    pb.finish_and_clear();
    if journal.len != total {
        bail!("{}: {} scores for {total} samples; rerun with --force", journal.path.display(), journal.len);
    }

    // 2. The outputs, streamed from the samples and the journal: the same bytes however many
    //    times the scoring was interrupted.
    let mut out = LabelWriter::create(&cfg.out, kind, cfg.pairs == PairMode::Unpaired)?;
    let mut scores = journal.scores()?;
    let mut group: Vec<(Sample, f64)> = Vec::new();
    let mut sum = 0.0f64;
    for s in SampleReader::open(&file)?.into_rows_from(0) {
        let s = s?;
        let score = scores.next().context("the score journal ended early; rerun with --force")??;
        sum += score;
        out.score(&s, score);
        if group.last().is_some_and(|(g, _)| (g.source_file.as_str(), g.source_row) != (s.source_file.as_str(), s.source_row)) {
            out.close_group(std::mem::take(&mut group), cfg)?;
        }
        group.push((s, score));
        out.flush_if_full()?;
    }
    if !group.is_empty() {
        out.close_group(group, cfg)?;
    }
    let out_desirable = out.desirable;
    let (prompts, pairs, skipped) = out.finish()?;

    let unit = if cfg.pairs == PairMode::Unpaired { "rows" } else { "pairs" };
    let mut counts: BTreeMap<String, u64> =
        [("samples".to_string(), total), ("prompts".into(), prompts), (unit.into(), pairs), ("skipped".into(), skipped.len() as u64)].into();
    if cfg.pairs == PairMode::Unpaired {
        counts.insert("desirable".into(), out_desirable);
        counts.insert("undesirable".into(), pairs - out_desirable);
    }
    for (_, _, s) in &skipped {
        *counts.entry(format!("skipped_{}", s.reason)).or_default() += 1;
    }
    let mean = sum / total.max(1) as f64;
    let stats = serde_json::json!({"mean_score": mean, "samples_per_s": (total - done) as f64 / t0.elapsed().as_secs_f64().max(1e-9)});
    let manifest = sd.manifest(counts, stats);
    let manifest = sd.finish(manifest, &[SCORES, PREFS, SKIPPED])?;
    let _ = std::fs::remove_dir_all(cfg.out.join(PARTS_DIR));
    eprintln!(
        "label: {total} samples of {prompts} prompts scored (mean {mean:.4}), {pairs} {} -> {}{}",
        if cfg.pairs == PairMode::Unpaired { format!("unpaired rows ({out_desirable} above --threshold {})", cfg.threshold) } else { "pairs".into() },
        cfg.out.join(PREFS).display(),
        if skipped.is_empty() {
            String::new()
        } else {
            format!("; {} prompts gave no pair (see {})", skipped.len(), cfg.out.join(SKIPPED).display())
        }
    );
    Ok(manifest)
}

/// Rows buffered before they go to the parquet writers (whose row groups bound the rest).
const FLUSH_ROWS: usize = 1024;

/// scores.parquet, prefs.parquet and skipped.parquet, written as samples and groups arrive.
struct LabelWriter {
    kind: Kind,
    scores: ParquetOut,
    prefs: ParquetOut,
    skipped_path: PathBuf,
    scored: Vec<(Sample, f64)>,
    paired: Vec<(Sample, Sample, f64, f64)>,
    /// `--pairs unpaired`: each sample, its score and label.
    unpaired: Option<Vec<(Sample, f64, bool)>>,
    desirable: u64,
    pairs: u64,
    skipped: Vec<SkippedRow>,
    /// The prompts whose samples were paired (a prompt seen again is out of order).
    prompts: std::collections::HashSet<(String, u64)>,
}

impl LabelWriter {
    fn create(out: &Path, kind: Kind, unpaired: bool) -> Result<Self> {
        Ok(Self {
            kind,
            scores: ParquetOut::create(&out.join(SCORES), scores_schema(kind))?,
            prefs: ParquetOut::create(&out.join(PREFS), if unpaired { unpaired_prefs_schema(kind) } else { prefs_schema(kind) })?,
            skipped_path: out.join(SKIPPED),
            scored: vec![],
            paired: vec![],
            unpaired: unpaired.then(Vec::new),
            desirable: 0,
            pairs: 0,
            skipped: vec![],
            prompts: Default::default(),
        })
    }

    fn score(&mut self, s: &Sample, score: f64) {
        self.scored.push((s.clone(), score));
    }

    /// Pairs a prompt's samples. Pairing needs each prompt's samples together: `sample` writes
    /// them so; a file where they are not is refused rather than paired wrongly.
    fn close_group(&mut self, group: Vec<(Sample, f64)>, cfg: &LabelSettings) -> Result<()> {
        let first = &group[0].0;
        if !self.prompts.insert((first.source_file.clone(), first.source_row)) {
            bail!(
                "{}: the samples of {} row {} are not in consecutive rows; label pairs each prompt's samples together \
                 (as `pipeline sample` writes them): sort the file by source_file, source_row",
                samples_file(&cfg.samples).display(),
                first.source_file,
                first.source_row
            );
        }
        if let Some(rows) = &mut self.unpaired {
            for (sample, score) in group {
                let label = score > cfg.threshold;
                self.desirable += u64::from(label);
                self.pairs += 1;
                rows.push((sample, score, label));
            }
            return Ok(());
        }
        let scores: Vec<f64> = group.iter().map(|g| g.1).collect();
        match pair_group(&scores, cfg.pairs, cfg.min_margin) {
            Ok(pairs) => {
                for p in pairs {
                    let (c, r) = (&group[p.chosen], &group[p.rejected]);
                    self.paired.push((c.0.clone(), r.0.clone(), c.1, r.1));
                    self.pairs += 1;
                }
            }
            Err(skip) => self.skipped.push((Arc::from(first.source_file.as_str()), first.source_row, skip)),
        }
        Ok(())
    }

    fn flush_if_full(&mut self) -> Result<()> {
        if self.scored.len() >= FLUSH_ROWS {
            self.flush_scores()?;
        }
        if self.paired.len() >= FLUSH_ROWS || self.unpaired.as_ref().is_some_and(|u| u.len() >= FLUSH_ROWS) {
            self.flush_prefs()?;
        }
        Ok(())
    }

    fn flush_scores(&mut self) -> Result<()> {
        if self.scored.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.scored);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(rows.iter().map(|s| s.0.source_file.clone()).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(rows.iter().map(|s| s.0.source_row).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(rows.iter().map(|s| s.0.sample_index).collect::<Vec<_>>())),
            fields_array(self.kind, rows.iter().map(|s| &s.0.prompt))?,
            fields_array(self.kind, rows.iter().map(|s| &s.0.completion))?,
            Arc::new(Float64Array::from(rows.iter().map(|s| s.1).collect::<Vec<_>>())),
        ];
        self.scores.write(&RecordBatch::try_new(scores_schema(self.kind), columns)?)
    }

    fn flush_prefs(&mut self) -> Result<()> {
        if let Some(rows) = self.unpaired.as_mut().filter(|u| !u.is_empty()) {
            let rows = std::mem::take(rows);
            let columns: Vec<ArrayRef> = vec![
                fields_array(self.kind, rows.iter().map(|r| &r.0.prompt))?,
                fields_array(self.kind, rows.iter().map(|r| &r.0.completion))?,
                Arc::new(BooleanArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())),
                Arc::new(Float64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())),
                Arc::new(StringArray::from(rows.iter().map(|r| r.0.source_file.clone()).collect::<Vec<_>>())),
                Arc::new(UInt64Array::from(rows.iter().map(|r| r.0.source_row).collect::<Vec<_>>())),
                Arc::new(UInt32Array::from(rows.iter().map(|r| r.0.sample_index).collect::<Vec<_>>())),
            ];
            return self.prefs.write(&RecordBatch::try_new(unpaired_prefs_schema(self.kind), columns)?);
        }
        if self.paired.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.paired);
        let columns: Vec<ArrayRef> = vec![
            fields_array(self.kind, rows.iter().map(|p| &p.0.prompt))?,
            fields_array(self.kind, rows.iter().map(|p| &p.0.completion))?,
            fields_array(self.kind, rows.iter().map(|p| &p.1.completion))?,
            Arc::new(Float64Array::from(rows.iter().map(|p| p.2).collect::<Vec<_>>())),
            Arc::new(Float64Array::from(rows.iter().map(|p| p.3).collect::<Vec<_>>())),
            Arc::new(StringArray::from(rows.iter().map(|p| p.0.source_file.clone()).collect::<Vec<_>>())),
            Arc::new(UInt64Array::from(rows.iter().map(|p| p.0.source_row).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(rows.iter().map(|p| p.0.sample_index).collect::<Vec<_>>())),
            Arc::new(UInt32Array::from(rows.iter().map(|p| p.1.sample_index).collect::<Vec<_>>())),
        ];
        self.prefs.write(&RecordBatch::try_new(prefs_schema(self.kind), columns)?)
    }

    /// Writes what is buffered and commits the three files: (prompts, pairs, skipped prompts).
    fn finish(mut self) -> Result<(u64, u64, Vec<SkippedRow>)> {
        self.flush_scores()?;
        self.flush_prefs()?;
        self.scores.finish()?;
        self.prefs.finish()?;
        write_skipped(&self.skipped_path, &self.skipped)?;
        Ok((self.prompts.len() as u64, self.pairs, self.skipped))
    }
}
