//! Sampling completions from a decoder with a key-value cache: the prompts of a batch are
//! prefilled in one packed forward, each prompt's samples start from copies of its cache, and
//! every step decodes one token for all unfinished samples at once. Token choice follows
//! transformers' `generate`: temperature 0 is greedy (argmax); otherwise the logits are divided
//! by the temperature, then top-k, then top-p filtered, and a token is drawn from the softmax
//! of what is left. Each sample draws from its own seeded generator, so what it samples does
//! not depend on the thread count or on which other samples share its batch.
use crate::model::decoder::{Block, SeqLayout};
use crate::model::Decoder;
use crate::rng::Rng;
use anyhow::Result;

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0: greedy.
    pub temperature: f64,
    /// Keep the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
}

/// Why a completion ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// It produced an end-of-sequence token (kept as its last id).
    Eos,
    /// It reached the new-token limit.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Eos => "eos",
            Finish::Length => "length",
        }
    }
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub ids: Vec<u32>,
    pub finish: Finish,
    /// Σ log π(token | context) of its tokens under the model's own softmax (before
    /// temperature and filtering), f64.
    pub logp: f64,
}

/// A prompt to complete `seeds.len()` times, sample k drawing from `Rng::new(seeds[k])`.
pub struct Request {
    pub prompt: Vec<u32>,
    pub seeds: Vec<u64>,
}

/// The probabilities `sampling` draws from (temperature, then top-k, then top-p, as
/// transformers' logits warpers in that order); zero for filtered tokens.
pub fn sampling_probs(logits: &[f32], s: &Sampling) -> Vec<f64> {
    let scores: Vec<f64> = logits.iter().map(|&x| x as f64 / s.temperature).collect();
    let mut keep = vec![true; scores.len()];
    if s.top_k > 0 && s.top_k < scores.len() {
        // TopKLogitsWarper: drop scores below the k-th largest (ties with it stay).
        let mut sorted = scores.clone();
        sorted.sort_unstable_by(|a, b| b.total_cmp(a));
        let kth = sorted[s.top_k - 1];
        for (k, &x) in keep.iter_mut().zip(&scores) {
            *k = x >= kth;
        }
    }
    let softmax = |keep: &[bool]| {
        let max = scores.iter().zip(keep).filter(|(_, &k)| k).map(|(&x, _)| x).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().zip(keep).map(|(&x, &k)| if k { (x - max).exp() } else { 0.0 }).collect();
        let sum: f64 = e.iter().sum();
        e.into_iter().map(|x| x / sum).collect::<Vec<f64>>()
    };
    if s.top_p < 1.0 {
        // TopPLogitsWarper: in ascending order, drop tokens while the cumulative probability
        // stays at or below 1 − p; the most likely token always stays.
        let probs = softmax(&keep);
        let mut order: Vec<usize> = (0..scores.len()).filter(|&i| keep[i]).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
        let mut cum = 0.0;
        for &i in &order[..order.len() - 1] {
            cum += probs[i];
            if cum <= 1.0 - s.top_p {
                keep[i] = false;
            }
        }
    }
    softmax(&keep)
}

