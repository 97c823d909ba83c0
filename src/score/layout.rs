//! Turning pairs into decoder inputs. Two layouts, identical in what they score:
//! - `Padded`: chosen and rejected as separate right-padded rows (what TRL does).
//! - `SharedPrompt`: one row per pair, prompt ‖ chosen ‖ rejected, rejected tokens blind to
//!   chosen ones and their positions restarting after the prompt: the prompt is computed once.
use crate::data::prepared::PairView;
use crate::model::decoder::SeqLayout;
use crate::model::logprobs::Scored;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LayoutKind {
    Padded,
    SharedPrompt,
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
        LayoutKind::SharedPrompt => pr.len() + c.len() + r.len(),
    }
}

/// Tokens the forward really computes for a pair (padding excluded; padded: the prompt twice).
pub fn computed_tokens(kind: LayoutKind, p: &PairView) -> usize {
    let (pr, c, r) = scored_parts(p);
    pr.len() * rows_per_pair(kind) + c.len() + r.len()
}

/// Rows per pair in a layout.
pub fn rows_per_pair(kind: LayoutKind) -> usize {
    match kind {
        LayoutKind::Padded => 2,
        LayoutKind::SharedPrompt => 1,
    }
}

/// Decoder input for `pairs`. Sequence 2i is pair i's chosen, 2i+1 its rejected, in `Scored`.
pub fn build(kind: LayoutKind, pairs: &[PairView]) -> (SeqLayout, Scored) {
    let rows: Vec<Vec<(u32, u32, Option<u32>)>> = match kind {
        // Each entry: (token, position, Some(seq) if the token is scored).
        LayoutKind::Padded => pairs
            .iter()
            .flat_map(|p| {
                let (pr, c, r) = scored_parts(p);
                [c, r].map(|comp| pr.iter().map(|&t| (t, None)).chain(comp.iter().map(|&t| (t, Some(())))).collect::<Vec<_>>())
            })
            .enumerate()
            .map(|(s, toks)| toks.into_iter().enumerate().map(|(pos, (t, sc))| (t, pos as u32, sc.map(|_| s as u32))).collect())
            .collect(),
        LayoutKind::SharedPrompt => pairs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let (pr, c, r) = scored_parts(p);
                let np = pr.len() as u32;
                let mut row: Vec<(u32, u32, Option<u32>)> = pr.iter().enumerate().map(|(k, &t)| (t, k as u32, None)).collect();
                row.extend(c.iter().enumerate().map(|(k, &t)| (t, np + k as u32, Some(2 * i as u32))));
                row.extend(r.iter().enumerate().map(|(k, &t)| (t, np + k as u32, Some(2 * i as u32 + 1))));
                row
            })
            .collect(),
    };
    let batch = rows.len();
    let len = rows.iter().map(|r| r.len()).max().unwrap_or(1).max(1);
    let mut layout =
        SeqLayout { batch, len, input_ids: vec![0; batch * len], positions: vec![0; batch * len], visible: vec![false; batch * len * len] };
    let mut sc = Scored { num_seqs: 2 * pairs.len(), ..Default::default() };
    for (b, row) in rows.iter().enumerate() {
        let base = b * len;
        // Where each token's own sequence starts (for "blind to chosen" in the shared layout).
        let prompt_len = row.iter().take_while(|e| e.2.is_none()).count();
        for (i, &(tok, pos, seq)) in row.iter().enumerate() {
            layout.input_ids[base + i] = tok;
            layout.positions[base + i] = pos;
            for (j, &(_, _, sj)) in row.iter().enumerate().take(i + 1) {
                // A key is visible if it is the prompt, or belongs to the same completion.
                layout.visible[(base + i) * len + j] = j < prompt_len || sj == seq;
            }
            if let Some(s) = seq {
                // The first completion token is predicted from the last prompt token; later
                // ones from the previous token of the same completion.
                // Prepared rows always have a prompt token (PreparedDataset::open checks it).
                let prev = (0..i).rev().find(|&j| j < prompt_len || row[j].2 == Some(s)).expect("a pair has a prompt token");
                sc.rows.push((base + prev) as u32);
                sc.targets.push(tok);
                sc.seq.push(s);
            }
        }
        // Padding: each pad query sees itself only (keeps softmax finite; never scored).
        for i in row.len()..len {
            layout.positions[base + i] = i as u32;
            layout.visible[(base + i) * len + i] = true;
        }
    }
    (layout, sc)
}

/// Groups `items` (pair index, row length) into batches whose padded size
/// `rows × longest row` stays within `budget` tokens; sorted by length to waste little padding.
pub fn plan_batches(kind: LayoutKind, mut items: Vec<(u32, usize)>, budget: usize) -> Vec<Vec<u32>> {
    items.sort_by_key(|&(i, len)| (len, i));
    let per = rows_per_pair(kind);
    let mut batches = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (i, len) in items {
        // Sorted ascending, so `len` is the longest row so far in this batch.
        if !cur.is_empty() && (cur.len() + 1) * per * len > budget {
            batches.push(std::mem::take(&mut cur));
        }
        cur.push(i);
    }
    if !cur.is_empty() {
        batches.push(cur);
    }
    batches
}
