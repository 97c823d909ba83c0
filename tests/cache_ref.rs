//! Stage 2: the cache's contract: resumable, fingerprinted, whole or absent, readable by polars
//! and numpy.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

const CACHE_FILES: &[&str] = &[
    "chosen_logps.f32", "rejected_logps.f32", "chosen_shared_logps.f32", "rejected_shared_logps.f32", "chosen_tokens.u32", "rejected_tokens.u32",
    "ref_logps.parquet",
];

fn setup(dir: &Path, rows: &str) -> String {
    let model = tiny_model(dir, "llama");
    ok(dir, &["synth-prefs", "--out", "in.parquet", "--rows", rows, "--conversational"]);
    ok(dir, &["prepare", "--input", "in.parquet", "--model", s(&model), "--out", "prep", "--eval-fraction", "0.2"]);
    s(&model).to_string()
}

#[test]
fn resume_after_a_crash_gives_identical_files() {
    let d = tmp();
    let m = setup(d.path(), "300");
    let args = |out: &str| -> Vec<String> {
        ["cache-ref", "--prepared", "prep", "--model", &m, "--out", out, "--batch-tokens", "512"].iter().map(|s| s.to_string()).collect()
    };
    let a: Vec<String> = args("full");
    ok(d.path(), &a.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    // Simulated crash: stop after 3 batches. Nothing final is visible; the rerun resumes.
    let mut b = args("resumed");
    b.extend(["--stop-after-batches".to_string(), "3".to_string()]);
    ok(d.path(), &b.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let out = d.path().join("resumed");
    for f in CACHE_FILES.iter().chain(&["manifest.json"]) {
        assert!(!out.join(f).exists(), "{f} visible before the cache is whole");
    }
    let e = ok(d.path(), &args("resumed").iter().map(|s| s.as_str()).collect::<Vec<_>>());
    assert!(e.contains("resuming: 3 of") && e.contains("skipping"), "{e}");
    for f in CACHE_FILES {
        assert_eq!(std::fs::read(d.path().join("full").join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f} differs after resume");
    }
    assert!(partial_files(&out).is_empty() && !out.join("progress.json").exists());
}

#[test]
fn kill_9_mid_run_then_rerun_completes_identically() {
    let d = tmp();
    let m = setup(d.path(), "3000");
    let args = ["cache-ref", "--prepared", "prep", "--model", m.as_str(), "--out", "killed", "--batch-tokens", "256", "--threads", "1"];
    let mut child = Command::new(bin()).args(args).current_dir(d.path()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let progress = d.path().join("killed/progress.json");
    let t = std::time::Instant::now();
    while !progress.exists() && t.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let out = d.path().join("killed");
    assert!(!out.join("manifest.json").exists(), "killed too late: the run had finished");
    let e = ok(d.path(), &args);
    assert!(e.contains("resuming"), "{e}");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "clean", "--batch-tokens", "256", "--threads", "1"]);
    for f in CACHE_FILES {
        assert_eq!(std::fs::read(d.path().join("clean").join(f)).unwrap(), std::fs::read(out.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn fingerprints_guard_the_cache() {
    let d = tmp();
    let m = setup(d.path(), "60");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache"]);
    let e = ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache"]);
    assert!(e.contains("up to date"), "{e}");
    // Other settings (here the dtype) into the same directory: an error naming both fingerprints.
    let e = fails(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache", "--dtype", "bf16"]);
    assert!(e.contains("fingerprint") && e.contains("--force"), "{e}");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache", "--dtype", "bf16", "--force"]);
    // A different max_length changes the prepared fingerprint, so the cache no longer matches it.
    // Other settings over an existing prepared directory: refused without --force, like every stage.
    let e = fails(d.path(), &["prepare", "--input", "in.parquet", "--model", &m, "--out", "prep", "--eval-fraction", "0.2", "--max-length", "20"]);
    assert!(e.contains("fingerprint") && e.contains("--force"), "{e}");
    ok(d.path(), &["prepare", "--input", "in.parquet", "--model", &m, "--out", "prep", "--eval-fraction", "0.2", "--max-length", "20", "--force"]);
    let e = fails(d.path(), &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--max-steps", "1"]);
    assert!(e.contains("was built from prepared data with fingerprint"), "{e}");
}

#[test]
fn modified_or_truncated_files_are_detected() {
    let d = tmp();
    let m = setup(d.path(), "60");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache"]);
    // A truncated cache column: train refuses it with the file's name.
    let col = d.path().join("cache/chosen_logps.f32");
    let bytes = std::fs::read(&col).unwrap();
    std::fs::write(&col, &bytes[..bytes.len() - 8]).unwrap();
    let e = fails(d.path(), &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--max-steps", "1"]);
    assert!(e.contains("chosen_logps.f32") && e.contains("does not match its manifest"), "{e}");
    // The column reader itself catches a bad header or length, whatever the manifest says.
    let err = dpo_pipeline::store::Column::<f32>::open(&col, None).err().unwrap().to_string();
    assert!(err.contains("truncated or corrupt"), "{err}");
    std::fs::write(&col, b"garbage").unwrap();
    let err = dpo_pipeline::store::Column::<f32>::open(&col, None).err().unwrap().to_string();
    assert!(err.contains("not a dpo-pipeline column file"), "{err}");
    // A prepared directory changed after the fact: cache-ref refuses it.
    let p = d.path().join("prep/split.u32");
    let mut b = std::fs::read(&p).unwrap();
    let last = b.len() - 1;
    b[last] ^= 1;
    std::fs::write(&p, b).unwrap();
    let e = fails(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache2"]);
    assert!(e.contains("split.u32") && e.contains("does not match its manifest"), "{e}");
}

#[test]
fn polars_and_numpy_read_the_cache_and_join_it_with_pairs() {
    let d = tmp();
    let m = setup(d.path(), "80");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache", "--layout", "padded"]);
    let out = python(
        d.path(),
        r#"
pairs = pl.read_parquet("prep/pairs.parquet")
ref = pl.read_parquet("cache/ref_logps.parquet")
j = pairs.join(ref, on="row_id")
assert len(j) == len(pairs) == len(ref), (len(j), len(pairs), len(ref))
assert (j["split"] == j["split_right"]).all()
assert (j["chosen_scored_tokens"] == j["chosen_scored_tokens_right"]).all()
mm = np.memmap("cache/chosen_logps.f32", dtype="<f4", mode="r", offset=64)
assert mm.shape[0] == len(ref) and np.array_equal(mm, ref["ref_chosen_logps"].to_numpy())
hdr = open("cache/chosen_logps.f32", "rb").read(64)
assert hdr[:8] == b"DPOCOLMN"
m = json.load(open("cache/manifest.json"))
assert hdr[24:56].hex() == m["fingerprint"][:64]
assert (ref["ref_chosen_logps"] < 0).all() and (ref["ref_rejected_logps"] < 0).all()
print(m["stats"]["padding_fraction"])"#,
    );
    let pad: f64 = out.trim().parse().unwrap();
    assert!((0.0..0.5).contains(&pad), "padding fraction {pad}");
}

#[test]
fn an_unfinished_cache_is_refused_by_train() {
    let d = tmp();
    let m = setup(d.path(), "100");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache", "--batch-tokens", "256", "--stop-after-batches", "1"]);
    let e = fails(d.path(), &["train", "--prepared", "prep", "--ref-cache", "cache", "--out", "t", "--max-steps", "1"]);
    assert!(e.contains("unfinished cache") && e.contains("rerun the same"), "{e}");
}

/// LD-DPO's shared part: the reference log-probs of each completion's first min(chosen,
/// rejected) scored tokens, against the per-token log-probs of each sequence scored alone; a
/// cache from before format 3 (without them) still serves every loss but --ld-alpha, which it
/// refuses naming the fix.
#[test]
fn the_cache_holds_the_shared_part_for_ld_dpo_and_old_caches_refuse_it() {
    use dpo_pipeline::data::prepared::PreparedDataset;
    use dpo_pipeline::data::ref_cache::RefCache;
    let d = tmp();
    let m = setup(d.path(), "40");
    ok(d.path(), &["cache-ref", "--prepared", "prep", "--model", &m, "--out", "cache"]);
    let prep = PreparedDataset::open(&d.path().join("prep")).unwrap();
    let cache = RefCache::open(&d.path().join("cache"), &prep).unwrap();
    let dec = dpo_pipeline::model::load_decoder(Path::new(&m), candle_core::DType::F32, None, &candle_core::Device::Cpu).unwrap();
    let (cs, rs) = (cache.chosen_shared.as_ref().unwrap(), cache.rejected_shared.as_ref().unwrap());
    let mut unequal = 0;
    for i in 0..prep.len() {
        let p = prep.pair(i);
        let n = p.chosen_scored.min(p.rejected_scored);
        // seq_logps scores every token after the first; the completion's are the last ones.
        let part = |completion: &[u32], scored: usize| -> (f64, f64) {
            let ids: Vec<u32> = p.prompt.iter().chain(&completion[..scored]).copied().collect();
            let lp = seq_logps(&dec, &ids);
            let comp = &lp[lp.len() - scored..];
            (comp.iter().map(|&x| x as f64).sum(), comp[..n].iter().map(|&x| x as f64).sum())
        };
        let (c_all, c_shared) = part(p.chosen, p.chosen_scored);
        let (r_all, r_shared) = part(p.rejected, p.rejected_scored);
        for (what, got, want) in [
            ("chosen", cache.chosen.as_slice()[i], c_all),
            ("rejected", cache.rejected.as_slice()[i], r_all),
            ("chosen shared", cs.as_slice()[i], c_shared),
            ("rejected shared", rs.as_slice()[i], r_shared),
        ] {
            assert!((got as f64 - want).abs() < 2e-4 * want.abs().max(1.0), "row {i} {what}: cache {got}, alone {want}");
        }
        unequal += usize::from(p.chosen_scored != p.rejected_scored);
    }
    assert!(unequal > 10, "most pairs have completions of different lengths ({unequal})");
    let out = python(
        d.path(),
        r#"
ref = pl.read_parquet("cache/ref_logps.parquet")
same = ref["chosen_scored_tokens"] == ref["rejected_scored_tokens"]
assert (ref.filter(same)["ref_chosen_shared_logps"] == ref.filter(same)["ref_chosen_logps"]).all()
assert (ref["ref_chosen_shared_logps"] >= ref["ref_chosen_logps"]).all()
print(len(ref))"#,
    );
    assert_eq!(out.trim(), prep.len().to_string());
    // The same cache as an older build wrote it: format 2, without the shared columns.
    let dir = d.path().join("cache");
    let mpath = dir.join("manifest.json");
    let mut man: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&mpath).unwrap()).unwrap();
    man["format_version"] = 2.into();
    for f in ["chosen_shared_logps.f32", "rejected_shared_logps.f32"] {
        man["files"].as_object_mut().unwrap().remove(f);
        std::fs::remove_file(dir.join(f)).unwrap();
    }
    std::fs::write(&mpath, serde_json::to_string_pretty(&man).unwrap()).unwrap();
    let train = ["train", "--prepared", "prep", "--ref-cache", "cache", "--max-steps", "1", "--eval-every", "0", "--save-every", "0"];
    ok(d.path(), &[&train[..], &["--out", "t1"]].concat());
    let e = fails(d.path(), &[&train[..], &["--out", "t2", "--ld-alpha", "0.5"]].concat());
    assert!(e.contains("--ld-alpha") && e.contains("cache-ref --force"), "{e}");
}
