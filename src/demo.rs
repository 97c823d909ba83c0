//! `pipeline demo`: the whole pipeline on a tiny generated model and synthetic preferences,
//! printing held-out reward accuracy and margin before and after training.
use crate::settings::{CacheRefSettings, PrepareSettings, TrainSettings};
use crate::stages;
use crate::synth::model::{init_model, Arch, InitSpec, Size};
use crate::synth::prefs::{eval_path, write_synth, SynthFormat};
use crate::train::metrics;
use crate::train::optim::SchedulerKind;
use anyhow::Result;
use std::path::Path;

pub fn run(dir: &Path, steps: usize, rows: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let model = dir.join("model");
    if !model.join("config.json").exists() {
        init_model(&InitSpec { arch: Arch::Qwen2, size: Size::Tiny, seed: 0 }, &model)?;
        eprintln!("demo: generated a tiny Qwen2 model in {}", model.display());
    }
    let data = dir.join("prefs.parquet");
    if !data.exists() {
        write_synth(&data, rows, 1, SynthFormat::Standard, false)?;
        write_synth(&eval_path(&data), 200, 2, SynthFormat::Standard, false)?;
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
    let train = TrainSettings {
        prepared: prepare.out.clone(),
        ref_cache: cache.out.clone(),
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
    };
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
