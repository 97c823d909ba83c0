//! Misuse and faults: settings that make a stage undefined, a model with another tokenizer, two
//! writers on one directory, damaged inputs and manifests, `kill -9` of training, and arbitrary
//! bytes in the parquet reader and the chat templates. Each gets a clear one-line error (exit
//! 1, never a panic) and leaves nothing half-written under a final name.
mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A failed run ends with one `error:` line naming what went wrong (after any progress notes),
/// exit status 1 (a panic is 101).
fn one_line_error(dir: &Path, args: &[&str]) -> String {
    let out = run_in(dir, args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "pipeline {args:?}: expected a clean error, got {:?}:\n{stderr}", out.status);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    let errors = lines.iter().filter(|l| l.starts_with("error: ")).count();
    assert!(errors == 1 && lines.last().is_some_and(|l| l.starts_with("error: ")), "pipeline {args:?}: not one error line:\n{stderr}");
    stderr
}

fn prepared(dir: &Path, rows: &str) {
    let model = tiny_model(dir, "llama");
    prepare_synth(dir, &model, rows, "8");
}

#[test]
fn settings_that_make_a_stage_undefined_are_refused_naming_the_flag() {
    let d = tmp();
    let p = d.path();
    let cases: &[(&[&str], &str)] = &[
        (&["prepare", "--input", "x.parquet", "--model", "m", "--max-prompt-length", "0"], "--max-prompt-length"),
        (&["prepare", "--input", "x.parquet", "--model", "m", "--max-length", "0"], "--max-length"),
        (&["prepare", "--input", "x.parquet", "--model", "m", "--eval-fraction", "1.5"], "--eval-fraction"),
        (&["prepare", "--model", "m"], "--input"),
        (&["prepare", "--input", "x.parquet", "--model", "m", "--chosen-column", "a", "--rejected-column", "a"], "different columns"),
        (&["cache-ref", "--model", "m", "--batch-tokens", "0"], "--batch-tokens"),
        (&["cache-ref", "--model", "m", "--dtype", "f8"], "--dtype"),
        (&["cache-ref"], "--model"),
        (&["train", "--beta", "0"], "--beta"),
        (&["train", "--beta", "-0.1"], "--beta"),
        (&["train", "--beta", "NaN"], "--beta"),
        (&["train", "--loss", "robust", "--label-smoothing", "0.5"], "--label-smoothing"),
        (&["train", "--label-smoothing", "0.7"], "--label-smoothing"),
        (&["train", "--loss", "hinge", "--label-smoothing", "0.1"], "--label-smoothing"),
        (&["train", "--batch-size", "0"], "--batch-size"),
        (&["train", "--grad-accum", "0"], "--grad-accum"),
        (&["train", "--lr=-1e-5"], "--lr"),
        (&["train", "--max-steps", "0"], "--max-steps"),
        (&["train", "--epochs", "0"], "--epochs"),
        (&["train", "--adam-beta2", "1"], "--adam-beta2"),
        (&["train", "--adam-eps", "0"], "--adam-eps"),
        (&["train", "--max-grad-norm", "-1"], "--max-grad-norm"),
        (&["train", "--resume", "--force"], "--resume"),
    ];
    for (args, flag) in cases {
        let e = one_line_error(p, args);
        assert!(e.contains(flag), "{args:?}: error does not name {flag}: {e}");
    }
    // The same checks apply to settings from a pipeline TOML.
    std::fs::write(p.join("bad.toml"), "[train]\nbeta = -1.0\n").unwrap();
    let e = one_line_error(p, &["train", "--config", "bad.toml"]);
    assert!(e.contains("--beta"), "{e}");
    // Flags are validated before any work: no output directory was created.
    for dir in ["prepared", "ref_cache", "train"] {
        assert!(!p.join(dir).exists(), "{dir} created by a refused run");
    }
}

