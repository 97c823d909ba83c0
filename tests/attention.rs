//! The attention that keeps no scores (fused CPU kernel, device-generic recomputing version)
//! against the composite reference and PyTorch, in value and gradient, on every layout and
//! mask kind: packed pairs with branches, padding, sliding windows, GQA, soft-capping.
mod common;
use candle_core::{DType, Device, Tensor, Var};
use dpo_pipeline::model::attention::{attention, attention_composite, attention_recompute, AttnLayout, AttnOptions, Span};
use dpo_pipeline::rng::Rng;
use std::sync::Arc;

/// A span: causal prefix, then branches (their lengths), then `pad` padding tokens; positions
/// restart after the prefix for every branch, as the packed layout sets them.
fn span(start: usize, prefix: usize, branches: &[usize], pad: usize, pos: &mut Vec<u32>) -> Span {
    pos.extend(0..prefix as u32);
    let mut at = prefix;
    let mut b = Vec::new();
    for &n in branches {
        b.push((at, n));
        pos.extend(prefix as u32..(prefix + n) as u32);
        at += n;
    }
    let last = pos.last().map_or(0, |p| p + 1);
    pos.extend(last..last + pad as u32);
    Span { start, len: at + pad, prefix, branches: b }
}

fn layout(shapes: &[(usize, &[usize], usize)]) -> Arc<AttnLayout> {
    let mut positions = Vec::new();
    let mut spans = Vec::new();
    for &(prefix, branches, pad) in shapes {
        let start = positions.len();
        spans.push(span(start, prefix, branches, pad, &mut positions));
    }
    Arc::new(AttnLayout { spans, positions })
}

fn randn(rng: &mut Rng, shape: (usize, usize, usize), dtype: DType) -> Tensor {
    let n = shape.0 * shape.1 * shape.2;
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), shape, &Device::Cpu).unwrap().to_dtype(dtype).unwrap()
}

type Impl = fn(&Tensor, &Tensor, &Tensor, &Arc<AttnLayout>, AttnOptions) -> anyhow::Result<Tensor>;

fn composite(q: &Tensor, k: &Tensor, v: &Tensor, l: &Arc<AttnLayout>, o: AttnOptions) -> anyhow::Result<Tensor> {
    attention_composite(q, k, v, l, o)
}

/// Output and the gradients of Σ y ⊙ w with respect to q, k, v.
fn run(f: Impl, qkv: &[Tensor; 3], w: &Tensor, l: &Arc<AttnLayout>, o: AttnOptions) -> Vec<Tensor> {
    let vars: Vec<Var> = qkv.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let y = f(vars[0].as_tensor(), vars[1].as_tensor(), vars[2].as_tensor(), l, o).unwrap();
    let grads = (y.to_dtype(DType::F64).unwrap() * w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y.detach()];
    out.extend(vars.iter().map(|v| grads.get(v.as_tensor()).expect("a gradient").clone()));
    out
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

fn cases() -> Vec<(&'static str, Arc<AttnLayout>)> {
    vec![
        ("packed pairs", layout(&[(5, &[4, 4], 0), (3, &[5, 1], 0), (1, &[1, 1], 0)])),
        ("padded rows", layout(&[(6, &[], 4), (10, &[], 0)])),
        ("shared-prompt rows", layout(&[(4, &[3, 2], 3), (2, &[5, 4], 1)])),
        // Longer than the query (128) and key (256) tiles, so tiles and the online softmax span several.
        ("long pair", layout(&[(300, &[280, 150], 0), (30, &[70, 100], 0)])),
    ]
}

fn options() -> Vec<AttnOptions> {
    vec![
        AttnOptions { scale: 0.35, softcap: None, window: None },
        AttnOptions { scale: 0.35, softcap: None, window: Some(3) },
        AttnOptions { scale: 0.35, softcap: Some(0.8), window: None },
        AttnOptions { scale: 0.35, softcap: Some(2.0), window: Some(70) },
    ]
}

/// Checks `f` against the composite reference in `dtype` (with GQA: 6 query heads, 2 kv heads).
fn against_reference(f: Impl, dtype: DType, tol: f64) {
    let mut rng = Rng::new(5);
    for (name, l) in cases() {
        let n = l.tokens();
        let qkv = [randn(&mut rng, (n, 6, 16), dtype), randn(&mut rng, (n, 2, 16), dtype), randn(&mut rng, (n, 2, 16), dtype)];
        let w = randn(&mut rng, (n, 6, 16), DType::F64);
        for o in options() {
            let want = run(composite, &qkv, &w, &l, o);
            let got = run(f, &qkv, &w, &l, o);
            for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
                let d = max_diff(&got[i], &want[i]);
                assert!(d < tol, "{name} {o:?} {dtype:?}: {what} differs by {d}");
            }
        }
    }
}

