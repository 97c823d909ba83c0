//! Hub ids (`--model ORG/NAME[@REVISION]`, `--input ORG/NAME`) through a Hugging Face cache laid
//! out here as huggingface_hub writes it (blobs, snapshot links, refs): no network.
mod common;
use common::*;
use std::path::Path;
use std::process::Command;

/// Puts `files` (source path, path in the repository) into `cache` as huggingface_hub does:
/// blobs named by content hash, the snapshot's entries relative symbolic links to them, `refs/NAME`
/// holding the commit.
fn put(cache: &Path, repo_dir: &str, commit: &str, refs: &[&str], files: &[(&Path, &str)]) {
    let root = cache.join(repo_dir);
    for (src, rel) in files {
        let bytes = std::fs::read(src).unwrap();
        let blob = root.join("blobs").join(dpo_pipeline::store::file_hash(src).unwrap().blake3);
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, bytes).unwrap();
        let link = root.join("snapshots").join(commit).join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        // Relative, as huggingface_hub links them: the cache can move.
        let up = "../".repeat(rel.matches('/').count() + 2);
        std::os::unix::fs::symlink(format!("{up}blobs/{}", blob.file_name().unwrap().to_str().unwrap()), &link).unwrap();
    }
    std::fs::create_dir_all(root.join("refs")).unwrap();
    for r in refs {
        std::fs::write(root.join("refs").join(r), commit).unwrap();
    }
}

/// `pipeline ARGS` in `dir` with the Hub environment `env` (HF_HUB_OFFLINE=1: never the network).
fn hub_run(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> (bool, String) {
    let mut c = Command::new(bin());
    c.args(args).current_dir(dir).env("HF_HUB_OFFLINE", "1").env_remove("HF_HUB_CACHE").env_remove("HF_HOME");
    for (k, v) in env {
        c.env(k, v);
    }
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

fn manifest(dir: &Path, out: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join(out).join("manifest.json")).unwrap()).unwrap()
}

#[test]
fn hub_ids_resolve_through_the_hugging_face_cache() {
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    ok(p, &["synth-prefs", "--out", "in.parquet", "--rows", "40", "--eval-rows", "12"]);
    ok(p, &["synth-prefs", "--out", "small.parquet", "--rows", "8", "--seed", "5"]);
    let (c1, c2) = ("a".repeat(40), "b".repeat(40));
    let cache = p.join("hub");
    let mfiles: Vec<(std::path::PathBuf, &str)> =
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"].iter().map(|f| (model.join(f), *f)).collect();
    let mrefs: Vec<(&Path, &str)> = mfiles.iter().map(|(a, b)| (a.as_path(), *b)).collect();
    put(&cache, "models--acme--tiny-llama", &c1, &["main", "v1"], &mrefs);
    put(
        &cache,
        "datasets--acme--prefs",
        &c2,
        &["main"],
        &[
            (&p.join("in.parquet"), "data/train-00000-of-00001.parquet"),
            (&p.join("in.eval.parquet"), "data/test-00000-of-00001.parquet"),
            (&p.join("small.parquet"), "small/train.parquet"),
            (&p.join("in.parquet"), "README.md"),
        ],
    );
    let env = [("HF_HUB_CACHE", "hub")];
    // Ids for the model and the data (train and test splits), against the same files named locally.
    let (good, e) =
        hub_run(p, &env, &["prepare", "--input", "acme/prefs", "--eval-input", "acme/prefs", "--model", "acme/tiny-llama", "--out", "hub_prep"]);
    assert!(good, "{e}");
    ok(p, &["prepare", "--input", "in.parquet", "--eval-input", "in.eval.parquet", "--model", s(&model), "--out", "local_prep"]);
    let same = python(
        p,
        "a, b = (pl.read_parquet(f'{d}/pairs.parquet').drop('source_file') for d in ('hub_prep', 'local_prep'))\nprint(a.equals(b), a.height, a['split'].value_counts().sort('split').rows())",
    );
    assert_eq!(same.trim(), "True 52 [('eval', 12), ('train', 40)]", "{same}");
    let hub = &manifest(p, "hub_prep")["settings"]["hub"];
    let want = serde_json::json!([
        {"id": "acme/prefs", "revision": "main", "commit": c2, "split": "train", "subset": null},
        {"id": "acme/prefs", "revision": "main", "commit": c2, "split": "test", "subset": null},
        {"id": "acme/tiny-llama", "revision": "main", "commit": c1},
    ]);
    assert_eq!(hub, &want);
    // A subset: the files under its directory; HF_HOME/hub when HF_HUB_CACHE is unset; a revision by ref name.
    std::fs::create_dir_all(p.join("home")).unwrap();
    std::fs::rename(&cache, p.join("home/hub")).unwrap();
    let home = [("HF_HOME", "home")];
    let (good, e) = hub_run(p, &home, &["prepare", "--input", "acme/prefs", "--subset", "small", "--model", "acme/tiny-llama@v1", "--out", "sub"]);
    assert!(good, "{e}");
    assert_eq!(manifest(p, "sub")["counts"]["pairs_train"], 8, "{}", manifest(p, "sub"));
    let (good, e) = hub_run(p, &home, &["cache-ref", "--prepared", "sub", "--model", &format!("acme/tiny-llama@{c1}"), "--out", "cache"]);
    assert!(good, "{e}");
    assert_eq!(manifest(p, "cache")["settings"]["hub"][0]["commit"], c1.as_str());
    // Offline and missing: one error naming the id, the cache searched and the command that fetches it.
    let (good, e) = hub_run(p, &home, &["prepare", "--input", "in.parquet", "--model", "acme/missing", "--out", "x"]);
    assert!(!good && e.contains("`acme/missing`") && e.contains("home/hub/models--acme--missing") && e.contains("hf download acme/missing"), "{e}");
    let (good, e) = hub_run(p, &home, &["prepare", "--input", "acme/gone@v2", "--model", s(&model), "--out", "x"]);
    assert!(!good && e.contains("hf download acme/gone --repo-type dataset --revision v2"), "{e}");
    let (good, e) = hub_run(p, &home, &["prepare", "--input", "acme/prefs", "--split", "validation", "--model", s(&model), "--out", "x"]);
    assert!(!good && e.contains("split `validation`") && e.contains("data/test-00000-of-00001.parquet"), "{e}");
    assert!(!p.join("x").exists());
}