#[test]
fn a_model_with_another_tokenizer_is_refused_by_cache_ref_and_train() {
    let d = tmp();
    let p = d.path();
    prepared(p, "16");
    let other = tiny_model_seed(p, "llama", 1);
    let e = one_line_error(p, &["cache-ref", "--prepared", "prep", "--model", s(&other), "--out", "cache"]);
    assert!(e.contains("another tokenizer") && e.contains("tokenizer.json") && e.contains("model"), "{e}");
    assert!(!p.join("cache/manifest.json").exists());
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "cache"]);
    let e = one_line_error(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--model", s(&other), "--out", "t", "--max-steps", "1"]);
    assert!(e.contains("another tokenizer") && e.contains("tokenizer.json"), "{e}");
    // Reformatting tokenizer.json (as another library's save would) changes nothing.
    let same = p.join("same");
    std::fs::create_dir_all(&same).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer_config.json"] {
        std::fs::copy(p.join("model_llama").join(f), same.join(f)).unwrap();
    }
    let tok: serde_json::Value = serde_json::from_slice(&std::fs::read(p.join("model_llama/tokenizer.json")).unwrap()).unwrap();
    std::fs::write(same.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    ok(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--model", s(&same), "--out", "t", "--max-steps", "1"]);
}

#[test]
fn a_second_writer_is_refused_and_the_first_result_is_whole() {
    let d = tmp();
    let p = d.path();
    prepared(p, "400");
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "alone", "--batch-tokens", "256"]);
    // A lock held by someone else: refused, naming the directory, nothing written.
    std::fs::create_dir_all(p.join("held")).unwrap();
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(p.join("held/.lock")).unwrap();
    f.lock().unwrap();
    let e = one_line_error(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "held"]);
    assert!(e.contains("held") && e.contains("being written by another process"), "{e}");
    drop(f);
    // Two real processes on one directory: the second refuses while the first runs.
    let args = ["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "both", "--batch-tokens", "256"];
    let mut first = Command::new(bin()).args(args).current_dir(p).stderr(Stdio::piped()).spawn().unwrap();
    let t = Instant::now();
    while !p.join("both/.lock").exists() || std::fs::read_to_string(p.join("both/.lock")).unwrap_or_default().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(30), "first cache-ref never took the lock");
        std::thread::sleep(Duration::from_millis(5));
    }
    let second = run_in(p, &args);
    let still_running = first.try_wait().unwrap().is_none();
    let stderr = String::from_utf8_lossy(&second.stderr);
    if still_running {
        assert_eq!(second.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("being written by another process") && stderr.contains("pid"), "{stderr}");
    }
    assert!(first.wait().unwrap().success());
    for f in ["chosen_logps.f32", "rejected_logps.f32", "ref_logps.parquet", "chosen_tokens.u32"] {
        assert_eq!(std::fs::read(p.join("alone").join(f)).unwrap(), std::fs::read(p.join("both").join(f)).unwrap(), "{f}");
    }
    assert!(still_running, "the first run ended before the second started; make it longer");
}

#[test]
fn damaged_inputs_and_manifests_are_one_line_errors_naming_the_file() {
    let d = tmp();
    let p = d.path();
    prepared(p, "40");
    let good = std::fs::read(p.join("in.parquet")).unwrap();
    // Truncated parquet at many lengths, and bytes that are not parquet at all.
    for cut in [0, 1, 4, 8, 100, good.len() / 3, good.len() / 2, good.len() - 9, good.len() - 1] {
        std::fs::write(p.join("cut.parquet"), &good[..cut]).unwrap();
        let e = one_line_error(p, &["prepare", "--input", "cut.parquet", "--model", "model_llama", "--out", "o", "--force"]);
        assert!(e.contains("cut.parquet"), "cut at {cut}: {e}");
    }
    assert!(!p.join("o/manifest.json").exists() && partial_files(&p.join("o")).is_empty());
    // A damaged manifest: short or non-hex hashes, wrong types, not JSON.
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "cache"]);
    let manifest = std::fs::read_to_string(p.join("cache/manifest.json")).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    m["fingerprint"] = "ab".into();
    for (i, text) in [m.to_string(), manifest.replace("\"stage\"", "\"stag\""), "{not json".to_string(), String::new()].iter().enumerate() {
        std::fs::write(p.join("cache/manifest.json"), text).unwrap();
        let e = one_line_error(p, &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--max-steps", "1"]);
        assert!(e.contains("cache") && (e.contains("manifest") || e.contains("fingerprint")), "case {i}: {e}");
        let e = one_line_error(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "cache"]);
        assert!(e.contains("cache") && (e.contains("manifest") || e.contains("fingerprint ab")), "case {i}: {e}");
    }
    std::fs::write(p.join("cache/manifest.json"), &manifest).unwrap();
    let pm = std::fs::read_to_string(p.join("prep/manifest.json")).unwrap();
    std::fs::write(p.join("prep/manifest.json"), pm.replace("\"blake3\": \"", "\"blake3\": \"zz")).unwrap();
    let e = one_line_error(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "cache2"]);
    assert!(e.contains("prep"), "{e}");
    std::fs::write(p.join("prep/manifest.json"), &pm).unwrap();
    // A metrics file that is not ours: resume names it and its line.
    let train = [
        "train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--max-steps", "4", "--batch-size", "4", "--save-every", "2", "--lr",
        "1e-3",
    ];
    ok(p, &train.iter().copied().chain(["--stop-after-steps", "3"]).collect::<Vec<_>>());
    let jsonl = p.join("t/metrics.jsonl");
    let text = std::fs::read_to_string(&jsonl).unwrap();
    std::fs::write(&jsonl, format!("{text}garbage\n")).unwrap();
    let e = one_line_error(p, &train.iter().copied().chain(["--resume"]).collect::<Vec<_>>());
    assert!(e.contains("metrics.jsonl") && e.contains("line"), "{e}");
    // A torn last line (a kill mid-append) is not an error: the run resumes.
    std::fs::write(&jsonl, format!("{text}{{\"step\": 3, \"lo")).unwrap();
    ok(p, &train.iter().copied().chain(["--resume"]).collect::<Vec<_>>());
}

