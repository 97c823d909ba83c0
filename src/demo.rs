//! `pipeline demo`: the whole pipeline on a tiny generated model and synthetic preferences,
//! printing held-out reward accuracy and margin before and after training.
use crate::settings::{CacheRefSettings, PrepareSettings, TrainSettings};
use crate::stages;
use crate::synth::model::{init_model, Arch, InitSpec, Size};
use crate::synth::prefs::{eval_path, write_synth, Length, SynthFormat};
use crate::train::metrics;
use crate::train::optim::SchedulerKind;
use anyhow::Result;
use std::path::Path;

/// `pipeline demo --iterative`: closes the loop on the synthetic task. π0 is the demo's model
/// trained offline with DPO plus an SFT term on the chosen answers (RPO; DPO alone teaches a
/// tiny random model to rank answers, not to write them), then rounds of sample → label (the
/// task's judge, `pipeline synth-judge`) → train from the last policy with π0 as reference.
/// Prints the held-out judged accuracy per round and plots it (`DIR/iterative/rounds.png`).
/// `pipeline run pipelines/iterative.toml` runs the same rounds after it.
pub fn run_iterative(dir: &Path, steps: usize, rows: usize, rounds: usize) -> Result<()> {
    if !dir.join("train/final/config.json").exists() {
        run(dir, steps, rows)?;
    }
    let it_dir = dir.join("iterative");
    std::fs::create_dir_all(&it_dir)?;
    let pi0 = TrainSettings {
        prepared: dir.join("prepared"),
        ref_cache: Some(dir.join("ref_cache")),
        out: it_dir.join("pi0"),
        loss: "sigmoid,sft".parse()?,
        ..demo_train(dir, steps)
    };
    stages::train::run(&pi0)?;
    let (prompts, eval) = (it_dir.join("prompts.parquet"), it_dir.join("eval_prompts.parquet"));
    if !prompts.exists() {
        write_synth(&prompts, 1024, 3, SynthFormat::Standard, Length::Short)?;
        write_synth(&eval, 200, 4, SynthFormat::Standard, Length::Short)?;
    }
    let exe = std::env::current_exe()?;
    let file: crate::settings::PipelineFile = toml::from_str(ITERATIVE_SETTINGS)?;
    let section = crate::settings::IterativeSection {
        rounds,
        base_model: pi0.out.join("final"),
        prompts: vec![prompts.display().to_string()],
        eval_prompts: vec![eval.display().to_string()],
        dir: it_dir.clone(),
        judge_cmd: Some(format!("'{}' synth-judge", exe.display())),
        reward_model: None,
        correct_score: 1.0,
    };
    let results = crate::iterative::run(&file, &section, false)?;
    println!("round  pairs  held-out judged accuracy  mean score");
    for r in &results {
        println!(
            "{:>5}  {:>5}  {:>24.3}  {:>10.3}",
            r.round,
            r.pairs.map_or("-".to_string(), |p| p.to_string()),
            r.eval_accuracy.unwrap_or(f64::NAN),
            r.eval_mean_score.unwrap_or(f64::NAN)
        );
    }
    println!("(accuracy: greedy completions of 200 held-out prompts that state the right answer and no other)");
    println!("outputs: {} (rounds.jsonl, rounds.png, round<r>/...)", it_dir.display());
    Ok(())
}

/// The stage settings of the demo's rounds; pipelines/iterative.toml holds the same (a test
/// checks they agree).
pub const ITERATIVE_SETTINGS: &str = r#"
[sample]
num_samples = 8
max_new_tokens = 12
temperature = 1.0

[label]
pairs = "best-worst"

[prepare]
max_length = 128

[train]
lr = 2e-3
beta = 0.1
loss = "sigmoid,sft"
batch_size = 16
max_steps = 150
warmup_steps = 15
eval_every = 0
save_every = 150
"#;

/// The demo's training settings.
fn demo_train(dir: &Path, steps: usize) -> TrainSettings {
    TrainSettings {
        prepared: dir.join("prepared"),
        ref_cache: Some(dir.join("ref_cache")),
        out: dir.join("train"),
        lr: 2e-3,
        beta: 0.1,
        batch_size: 16,
        max_steps: Some(steps),
        warmup_steps: steps / 10,
        scheduler: SchedulerKind::Linear,
        eval_every: (steps / 5).max(1),
        save_every: steps,
        force: true,
        ..Default::default()
    }
}

pub fn run(dir: &Path, steps: usize, rows: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let model = dir.join("model");
    if !model.join("config.json").exists() {
        init_model(&InitSpec { arch: Arch::Qwen2, size: Size::Tiny, seed: 0, dtype: crate::model::weights::FloatDtype::F32 }, &model)?;
        eprintln!("demo: generated a tiny Qwen2 model in {}", model.display());
    }
    let data = dir.join("prefs.parquet");
    if !data.exists() {
        write_synth(&data, rows, 1, SynthFormat::Standard, Length::Short)?;
        write_synth(&eval_path(&data), 200, 2, SynthFormat::Standard, Length::Short)?;
        eprintln!("demo: generated {rows} synthetic preference rows (+200 held out) in {}", data.display());
    }
    let prepare = PrepareSettings {
        inputs: vec![data.display().to_string()],
        eval_inputs: vec![eval_path(&data).display().to_string()],
        model: model.clone(),
        out: dir.join("prepared"),
        max_length: 128,
        ..Default::default()
    };
    stages::prepare::run(&prepare)?;
    let cache = CacheRefSettings { prepared: prepare.out.clone(), model: model.clone(), out: dir.join("ref_cache"), ..Default::default() };
    stages::cache_ref::run(&cache)?;
    let train = demo_train(dir, steps);
    stages::train::run(&train)?;
    let rows = metrics::read_jsonl(&train.out.join("metrics.jsonl"), usize::MAX)?;
    let eval: Vec<_> = rows.iter().filter(|(_, r)| r.contains_key("eval/rewards/accuracies")).collect();
    if let (Some((s0, first)), Some((s1, last))) = (eval.first(), eval.last()) {
        println!(
            "held-out reward accuracy: {:.3} (step {s0}) -> {:.3} (step {s1})",
            first["eval/rewards/accuracies"], last["eval/rewards/accuracies"]
        );
        println!("held-out reward margin:   {:.3} (step {s0}) -> {:.3} (step {s1})", first["eval/rewards/margins"], last["eval/rewards/margins"]);
        println!("held-out DPO loss:        {:.3} (step {s0}) -> {:.3} (step {s1})", first["eval/loss"], last["eval/loss"]);
        println!("(at step 0 the policy is the reference: every reward is 0, so accuracy, which counts strict wins, only measures rounding)");
    }
    println!("outputs: {} (metrics.parquet, curves.png, final/)", train.out.display());
    Ok(())
}