#[test]
fn fused_attention_matches_the_composite_ops_in_value_and_gradient() {
    against_reference(attention, DType::F64, 1e-10);
    against_reference(attention, DType::F32, 1e-5);
}

#[test]
fn recomputing_attention_matches_the_composite_ops_in_value_and_gradient() {
    against_reference(attention_recompute, DType::F64, 1e-10);
    against_reference(attention_recompute, DType::F32, 1e-5);
}

#[test]
fn recomputing_attention_in_bf16_tracks_f32() {
    let mut rng = Rng::new(9);
    let l = layout(&[(40, &[30, 20], 0)]);
    let n = l.tokens();
    let qkv32 = [randn(&mut rng, (n, 4, 32), DType::F32), randn(&mut rng, (n, 2, 32), DType::F32), randn(&mut rng, (n, 2, 32), DType::F32)];
    let qkv16 = qkv32.clone().map(|t| t.to_dtype(DType::BF16).unwrap());
    let w = randn(&mut rng, (n, 4, 32), DType::F64);
    let o = AttnOptions { scale: 32f64.powf(-0.5), softcap: Some(5.0), window: Some(25) };
    let a = run(attention, &qkv32, &w, &l, o);
    let b = run(attention_recompute, &qkv16, &w, &l, o);
    for (i, what) in ["output", "dq", "dk", "dv"].iter().enumerate() {
        let scale = max_diff(&a[i], &a[i].zeros_like().unwrap());
        let d = max_diff(&a[i], &b[i]);
        assert!(d < 0.05 * scale.max(1.0), "{what}: bf16 differs from f32 by {d} (scale {scale})");
    }
}

#[test]
fn fused_attention_matches_pytorch_sdpa() {
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(common::golden("sdpa.json")).unwrap()).unwrap();
    for case in g["cases"].as_array().unwrap() {
        let t = |k: &str| -> Tensor {
            let shape: Vec<usize> = case[k]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            let data: Vec<f32> = case[k]["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
        };
        let mut positions = Vec::new();
        let mut spans = Vec::new();
        for s in case["spans"].as_array().unwrap() {
            let branches: Vec<usize> = s["branches"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
            spans.push(span(positions.len(), s["prefix"].as_u64().unwrap() as usize, &branches, s["pad"].as_u64().unwrap() as usize, &mut positions));
        }
        let l = Arc::new(AttnLayout { spans, positions });
        let o = AttnOptions {
            scale: case["scale"].as_f64().unwrap(),
            softcap: case["softcap"].as_f64(),
            window: case["window"].as_u64().map(|w| w as usize),
        };
        let got = run(attention, &[t("q"), t("k"), t("v")], &t("w").to_dtype(DType::F64).unwrap(), &l, o);
        for (i, what) in ["y", "dq", "dk", "dv"].iter().enumerate() {
            let d = max_diff(&got[i], &t(what));
            assert!(d < 1e-5, "{}: {what} differs from PyTorch by {d}", case["name"]);
        }
    }
}
