//! The command line as a user meets it: help, `pipeline run` on a TOML, skipping finished stages.
mod common;
use common::*;

#[test]
fn help_explains_every_stage() {
    let d = tmp();
    let top = ok_stdout(d.path(), &["--help"]);
    for cmd in ["prepare", "cache-ref", "merge-ref", "train", "merge-lora", "run", "demo", "init-model", "synth-prefs"] {
        assert!(top.contains(cmd), "--help lists {cmd}");
    }
    let prep = ok_stdout(d.path(), &["prepare", "--help"]);
    for flag in ["--input", "--model", "--max-length", "--eval-fraction", "--prompt-column", "--force"] {
        assert!(prep.contains(flag), "prepare --help lists {flag}");
    }
    let train = ok_stdout(d.path(), &["train", "--help"]);
    for flag in [
        "--loss", "--loss-weights", "--beta", "--label-smoothing", "--f-divergence", "--use-weighting", "--ld-alpha", "--simpo-gamma", "--cpo-alpha",
        "--scheduler", "--grad-accum", "--resume", "--ref-in-loop", "--lora-r", "--adapter", "--base-dtype", "--gradient-checkpointing",
        "--batch-tokens", "--max-memory",
    ] {
        assert!(train.contains(flag), "train --help lists {flag}");
    }
}

fn ok_stdout(dir: &std::path::Path, args: &[&str]) -> String {
    let out = run_in(dir, args);
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn run_executes_a_pipeline_toml_and_skips_what_is_up_to_date() {
    let d = tmp();
    let model = tiny_model(d.path(), "llama");
    ok(d.path(), &["synth-prefs", "--out", "data.parquet", "--rows", "80", "--conversational"]);
    std::fs::write(
        d.path().join("p.toml"),
        format!(
            r#"
[prepare]
inputs = ["data.parquet"]
model = "{}"
out = "out/prepared"
eval_fraction = 0.25

[cache_ref]
out = "out/ref_cache"

[train]
out = "out/train"
lr = 1e-3
batch_size = 4
max_steps = 3
eval_every = 3
"#,
            s(&model)
        ),
    )
    .unwrap();
    let first = ok(d.path(), &["run", "p.toml"]);
    assert!(first.contains("prepare: 80 pairs") && first.contains("cache-ref: 80 pairs") && first.contains("train: 3 steps"), "{first}");
    let second = ok(d.path(), &["run", "p.toml"]);
    assert_eq!(second.matches("up to date").count(), 3, "{second}");
    let e = fails(d.path(), &["run", "missing.toml"]);
    assert!(e.contains("missing.toml"), "{e}");
    std::fs::write(d.path().join("bad.toml"), "[prepare]\nmax_lenght = 3\n").unwrap();
    let e = fails(d.path(), &["run", "bad.toml"]);
    assert!(e.contains("bad.toml") && e.contains("max_lenght"), "{e}");
    // Changed settings over finished outputs: refused, then redone with --force.
    let toml = std::fs::read_to_string(d.path().join("p.toml")).unwrap().replace("max_steps = 3", "max_steps = 2");
    std::fs::write(d.path().join("p.toml"), toml).unwrap();
    let e = fails(d.path(), &["run", "p.toml"]);
    assert!(e.contains("out/train") && e.contains("--force"), "{e}");
    let e = ok(d.path(), &["run", "p.toml", "--force"]);
    assert!(e.contains("train: 2 steps"), "{e}");
}

/// The shipped pipeline files parse and pass validation (they stop at the missing data).
#[test]
fn shipped_pipeline_files_are_valid() {
    let d = tmp();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
    for f in std::fs::read_dir(dir).unwrap() {
        let f = f.unwrap().path();
        if std::fs::read_to_string(&f).unwrap().contains("[iterative]") {
            // Rounds fill in each stage's inputs; the whole file stops at the missing prompts.
            let e = fails(d.path(), &["run", s(&f)]);
            assert!(e.contains("no such file"), "{}: {e}", f.display());
            continue;
        }
        for stage in ["prepare", "cache-ref", "train"] {
            let e = fails(d.path(), &[stage, "--config", s(&f)]);
            assert!(e.contains("no such file") || e.contains("no manifest.json") || e.contains("config.json"), "{stage} {}: {e}", f.display());
        }
    }
}

/// Every boolean flag takes an optional value (`--force` is `--force true`, and `false` turns it
/// off), dtypes take torch's names too, a usage error is one `error:` line with exit status 1,
/// and `train --help` lists the loss types from the loss table.
#[test]
fn every_boolean_takes_a_value_and_usage_errors_are_one_line() {
    let d = tmp();
    let p = d.path();
    ok(p, &["synth-prefs", "--out", "conv.parquet", "--rows", "4", "--conversational", "true"]);
    ok(p, &["synth-prefs", "--out", "plain.parquet", "--rows", "4", "--conversational", "false", "--long", "false"]);
    let kinds = python(p, "print(str(pl.read_parquet('conv.parquet')['prompt'].dtype)[:4], str(pl.read_parquet('plain.parquet')['prompt'].dtype))");
    assert_eq!(kinds.trim(), "List String", "{kinds}");
    ok(p, &["init-model", "--arch", "llama", "--out", "lm", "--reward", "false"]);
    assert!(p.join("lm/config.json").exists() && std::fs::read_to_string(p.join("lm/config.json")).unwrap().contains("LlamaForCausalLM"));
    // `merge-ref` and `run` take `--force VALUE` like every stage.
    for args in [&["merge-ref", "--out", "m", "--force", "true", "no_shard"][..], &["run", "none.toml", "--force", "false"]] {
        let e = fails(p, args);
        assert!(e.contains("no_shard") || e.contains("none.toml"), "{args:?}: {e}");
    }
    for (args, names) in [
        (&["cache-ref", "--model", "m", "--dtype", "f8"][..], "--dtype"),
        (&["train", "--loss", "sigmoid,dpo"], "unknown loss type `dpo`"),
        (&["merge-ref", "--out", "m", "--force", "maybe", "s"], "--force"),
    ] {
        let out = run_in(p, args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(lines.len() == 1 && lines[0].starts_with("error: ") && lines[0].contains(names), "{args:?}: {stderr}");
    }
    // torch's dtype names are the same dtypes (validation passes, the missing model stops it).
    let e = fails(p, &["cache-ref", "--model", "nowhere", "--dtype", "bfloat16"]);
    assert!(!e.contains("--dtype") && !e.contains("invalid value"), "{e}");
    let help = ok_stdout(p, &["train", "--help"]);
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(!flat.contains("{loss_types}") && flat.contains("sigmoid_norm") && flat.contains("orpo"), "{help}");
}
