//! `cargo bench --bench ops`: the project's fused CPU ops against the same math from candle's
//! composite ops, forward + backward, at the shapes DESIGN.md measured.
use candle_core::{DType, Device, Tensor, Var};
use dpo_pipeline::model::decoder::{rms_norm, rms_norm_composite, softmax_last, softmax_last_composite};
use dpo_pipeline::model::fused;
use dpo_pipeline::model::logprobs::{token_logps_composite, token_logps_recompute};
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
    let a = time(fwd_bwd(&x, |x| rms_norm_composite(x, &w, 1e-6).unwrap()));
    let b = time(fwd_bwd(&x, |x| rms_norm(x, &w, 1e-6).unwrap()));
    println!("  rms_norm (1016,512)         composite {a:8.2}  fused {b:8.2}  ({:.1}x)", a / b);
    let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1016, 512), &dev).unwrap()).unwrap();
    let wv = Tensor::randn(0f32, 0.02, (8000, 512), &dev).unwrap();
    let targets: Vec<u32> = (0..1016u32).map(|i| (i * 7) % 8000).collect();
    let a = time(fwd_bwd(&h, |h| token_logps_composite(h, &wv, &targets).unwrap()));
    let b = time(fwd_bwd(&h, |h| fused::token_logps(h, &wv, &targets).unwrap()));
    println!("  lm-head log-probs (1016 x 512 x 8000) composite {a:8.2}  fused {b:8.2}  ({:.1}x)", a / b);
    // At Qwen2.5-0.5B's vocabulary with W trained (tied embeddings): the fused CPU op vs the
    // device-generic path GPUs and bf16 take (recomputing the logits in the backward); once each.
    let targets: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 151_936).collect();
    for (name, dt) in [("fused f32", DType::F32), ("recompute f32", DType::F32), ("recompute bf16", DType::BF16)] {
        let h = Var::from_tensor(&Tensor::randn(0f32, 1.0, (512, 896), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 0.02, (151_936, 896), &dev).unwrap().to_dtype(dt).unwrap()).unwrap();
        let t = Instant::now();
        let lp = match name {
            "fused f32" => fused::token_logps(h.as_tensor(), w.as_tensor(), &targets).unwrap(),
            _ => token_logps_recompute(h.as_tensor(), w.as_tensor(), &targets).unwrap(),
        };
        let _ = lp.to_dtype(DType::F32).unwrap().sum_all().unwrap().backward().unwrap();
        println!("  lm-head log-probs (512 x 896 x 151936, W trained) {name:15} {:8.0}", t.elapsed().as_secs_f64() * 1000.0);
    }
}
