//! Long jobs on shared machines: a full disk (a small tmpfs under --out) is a clear error,
//! never SIGBUS, and the same command reruns to the files an uninterrupted run gives once
//! there is space; `sample` and `label` resume after SIGKILL with identical outputs.
mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs of a given size, unmounted on drop. Mounting needs root (CAP_SYS_ADMIN): where the
/// test cannot, it says so and is skipped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, kb: u64) -> Option<Self> {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={kb}k"), "tmpfs", s(dir)]).output();
        match out {
            Ok(o) if o.status.success() => Some(Self(dir.to_path_buf())),
            Ok(o) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs at {} ({}); run as root to test full disks",
                    dir.display(),
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: no `mount` command ({e}); cannot test full disks");
                None
            }
        }
    }

    /// Frees space the way an operator would: a bigger filesystem, files kept.
    fn grow(&self, kb: u64) {
        let st = Command::new("mount").args(["-o", &format!("remount,size={kb}k"), s(&self.0)]).status().unwrap();
        assert!(st.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Every file (recursively, relative names) of a stage directory but its manifest (timings).
fn outputs(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let name = p.strip_prefix(dir).unwrap().display().to_string();
                if name != "manifest.json" && name != ".lock" && !name.ends_with(".png") {
                    out.push((name, std::fs::read(&p).unwrap()));
                }
            }
        }
    }
    out.sort();
    out
}

fn assert_same_outputs(a: &Path, b: &Path) {
    let (x, y) = (outputs(a), outputs(b));
    let names = |v: &[(String, Vec<u8>)]| v.iter().map(|f| f.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(&x), names(&y), "{} and {} hold other files", a.display(), b.display());
    for ((name, bx), (_, by)) in x.iter().zip(&y) {
        assert!(bx == by, "{name} differs between {} and {}", a.display(), b.display());
    }
}

/// A full-disk failure: non-zero exit, a message naming the file or directory and the sizes,
/// no manifest, nothing under a final name that the manifest would describe.
fn assert_full_disk_error(e: &str, out: &Path, what: &str) {
    assert!(e.contains("free") && (e.contains("need") || e.contains("no space")), "{what}: {e}");
    assert!(e.contains(s(out)), "{what}: the message names no path under {}: {e}", out.display());
    assert!(!e.contains("Bus error") && !e.contains("panicked"), "{what}: {e}");
    assert!(!out.join("manifest.json").exists(), "{what}: a manifest after a failed run");
}

/// A memory-mapped column on a full filesystem is an error at allocation naming the file and
/// sizes, not a SIGBUS when its pages are first written (the test process would die).
#[test]
fn a_mapped_column_on_a_full_disk_is_an_error_not_sigbus() {
    use dpo_pipeline::store::ColumnFill;
    let d = tmp();
    let Some(fs) = Tmpfs::mount(&d.path().join("fs"), 64) else { return };
    let path = fs.0.join("logps.f32");
    let Err(e) = ColumnFill::<f32>::open_or_create(&path, 100_000, &"ab".repeat(32), f32::NAN) else {
        panic!("400 kB allocated on a 64 kB filesystem")
    };
    let e = format!("{e:#}");
    assert!(e.contains("logps.f32.partial") && e.contains("400064 bytes") && e.contains("free"), "{e}");
    assert!(partial_files(&fs.0).is_empty(), "the failed allocation left {:?}", partial_files(&fs.0));
    fs.grow(1024);
    let (mut c, reused) = ColumnFill::<f32>::open_or_create(&path, 100_000, &"ab".repeat(32), f32::NAN).unwrap();
    assert!(!reused);
    c.values_mut()[99_999] = 1.0;
    c.finish().unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 400_064);
}