/// The next token from one row of logits, and its log-prob under the model's own softmax.
pub fn choose(logits: &[f32], s: &Sampling, rng: &mut Rng) -> (u32, f64) {
    // One pass of exp serves the log-prob and, at temperature 1 without filters, the draw.
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&x| (x as f64 - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    let logp = |t: usize| logits[t] as f64 - max - sum.ln();
    let token = if s.temperature == 0.0 {
        // torch.argmax: the first of equal maxima.
        logits.iter().position(|&x| x as f64 == max).unwrap_or(0)
    } else if s.temperature == 1.0 && s.top_k == 0 && s.top_p >= 1.0 {
        draw(&e, sum, rng)
    } else {
        draw(&sampling_probs(logits, s), 1.0, rng)
    };
    (token as u32, logp(token))
}

/// Inverse-CDF draw from unnormalised weights summing to `total`.
fn draw(weights: &[f64], total: f64, rng: &mut Rng) -> usize {
    let u = rng.uniform() * total;
    let mut cum = 0.0;
    let mut last = 0;
    for (i, &w) in weights.iter().enumerate() {
        if w > 0.0 {
            cum += w;
            last = i;
            if u < cum {
                return i;
            }
        }
    }
    last
}

/// One unfinished sample.
struct Live {
    request: usize,
    sample: usize,
    rng: Rng,
    ids: Vec<u32>,
    logp: f64,
}

/// Completes every request, up to `max_new` tokens each, stopping at any of `eos`.
/// `on_token(n)` reports n more tokens generated (for a progress bar).
pub fn generate(
    dec: &Decoder,
    requests: &[Request],
    max_new: usize,
    eos: &[u32],
    s: &Sampling,
    on_token: &mut dyn FnMut(usize),
) -> Result<Vec<Vec<Completion>>> {
    if max_new == 0 {
        let empty = Completion { ids: vec![], finish: Finish::Length, logp: 0.0 };
        return Ok(requests.iter().map(|r| vec![empty.clone(); r.seeds.len()]).collect());
    }
    let mut out: Vec<Vec<Option<Completion>>> = requests.iter().map(|r| vec![None; r.seeds.len()]).collect();
    let mut finish = |l: Live, f: Finish| out[l.request][l.sample] = Some(Completion { ids: l.ids, finish: f, logp: l.logp });
    // Prefill: the prompts back to back, each its own causal block.
    let mut layout = SeqLayout::default();
    let mut spans = Vec::with_capacity(requests.len());
    for r in requests {
        anyhow::ensure!(!r.prompt.is_empty(), "a prompt has no tokens");
        spans.push((layout.input_ids.len(), r.prompt.len()));
        layout.input_ids.extend(&r.prompt);
        layout.positions.extend(0..r.prompt.len() as u32);
        layout.blocks.push(Block::causal(r.prompt.len()));
    }
    let mut live = Vec::new();
    let mut rows = Vec::new();
    let mut cache = if requests.is_empty() {
        None
    } else {
        let (hidden, kv) = dec.hidden_kv(&layout)?;
        let last: Vec<u32> = spans.iter().map(|&(start, len)| (start + len - 1) as u32).collect();
        let logits = dec.logits(&hidden.index_select(&candle_core::Tensor::from_slice(&last, last.len(), &dec.device)?, 0)?)?.to_vec2::<f32>()?;
        for (ri, r) in requests.iter().enumerate() {
            for (si, &seed) in r.seeds.iter().enumerate() {
                let mut rng = Rng::new(seed);
                let (token, logp) = choose(&logits[ri], s, &mut rng);
                let l = Live { request: ri, sample: si, rng, ids: vec![token], logp };
                if eos.contains(&token) {
                    finish(l, Finish::Eos);
                } else if max_new == 1 {
                    finish(l, Finish::Length);
                } else {
                    rows.push(spans[ri]);
                    live.push(l);
                }
            }
        }
        on_token(requests.iter().map(|r| r.seeds.len()).sum());
        if rows.is_empty() {
            None
        } else {
            Some(dec.batch_cache(&kv, &rows, max_new - 1)?)
        }
    };
    // One slot per cache row; a finished row is fed a dummy token until the rows are compacted.
    let mut slots: Vec<Option<Live>> = live.into_iter().map(Some).collect();
    while let Some(c) = cache.as_mut() {
        let running = slots.iter().filter(|l| l.is_some()).count();
        if running == 0 {
            break;
        }
        // Finished rows leave the cache once they are a quarter of it (a copy of the cache).
        if running * 4 <= slots.len() * 3 {
            let keep: Vec<u32> = (0..slots.len() as u32).filter(|&r| slots[r as usize].is_some()).collect();
            c.keep(&keep)?;
            slots.retain(Option::is_some);
        }
        let ids: Vec<u32> = slots.iter().map(|l| l.as_ref().map_or(0, |l| *l.ids.last().expect("one token"))).collect();
        let logits = dec.logits(&dec.decode(&ids, c)?)?.to_vec2::<f32>()?;
        on_token(running);
        for (slot, logits) in slots.iter_mut().zip(&logits) {
            let Some(l) = slot.as_mut() else { continue };
            let (token, logp) = choose(logits, s, &mut l.rng);
            l.logp += logp;
            l.ids.push(token);
            let done = if eos.contains(&token) { Some(Finish::Eos) } else { (l.ids.len() >= max_new).then_some(Finish::Length) };
            if let Some(f) = done {
                finish(slot.take().expect("running"), f);
            }
        }
    }
    Ok(out.into_iter().map(|v| v.into_iter().map(|c| c.expect("every sample finishes")).collect()).collect())
}
