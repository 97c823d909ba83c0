//! `cargo bench --bench ops`: the project's fused CPU ops against the same math from candle's
//! composite ops, forward + backward, at the shapes DESIGN.md measured.
use candle_core::{DType, Device, Tensor, Var};
use dpo_pipeline::model::attention::{attention, attention_composite, attention_recompute, AttnLayout, AttnOptions, Span};
use dpo_pipeline::model::config::NormStyle;
use dpo_pipeline::model::fused;
use dpo_pipeline::model::logprobs::{token_logps_composite, token_logps_recompute};
use dpo_pipeline::model::ops::{rms_norm, rms_norm_composite, softmax_last, softmax_last_composite};
use std::sync::Arc;
use std::time::Instant;

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let n = 5;
    let t = Instant::now();
    for _ in 0..n {
        f();
    }
    t.elapsed().as_secs_f64() * 1000.0 / n as f64
}

fn fwd_bwd<'a>(x: &'a Var, y: impl Fn(&Tensor) -> Tensor + 'a) -> impl FnMut() + 'a {
    move || {
        let out = y(x.as_tensor());
        let _ = out.sum_all().unwrap().backward().unwrap();
    }
}

fn main() {
    let threads = std::env::var("BENCH_THREADS").unwrap_or_else(|_| "2".into());
    std::env::set_var("RAYON_NUM_THREADS", &threads);
    let dev = Device::Cpu;
    println!("ops benchmark (f32, {threads} threads, ms per forward+backward, mean of 5)");
    let s = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 8, 127, 127), &dev).unwrap()).unwrap();
    let a = time(fwd_bwd(&s, |x| softmax_last_composite(x).unwrap()));
    let b = time(fwd_bwd(&s, |x| softmax_last(x).unwrap()));
    println!("  softmax (8,8,127,127)       composite {a:8.2}  fused {b:8.2}  ({:.1}x)", a / b);
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1016, 512), &dev).unwrap()).unwrap();
    let w = Tensor::ones(512, DType::F32, &dev).unwrap();
    let a = time(fwd_bwd(&x, |x| rms_norm_composite(x, &w, 1e-6, NormStyle::Weight).unwrap()));
    let b = time(fwd_bwd(&x, |x| rms_norm(x, &w, 1e-6, NormStyle::Weight).unwrap()));
    println!("  rms_norm (1016,512)         composite {a:8.2}  fused {b:8.2}  ({:.1}x)", a / b);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1016, 512), &dev).unwrap()).unwrap();
    let wv = Tensor::randn(0f32, 0.02, (8000, 512), &dev).unwrap();
    let targets: Vec<u32> = (0..1016u32).map(|i| (i * 7) % 8000).collect();
    let a = time(fwd_bwd(&h, |h| token_logps_composite(h, &wv, &targets, None).unwrap()));
    let b = time(fwd_bwd(&h, |h| fused::token_logps(h, &wv, &targets, None).unwrap()));
    println!("  lm-head log-probs (1016 x 512 x 8000) composite {a:8.2}  fused {b:8.2}  ({:.1}x)", a / b);
    // At Qwen2.5-0.5B's vocabulary with W trained (tied embeddings): the fused CPU op vs the
    // device-generic path GPUs and bf16 take (recomputing the logits in the backward); once each.
    let targets: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 151_936).collect();
    for (name, dt) in [("fused f32", DType::F32), ("recompute f32", DType::F32), ("recompute bf16", DType::BF16)] {
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (512, 896), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (151_936, 896), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
        let t = Instant::now();
        let lp = match name {
            "fused f32" => fused::token_logps(h.as_tensor(), w.as_tensor(), &targets, None).unwrap(),
            _ => token_logps_recompute(h.as_tensor(), w.as_tensor(), &targets, None).unwrap(),
        };
        let _ = lp.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        println!("  lm-head log-probs (512 x 896 x 151936, W trained) {name:15} {:8.0}", t.elapsed().as_secs_f64() * 1000.0);
    }
    // Attention over one long pair (prompt 1,000 + chosen 900 + rejected 900 tokens, 8 heads of
    // 64, one layer): scores kept whole (composite) vs the tiled kernels that keep none.
    let (p, c, r) = (1000usize, 900usize, 900usize);
    let n = p + c + r;
    let positions: Vec<u32> = (0..p as u32).chain(p as u32..(p + c) as u32).chain(p as u32..(p + r) as u32).collect();
    let layout = Arc::new(AttnLayout { spans: vec![Span { start: 0, len: n, prefix: p, branches: vec![(p, c), (p + c, r)] }], positions });
    let opts = AttnOptions { scale: 0.125, softcap: None, window: None };
    let qkv: Vec<Var> = (0..3).map(|_| Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, 8, 64), &dev).unwrap()).unwrap()).collect();
    type Attn = fn(&Tensor, &Tensor, &Tensor, &Arc<AttnLayout>, AttnOptions) -> anyhow::Result<Tensor>;
    let composite: Attn = |q, k, v, l, o| attention_composite(q, k, v, l, o);
    for (name, f) in [("composite", composite), ("fused", attention as Attn), ("recompute", attention_recompute as Attn)] {
        let t = Instant::now();
        let y = f(qkv[0].as_tensor(), qkv[1].as_tensor(), qkv[2].as_tensor(), &layout, opts).unwrap();
        let fwd = t.elapsed().as_secs_f64() * 1000.0;
        let _ = y.sum_all().unwrap().backward().unwrap();
        println!("  attention ({n} tokens, 8 x 64) {name:10} forward {fwd:8.0}  forward+backward {:8.0}", t.elapsed().as_secs_f64() * 1000.0);
    }
}