/// A Hub on the loopback (`HF_ENDPOINT`): the routes `hf-hub` calls (`/api/{models,datasets}/ID/
/// revision/REV` and `…/resolve/REV/FILE` with ranges, ETag and x-repo-commit), serving `root`'s
/// `models/ORG/NAME/…` and `datasets/ORG/NAME/…`. It stops by itself after two minutes.
const MOCK_HUB: &str = r#"
import hashlib, http.server, json, pathlib, sys, threading
root, commit = pathlib.Path(sys.argv[1]), sys.argv[2]
class Hub(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, code, body, headers):
        self.send_response(code)
        for k, v in headers.items(): self.send_header(k, v)
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def do_GET(self):
        parts = self.path.lstrip("/").split("/")
        if parts[0] == "api":
            base = root / parts[1] / parts[2] / parts[3]
            if not base.is_dir(): return self.reply(404, b"{}", {})
            files = sorted(str(f.relative_to(base)) for f in base.rglob("*") if f.is_file())
            return self.reply(200, json.dumps({"sha": commit, "siblings": [{"rfilename": f} for f in files]}).encode(), {"Content-Type": "application/json"})
        kind = "datasets" if parts[0] == "datasets" else "models"
        parts = parts[1:] if kind == "datasets" else parts
        f = root / kind / parts[0] / parts[1] / "/".join(parts[4:])
        if not f.is_file(): return self.reply(404, b"", {})
        data = f.read_bytes()
        a, _, b = self.headers.get("Range", "bytes=0-")[6:].partition("-")
        a, b = int(a), int(b) if b else len(data) - 1
        self.reply(206, data[a:b + 1], {"Content-Range": f"bytes {a}-{b}/{len(data)}", "ETag": '"' + hashlib.sha256(data).hexdigest() + '"', "x-repo-commit": commit})
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
threading.Timer(120, srv.shutdown).start()
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// An id missing from the cache, online: fetched with `hf-hub` into the cache in huggingface_hub's
/// layout (only the model's and the split's files), then found there offline.
#[test]
fn missing_hub_ids_are_downloaded_into_the_cache() {
    use std::io::BufRead;
    let d = tmp();
    let p = d.path();
    let model = tiny_model(p, "llama");
    ok(p, &["synth-prefs", "--out", "in.parquet", "--rows", "24"]);
    let hub = p.join("served");
    let repo = hub.join("models/acme/remote-llama");
    std::fs::create_dir_all(&repo).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(model.join(f), repo.join(f)).unwrap();
    }
    std::fs::write(repo.join("README.md"), "not fetched").unwrap();
    let data = hub.join("datasets/acme/rprefs");
    std::fs::create_dir_all(data.join("data")).unwrap();
    std::fs::copy(p.join("in.parquet"), data.join("data/train-00000-of-00001.parquet")).unwrap();
    std::fs::copy(p.join("in.parquet"), data.join("data/test-00000-of-00001.parquet")).unwrap();
    let commit = "c".repeat(40);
    let mut server = Command::new(python_bin()).args(["-c", MOCK_HUB, s(&hub), &commit]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut port = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap()).read_line(&mut port).unwrap();
    let endpoint = format!("http://127.0.0.1:{}", port.trim());
    let mut c = Command::new(bin());
    c.args(["prepare", "--input", "acme/rprefs", "--model", "acme/remote-llama", "--out", "dl"]).current_dir(p);
    let out = c.env("HF_ENDPOINT", &endpoint).env("HF_HUB_CACHE", "dl-cache").env_remove("HF_HUB_OFFLINE").env_remove("HF_HOME").output().unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let snap = p.join("dl-cache/models--acme--remote-llama/snapshots").join(&commit);
    assert_eq!(std::fs::read_to_string(p.join("dl-cache/models--acme--remote-llama/refs/main")).unwrap().trim(), commit);
    assert_eq!(std::fs::read(snap.join("model.safetensors")).unwrap(), std::fs::read(model.join("model.safetensors")).unwrap());
    assert!(!snap.join("README.md").exists(), "only the files a model directory needs");
    let dsnap = p.join("dl-cache/datasets--acme--rprefs/snapshots").join(&commit);
    assert!(dsnap.join("data/train-00000-of-00001.parquet").exists() && !dsnap.join("data/test-00000-of-00001.parquet").exists());
    assert_eq!(manifest(p, "dl")["counts"]["pairs_train"], 24);
    // Now in the cache: offline, the same command finds it (and the stage is up to date).
    let (good, e) =
        hub_run(p, &[("HF_HUB_CACHE", "dl-cache")], &["prepare", "--input", "acme/rprefs", "--model", "acme/remote-llama", "--out", "dl"]);
    assert!(good && e.contains("up to date"), "{e}");
}
