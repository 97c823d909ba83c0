//! Turning pairs into decoder inputs. Three layouts, identical in what they score:
//! - `Packed` (default): every pair of the batch back to back in one row, no padding at all;
//!   each pair is its own attention block in the shared-prompt arrangement below, with
//!   positions restarting per pair, so no token sees another pair.
//! - `SharedPrompt`: one right-padded row per pair, prompt ‖ chosen ‖ rejected, rejected tokens
//!   blind to chosen ones and their positions restarting after the prompt: the prompt is
//!   computed once.
//! - `Padded`: chosen and rejected as separate right-padded rows (what TRL does): the ablation.
use crate::data::prepared::PairView;
use crate::model::decoder::{Block, SeqLayout};
use crate::model::logprobs::Scored;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutKind {
    Packed,
    SharedPrompt,
    Padded,
}

/// A pair cut to what is scored: prompt, and the completions' first `*_scored` tokens.
pub fn scored_parts<'a>(p: &PairView<'a>) -> (&'a [u32], &'a [u32], &'a [u32]) {
    (p.prompt, &p.chosen[..p.chosen_scored], &p.rejected[..p.rejected_scored])
}

/// Row length a pair needs in a layout (padded: the longer of its two rows).
pub fn row_len(kind: LayoutKind, p: &PairView) -> usize {
    let (pr, c, r) = scored_parts(p);
    match kind {
        LayoutKind::Padded => pr.len() + c.len().max(r.len()),
        LayoutKind::SharedPrompt | LayoutKind::Packed => pr.len() + c.len() + r.len(),
    }
}

/// Tokens the forward really computes for a pair (padding excluded; padded: the prompt twice).
pub fn computed_tokens(kind: LayoutKind, p: &PairView) -> usize {
    let (pr, c, r) = scored_parts(p);
    pr.len() * rows_per_pair(kind) + c.len() + r.len()
}

/// Rows (attention blocks) per pair in a layout.
pub fn rows_per_pair(kind: LayoutKind) -> usize {
    match kind {
        LayoutKind::Padded => 2,
        LayoutKind::SharedPrompt | LayoutKind::Packed => 1,
    }
}

/// Token slots a batch of pairs occupies, padding included.
pub fn slots(kind: LayoutKind, pairs: &[PairView]) -> usize {
    match kind {
        LayoutKind::Packed => pairs.iter().map(|p| row_len(kind, p)).sum(),
        _ => pairs.len() * rows_per_pair(kind) * pairs.iter().map(|p| row_len(kind, p)).max().unwrap_or(0),
    }
}

/// One attention block before padding: its tokens as (token, position, Some(seq) if scored),
/// its causal prefix length and its branches' lengths (see [`Block`]).
struct Unit {
    tokens: Vec<(u32, u32, Option<u32>)>,
    prefix: usize,
    branches: Vec<usize>,
}

fn units(kind: LayoutKind, pairs: &[PairView], score_prompt: bool) -> Vec<Unit> {
    let mut out = Vec::with_capacity(pairs.len() * rows_per_pair(kind));
    let n = pairs.len() as u32;
    for (i, p) in pairs.iter().enumerate() {
        let (pr, c, r) = scored_parts(p);
        let (sc, sr) = (2 * i as u32, 2 * i as u32 + 1);
        // With `score_prompt`, prompt tokens after the first are scored too, as sequence 2n + i.
        let sp = |k: usize| (score_prompt && k > 0).then_some(2 * n + i as u32);
        let prompt = pr.iter().enumerate().map(move |(k, &t)| (t, k as u32, sp(k)));
        let np = pr.len() as u32;
        let comp = |ids: &[u32], s: u32| ids.iter().enumerate().map(move |(k, &t)| (t, np + k as u32, Some(s))).collect::<Vec<_>>();
        match kind {
            // One causal sequence per completion: everything is prefix.
            LayoutKind::Padded => {
                for (row, (ids, s)) in [(c, sc), (r, sr)].into_iter().enumerate() {
                    // The prompt is scored once, in the chosen row.
                    let prompt = prompt.clone().map(|(t, k, s)| (t, k, if row == 0 { s } else { None }));
                    let tokens: Vec<_> = prompt.chain(comp(ids, s)).collect();
                    out.push(Unit { prefix: tokens.len(), tokens, branches: vec![] });
                }
            }
            LayoutKind::SharedPrompt | LayoutKind::Packed => {
                let tokens: Vec<_> = prompt.chain(comp(c, sc)).chain(comp(r, sr)).collect();
                out.push(Unit { tokens, prefix: pr.len(), branches: vec![c.len(), r.len()] });
            }
        }
    }
    out
}