/// Final weights and metrics of an uninterrupted run vs a run killed with SIGKILL at `delays`
/// and resumed each time.
#[test]
fn train_survives_kill_9_at_any_moment() {
    let d = tmp();
    let p = d.path();
    prepared(p, "64");
    ok(p, &["cache-ref", "--prepared", "prep", "--model", "model_llama", "--out", "cache"]);
    let args = [
        "train", "--prepared", "prep", "--ref-cache", "cache", "--max-steps", "12", "--batch-size", "4", "--lr", "1e-3", "--save-every", "1",
        "--eval-every", "4",
    ];
    let with = |out: &'static str, extra: &[&'static str]| -> Vec<&'static str> {
        args.iter().copied().chain(["--out", out]).chain(extra.iter().copied()).collect()
    };
    let t = Instant::now();
    ok(p, &with("full", &[]));
    let full_s = t.elapsed();
    // Kill at spread-out moments of a run's life: start-up, mid-step, mid-checkpoint, the end.
    let mut kills = 0;
    for frac in [0.05, 0.3, 0.55, 0.8, 0.97] {
        let extra: &[&str] = if kills == 0 { &[] } else { &["--resume"] };
        let mut child = Command::new(bin()).args(with("killed", extra)).current_dir(p).stderr(Stdio::null()).spawn().unwrap();
        std::thread::sleep(full_s.mul_f64(frac));
        let _ = child.kill(); // SIGKILL
        let _ = child.wait();
        kills += 1;
    }
    ok(p, &with("killed", &["--resume"]));
    assert_eq!(
        std::fs::read(p.join("full/final/model.safetensors")).unwrap(),
        std::fs::read(p.join("killed/final/model.safetensors")).unwrap(),
        "final weights after {kills} kills differ from an uninterrupted run"
    );
    let (a, b) = (read_rows(p, "full/metrics.parquet"), read_rows(p, "killed/metrics.parquet"));
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for k in ["loss", "grad_norm", "eval/loss", "rewards/margins"] {
            assert_eq!(x[k], y[k], "step {} {k}", x["step"]);
        }
    }
    // Whatever a kill left half-written was redone whole by a later run and renamed into place.
    assert!(partial_files(&p.join("killed/checkpoints")).is_empty(), "left behind: {:?}", partial_files(&p.join("killed/checkpoints")));
    assert!(partial_files(&p.join("killed")).is_empty(), "left behind: {:?}", partial_files(&p.join("killed")));
}

/// Reads every batch of a parquet file through the preference reader; returns whether it
/// panicked (an error is fine).
fn read_all(path: &Path) -> bool {
    use dpo_pipeline::data::input::{ColumnNames, PreferenceReader};
    let path = path.to_path_buf();
    std::panic::catch_unwind(move || {
        if let Ok(mut r) = PreferenceReader::open(&path, &ColumnNames::default(), 64) {
            while let Ok(Some(_)) = r.next_batch() {}
        }
    })
    .is_err()
}

