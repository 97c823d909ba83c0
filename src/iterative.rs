//! Iterative (on-policy) DPO: rounds of sample → label → prepare → cache-ref → train, as
//! RLHFlow's recipe. Round r samples from round r−1's policy (round 1 from π0), pairs its
//! best and worst samples per prompt, and trains from round r−1's policy with π0 as the
//! reference. Each stage keeps its own directory under `DIR/round<r>/`, so a rerun skips
//! what is done. With held-out prompts, every policy (π0 included) is judged on greedy
//! completions of them: `DIR/rounds.jsonl` and `DIR/rounds.png`.
use crate::data::samples::{read_scores, PREFS, SCORES, SKIPPED};
use crate::settings::{CacheRefLayer, IterativeSection, LabelLayer, PipelineFile, PrepareLayer, SampleLayer, TrainLayer};
use crate::stages;
use crate::train::metrics::Row;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// One round's figures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundResult {
    pub round: usize,
    pub policy: PathBuf,
    pub pairs: Option<u64>,
    pub eval_accuracy: Option<f64>,
    pub eval_mean_score: Option<f64>,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The labeller's settings shared by training labels and held-out judging.
fn labeller(it: &IterativeSection, f: &PipelineFile) -> LabelLayer {
    LabelLayer { judge_cmd: Some(it.judge_cmd.clone()), reward_model: Some(it.reward_model.clone()), ..Default::default() }.over(f.label.clone())
}

/// Greedy completions of the held-out prompts from `policy`, scored: (accuracy, mean score).
fn evaluate(it: &IterativeSection, f: &PipelineFile, policy: &Path, dir: &Path, force: bool) -> Result<Option<(f64, f64)>> {
    if it.eval_prompts.is_empty() {
        return Ok(None);
    }
    let sample = SampleLayer {
        model: Some(policy.to_path_buf()),
        prompts: Some(it.eval_prompts.clone()),
        out: Some(dir.join("eval_samples")),
        temperature: Some(0.0),
        num_samples: Some(1),
        force: Some(force),
        ..Default::default()
    }
    .over(f.sample.clone())
    .resolve();
    stages::sample::run(&sample)?;
    let label = LabelLayer { samples: Some(sample.out.clone()), out: Some(dir.join("eval_labels")), force: Some(force), ..Default::default() }
        .over(labeller(it, f))
        .resolve();
    stages::label::run(&label)?;
    let scores = read_scores(&label.out.join(SCORES))?;
    let n = scores.len().max(1) as f64;
    Ok(Some((scores.iter().filter(|&&x| x >= it.correct_score).count() as f64 / n, scores.iter().sum::<f64>() / n)))
}

pub fn run(f: &PipelineFile, it: &IterativeSection, force: bool) -> Result<Vec<RoundResult>> {
    if it.rounds == 0 {
        bail!("[iterative] rounds must be at least 1");
    }
    if it.judge_cmd.is_some() == it.reward_model.is_some() {
        bail!("[iterative] needs exactly one of judge_cmd and reward_model");
    }
    std::fs::create_dir_all(&it.dir).with_context(|| format!("cannot create {}", it.dir.display()))?;
    let mut policy = it.base_model.clone();
    let mut results = Vec::new();
    let report = |r: &RoundResult| {
        if let (Some(a), Some(m)) = (r.eval_accuracy, r.eval_mean_score) {
            eprintln!("iterative: round {} policy {}: held-out judged accuracy {a:.3}, mean score {m:.3}", r.round, r.policy.display());
        }
    };
    let e = evaluate(it, f, &policy, &it.dir.join("round0"), force)?;
    results.push(RoundResult { round: 0, policy: policy.clone(), pairs: None, eval_accuracy: e.map(|x| x.0), eval_mean_score: e.map(|x| x.1) });
    report(&results[0]);
    for r in 1..=it.rounds {
        let rd = it.dir.join(format!("round{r}"));
        let mut sample = SampleLayer {
            model: Some(policy.clone()),
            prompts: Some(it.prompts.clone()),
            out: Some(rd.join("samples")),
            force: Some(force),
            ..Default::default()
        }
        .over(f.sample.clone())
        .resolve();
        sample.seed = sample.seed.wrapping_add(r as u64); // new draws every round
        stages::sample::run(&sample)?;
        let label = LabelLayer { samples: Some(sample.out.clone()), out: Some(rd.join("labels")), force: Some(force), ..Default::default() }
            .over(labeller(it, f))
            .resolve();
        let labelled = stages::label::run(&label)?;
        // Pairs, or (--pairs unpaired, for KTO) labelled rows.
        let pairs = labelled.counts.get("pairs").or(labelled.counts.get("rows")).copied().unwrap_or(0);
        if pairs == 0 {
            bail!("round {r}: no sample pair had different scores (see {}); nothing to train on", label.out.join(SKIPPED).display());
        }
        let prepare = PrepareLayer {
            inputs: Some(vec![s(&label.out.join(PREFS))]),
            model: Some(it.base_model.clone()),
            out: Some(rd.join("prepared")),
            force: Some(force),
            ..Default::default()
        }
        .over(f.prepare.clone())
        .resolve();
        stages::prepare::run(&prepare)?;
        let cache = CacheRefLayer {
            prepared: Some(prepare.out.clone()),
            model: Some(it.base_model.clone()),
            out: Some(rd.join("ref_cache")),
            force: Some(force),
            ..Default::default()
        }
        .over(f.cache_ref.clone())
        .resolve();
        stages::cache_ref::run(&cache)?;
        let train = TrainLayer {
            prepared: Some(prepare.out.clone()),
            ref_cache: Some(Some(cache.out.clone())),
            model: Some(Some(policy.clone())),
            out: Some(rd.join("train")),
            force: Some(force),
            ..Default::default()
        }
        .over(f.train.clone())
        .resolve();
        stages::train::run(&train)?;
        policy = train.out.join("final");
        let e = evaluate(it, f, &policy, &rd, force)?;
        results.push(RoundResult {
            round: r,
            policy: policy.clone(),
            pairs: Some(pairs),
            eval_accuracy: e.map(|x| x.0),
            eval_mean_score: e.map(|x| x.1),
        });
        report(results.last().expect("pushed"));
    }
    let lines: Vec<String> = results.iter().map(|r| serde_json::to_string(r).expect("serializes")).collect();
    crate::store::write_atomic(&it.dir.join("rounds.jsonl"), (lines.join("\n") + "\n").as_bytes())?;
    if !it.eval_prompts.is_empty() {
        let rows: Vec<(usize, Row)> = results
            .iter()
            .map(|r| {
                (
                    r.round,
                    [
                        ("eval/accuracy".to_string(), r.eval_accuracy.unwrap_or(0.0)),
                        ("eval/mean_score".to_string(), r.eval_mean_score.unwrap_or(0.0)),
                    ]
                    .into(),
                )
            })
            .collect();
        crate::train::plot::panels(
            &it.dir.join("rounds.png"),
            &rows,
            &[("held-out judged accuracy", "accuracy"), ("held-out mean score", "mean_score")],
            "round",
        )?;
    }
    Ok(results)
}