/// Decoder input for `pairs`. Sequence 2i is pair i's chosen, 2i+1 its rejected, in `Scored`.
pub fn build(kind: LayoutKind, pairs: &[PairView]) -> (SeqLayout, Scored) {
    build_with(kind, pairs, false)
}

/// `build`, and with `score_prompt` each prompt's tokens after the first as sequence 2n + i
/// (ORPO's NLL covers the prompt).
pub fn build_with(kind: LayoutKind, pairs: &[PairView], score_prompt: bool) -> (SeqLayout, Scored) {
    let units = units(kind, pairs, score_prompt);
    // Packed blocks keep their own length; the padded layouts pad every row to the longest.
    let pad_to = match kind {
        LayoutKind::Packed => None,
        _ => Some(units.iter().map(|u| u.tokens.len()).max().unwrap_or(1).max(1)),
    };
    let total = pad_to.map_or_else(|| units.iter().map(|u| u.tokens.len()).sum(), |t| t * units.len());
    let mut layout =
        SeqLayout { input_ids: Vec::with_capacity(total), positions: Vec::with_capacity(total), blocks: Vec::with_capacity(units.len()) };
    let mut sc = Scored { num_seqs: if score_prompt { 3 } else { 2 } * pairs.len(), ..Default::default() };
    for u in &units {
        let base = layout.input_ids.len();
        let row = &u.tokens;
        for (i, &(tok, pos, seq)) in row.iter().enumerate() {
            layout.input_ids.push(tok);
            layout.positions.push(pos);
            if let Some(s) = seq {
                // The first completion token is predicted from the last prefix token; later
                // ones from the previous token of the same completion.
                // Prepared rows always have a prompt token (PreparedDataset::open checks it).
                let prev = (0..i).rev().find(|&j| j < u.prefix || row[j].2 == Some(s)).expect("a pair has a prompt token");
                sc.rows.push((base + prev) as u32);
                sc.targets.push(tok);
                sc.seq.push(s);
            }
        }
        let len = pad_to.unwrap_or(row.len());
        // Padding: token 0 at the next positions (never scored; each pad sees only itself).
        for i in row.len()..len {
            layout.input_ids.push(0);
            layout.positions.push(i as u32);
        }
        layout.blocks.push(Block { len, prefix: u.prefix, branches: u.branches.clone() });
    }
    (layout, sc)
}

/// Groups `items` (pair index, row length) into batches of at most `budget` token slots
/// (padding included), in length order so padded rows waste little.
pub fn plan_batches(kind: LayoutKind, mut items: Vec<(u32, usize)>, budget: usize) -> Vec<Vec<u32>> {
    items.sort_by_key(|&(i, len)| (len, i));
    let per = rows_per_pair(kind);
    let mut batches = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    let mut used = 0;
    for (i, len) in items {
        // Sorted ascending, so `len` is the longest row so far in this batch.
        let after = match kind {
            LayoutKind::Packed => used + len,
            _ => (cur.len() + 1) * per * len,
        };
        if !cur.is_empty() && after > budget {
            batches.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(i);
        used += len;
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}