fn fuzz_iters(default: u64) -> u64 {
    std::env::var("FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[test]
fn the_parquet_reader_never_panics_on_damaged_files() {
    use dpo_pipeline::rng::Rng;
    let d = tmp();
    let p = d.path();
    ok(p, &["synth-prefs", "--out", "plain.parquet", "--rows", "50"]);
    ok(p, &["synth-prefs", "--out", "conv.parquet", "--rows", "50", "--conversational"]);
    let seeds = [std::fs::read(p.join("plain.parquet")).unwrap(), std::fs::read(p.join("conv.parquet")).unwrap()];
    let mut rng = Rng::new(7);
    let file = p.join("fuzz.parquet");
    let mut panics = Vec::new();
    for i in 0..fuzz_iters(300) {
        let mut bytes = seeds[(i % 2) as usize].clone();
        match rng.below(4) {
            // Flip a few bytes anywhere (headers, page data, the footer).
            0 | 1 => {
                for _ in 0..1 + rng.below(8) {
                    let at = rng.below(bytes.len());
                    bytes[at] = rng.below(256) as u8;
                }
            }
            // Overwrite near the footer, where the metadata lives.
            2 => {
                let n = bytes.len();
                for _ in 0..1 + rng.below(4) {
                    let at = n - 1 - rng.below(200.min(n));
                    bytes[at] = rng.below(256) as u8;
                }
            }
            // Random bytes with a parquet magic at both ends.
            _ => {
                let n = 8 + rng.below(400);
                bytes = (0..n).map(|_| rng.below(256) as u8).collect();
                bytes[..4].copy_from_slice(b"PAR1");
                bytes[n - 4..].copy_from_slice(b"PAR1");
            }
        }
        std::fs::write(&file, &bytes).unwrap();
        if read_all(&file) {
            let keep = p.join(format!("panic-{i}.parquet"));
            std::fs::copy(&file, &keep).unwrap();
            panics.push(keep);
        }
    }
    assert!(panics.is_empty(), "the reader panicked on {} damaged files, e.g. {}", panics.len(), panics[0].display());
}

#[test]
fn chat_templates_never_panic_on_arbitrary_source_or_messages() {
    use dpo_pipeline::data::chat::{ChatTemplate, Date, TemplateSource};
    use dpo_pipeline::data::input::Message;
    use dpo_pipeline::rng::Rng;
    const PIECES: &[&str] = &[
        "{{",
        "}}",
        "{%",
        "%}",
        "{#",
        "#}",
        " for m in messages ",
        " endfor ",
        " if ",
        " else ",
        " endif ",
        "m['role']",
        "m.content",
        "messages[0]",
        "messages[-1]",
        "loop.index",
        "| tojson",
        "|trim",
        "raise_exception('x')",
        "bos_token",
        "add_generation_prompt",
        "namespace(a=1)",
        " set x = ",
        "x.y",
        "(",
        ")",
        "[",
        "]",
        "'",
        "\"",
        "~",
        "+",
        "*",
        "/",
        "//",
        "%",
        "0",
        "1e400",
        "-1",
        "none",
        "range(99999999)",
        "\n",
        "text",
        "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
        "messages|length",
        "'a' * 1000",
        "[1,2][5]",
        "{}.x",
        "(1/0)",
        "strftime_now('%Y')",
        "m.content.split(' ')",
    ];
    let mut rng = Rng::new(11);
    let mut panics = Vec::new();
    for i in 0..fuzz_iters(2000) {
        let src: String = (0..1 + rng.below(24)).map(|_| *rng.pick(PIECES)).collect();
        let msgs: Vec<Message> =
            (0..rng.below(4)).map(|k| Message::new(["user", "assistant", "system", ""][k % 4], rng.pick::<&str>(PIECES))).collect();
        let source = TemplateSource { path: "chat_template.jinja".into(), templates: [("default".to_string(), src.clone())].into() };
        let tools = serde_json::json!([{"type": "function", "function": {"name": rng.pick(PIECES).to_string()}}]);
        let r = std::panic::catch_unwind(|| {
            if let Ok(t) = ChatTemplate::new(&source, [("eos_token".to_string(), "</s>".to_string())].into(), Date::today()) {
                let _ = t.render(&msgs, i % 2 == 0, (i % 3 == 0).then_some(&tools), None);
            }
        });
        if r.is_err() {
            panics.push(src);
        }
    }
    assert!(panics.is_empty(), "{} templates panicked, e.g. {:?}", panics.len(), panics[0]);
}