/// prepare, cache-ref, merge-ref, sample, label and train checkpoints, each with --out on a
/// filesystem too small for it: a clear error; then, with space, the same command gives the
/// files of a run that never failed.
#[test]
fn every_stage_on_a_full_disk_fails_clearly_then_reruns_identically() {
    let d = tmp();
    let p = d.path();
    let m = tiny_model(p, "llama");
    let m = s(&m);
    ok(p, &["synth-prefs", "--out", "in.parquet", "--rows", "2000"]);
    let prepare = |out: &str| ["prepare", "--input", "in.parquet", "--model", m, "--out", out, "--max-length", "64"].map(String::from).to_vec();
    let run = |args: &[String]| ok(p, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let fail = |args: &[String]| fails(p, &args.iter().map(String::as_str).collect::<Vec<_>>());
    let with_out = |args: &[String], out: &Path| -> Vec<String> {
        let mut a = args.to_vec();
        let i = a.iter().position(|x| x == "--out").unwrap();
        a[i + 1] = s(out).to_string();
        a
    };
    let mut mounts = Vec::new();
    let mut full_disk = |stage: &str, args: Vec<String>, kb: u64| -> bool {
        let Some(fs) = Tmpfs::mount(&p.join(format!("fs-{stage}")), kb) else { return false };
        let out = fs.0.join("out");
        let e = fail(&with_out(&args, &out));
        assert_full_disk_error(&e, &fs.0, stage);
        fs.grow(64 * 1024);
        run(&with_out(&args, &out));
        run(&args); // the run that never failed
        let clean = PathBuf::from(p).join(&args[args.iter().position(|x| x == "--out").unwrap() + 1]);
        assert_same_outputs(&clean, &out);
        assert!(partial_files(&out).is_empty());
        mounts.push(fs);
        true
    };
    if !full_disk("prepare", prepare("prep"), 16) {
        return;
    }
    let cache = ["cache-ref", "--prepared", "prep", "--model", m, "--out", "cache", "--threads", "1"].map(String::from).to_vec();
    full_disk("cache-ref", cache.clone(), 16);
    for k in 0..2 {
        let mut a = cache.clone();
        a[6] = format!("shard{k}");
        a.extend(["--shard".into(), format!("{k}/2")]);
        run(&a);
    }
    full_disk("merge-ref", ["merge-ref", "shard0", "shard1", "--out", "cache"].map(String::from).to_vec(), 16);
    ok(p, &["synth-prefs", "--out", "prompts.parquet", "--rows", "24"]);
    let sample = [
        "sample", "--model", m, "--prompts", "prompts.parquet", "--out", "samples", "--num-samples", "2", "--max-new-tokens", "8", "--batch-tokens",
        "120",
    ]
    .map(String::from)
    .to_vec();
    full_disk("sample", sample, 8);
    let judge = "python3 -c 'import sys, json\nfor l in sys.stdin: print(len(json.loads(l)[\"completion\"]))'";
    full_disk("label", ["label", "--samples", "samples", "--judge-cmd", judge, "--out", "labels"].map(String::from).to_vec(), 8);
    // The checkpoint does not fit; the metrics before it do.
    let train = [
        "train", "--prepared", "prep", "--ref-cache", "cache", "--out", "train", "--max-steps", "4", "--batch-size", "4", "--save-every", "2",
        "--threads", "1",
    ]
    .map(String::from)
    .to_vec();
    let Some(fs) = Tmpfs::mount(&p.join("fs-train"), 64) else { return };
    let out = fs.0.join("out");
    let e = fail(&with_out(&train, &out));
    assert!(e.contains("checkpoint") && e.contains("step-2"), "{e}");
    assert_full_disk_error(&e, &fs.0, "train");
    fs.grow(64 * 1024);
    let mut resume = with_out(&train, &out);
    resume.push("--resume".into());
    run(&resume);
    run(&train);
    assert_eq!(std::fs::read(p.join("train/final/model.safetensors")).unwrap(), std::fs::read(out.join("final/model.safetensors")).unwrap());
}

/// Kills `args` with SIGKILL `when` it is at some point of its run (None: finished first).
fn kill_when(p: &Path, args: &[&str], when: impl Fn() -> bool) -> bool {
    let mut child = Command::new(bin()).args(args).current_dir(p).stderr(Stdio::null()).spawn().unwrap();
    let t = Instant::now();
    loop {
        if when() {
            let _ = child.kill();
            let _ = child.wait();
            return true;
        }
        if child.try_wait().unwrap().is_some() || t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            let _ = child.wait();
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn waves_done(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("sample.parts/state.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["waves"].as_u64())
        .unwrap_or(0)
}

fn journaled(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("label.parts/scores.txt")).map(|t| t.split_ascii_whitespace().count()).unwrap_or(0)
}

/// `sample` killed after 1, 3 and 6 finished waves, `label` (judge command and reward model)
/// killed part-way, each rerun: byte-identical outputs to uninterrupted runs, and the judge is
/// asked only about what was not answered yet.
#[test]
fn sample_and_label_resume_after_kill_9_with_identical_outputs() {
    let d = tmp();
    let p = d.path();
    let m = tiny_model(p, "llama");
    ok(p, &["synth-prefs", "--out", "prompts.parquet", "--rows", "40"]);
    let sample = |out: &'static str| -> Vec<&'static str> {
        let m: &'static str = Box::leak(s(&m).to_string().into_boxed_str());
        vec![
            "--threads", "1", "sample", "--model", m, "--prompts", "prompts.parquet", "--out", out, "--num-samples", "3", "--max-new-tokens", "12",
            "--batch-tokens", "150", "--temperature", "0.9",
        ]
    };
    ok(p, &sample("clean"));
    let killed = p.join("killed");
    for after in [1, 3, 6] {
        assert!(kill_when(p, &sample("killed"), || waves_done(&killed) >= after), "the run finished before {after} waves");
        assert!(!killed.join("manifest.json").exists());
    }
    let e = ok(p, &sample("killed"));
    assert!(e.contains("resuming"), "{e}");
    assert_eq!(std::fs::read(p.join("clean/samples.parquet")).unwrap(), std::fs::read(killed.join("samples.parquet")).unwrap());
    assert_eq!(std::fs::read(p.join("clean/skipped.parquet")).unwrap(), std::fs::read(killed.join("skipped.parquet")).unwrap());
    assert!(!killed.join("sample.parts").exists(), "the parts outlived the finished run");
    // A stop at a wave boundary (the hidden test flag) resumes the same way.
    let mut stop = sample("stopped");
    stop.extend(["--stop-after-waves", "2"]);
    ok(p, &stop);
    assert_eq!(waves_done(&p.join("stopped")), 2);
    ok(p, &sample("stopped"));
    assert_eq!(std::fs::read(p.join("clean/samples.parquet")).unwrap(), std::fs::read(p.join("stopped/samples.parquet")).unwrap());

    // A judge that answers slowly and counts each question it reads.
    let judge = "while IFS= read -r l; do echo >> asked.txt; echo ${#l}; sleep 0.02; done";
    let total = read_rows(p, "clean/samples.parquet").len();
    let label = |out: &'static str| vec!["label", "--samples", "clean", "--judge-cmd", judge, "--out", out];
    ok(p, &label("labels_clean"));
    let asked = || std::fs::read_to_string(p.join("asked.txt")).map(|t| t.lines().count()).unwrap_or(0);
    assert_eq!(asked(), total);
    let lk = p.join("labels_killed");
    for at in [10, 40] {
        assert!(kill_when(p, &label("labels_killed"), || journaled(&lk) >= at), "label finished before {at} answers");
    }
    std::thread::sleep(Duration::from_millis(300)); // the orphaned judge drains what it was sent
    let answered = journaled(&lk);
    let before = asked();
    ok(p, &label("labels_killed"));
    assert_eq!(asked() - before, total - answered, "the rerun asked again about answered samples");
    for f in ["scores.parquet", "prefs.parquet", "skipped.parquet"] {
        assert_eq!(std::fs::read(p.join("labels_clean").join(f)).unwrap(), std::fs::read(lk.join(f)).unwrap(), "{f}");
    }

    // A reward model: killed between scoring batches, resumed at a batch boundary.
    ok(p, &["init-model", "--arch", "llama", "--reward", "--out", "rm"]);
    let rlabel =
        |out: &'static str| vec!["--threads", "1", "label", "--samples", "clean", "--reward-model", "rm", "--out", out, "--batch-tokens", "40"];
    ok(p, &rlabel("rm_clean"));
    let rk = p.join("rm_killed");
    let hit = kill_when(p, &rlabel("rm_killed"), || journaled(&rk) >= total / 3);
    if hit {
        ok(p, &rlabel("rm_killed"));
    } else {
        eprintln!("note: the reward-model label run finished before it could be killed");
    }
    for f in ["scores.parquet", "prefs.parquet", "skipped.parquet"] {
        assert_eq!(std::fs::read(p.join("rm_clean").join(f)).unwrap(), std::fs::read(rk.join(f)).unwrap(), "{f}");
    }
}
