//! Scoring pairs with the decoder: turns prepared pairs into decoder inputs (`layout`) and
//! sums the completion tokens' log-probs per sequence. The one place that knows both the
//! prepared format and the model; the same code serves cache-ref and train.
pub mod layout;

use crate::data::prepared::PairView;
use crate::model::logprobs::{sequence_logps, Scored, TokenStats};
use crate::model::Decoder;
use anyhow::Result;
use candle_core::Tensor;
use layout::LayoutKind;

/// Sequence log-probs of a batch of pairs: (chosen [n], rejected [n]) f32, plus the per-token
/// values of every scored position (sequence 2i = pair i's chosen, 2i+1 its rejected, 2n + i
/// its prompt when asked for).
pub struct PairLogps {
    /// Summed over each completion's scored tokens (LD-weighted under `ld_alpha`).
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub tokens: Tensor,
    pub scored: Scored,
    /// Each scored token's statistics (entropy, log Σ p², mean logit, top-1), when asked for.
    pub stats: TokenStats,
    /// Each prompt's tokens after the first, summed (ORPO's NLL), when asked for.
    pub prompt: Option<Tensor>,
    /// MoE models: the router's load-balancing loss over the batch's tokens, each shared prompt
    /// token counted once per completion as in TRL's padded rows (None for dense models).
    pub aux_loss: Option<Tensor>,
}

/// What `pair_logps_with` computes beyond the sums.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairOptions {
    /// Per-token statistics (TRL's metrics, WPO's weights).
    pub stats: bool,
    /// LD-DPO: completion tokens past min(chosen, rejected scored length) count α times.
    pub ld_alpha: Option<f64>,
    /// Score the prompts' tokens too (ORPO).
    pub score_prompt: bool,
}

pub fn pair_logps(decoder: &Decoder, kind: LayoutKind, pairs: &[PairView]) -> Result<PairLogps> {
    pair_logps_with(decoder, kind, pairs, PairOptions::default())
}

pub fn pair_logps_with(decoder: &Decoder, kind: LayoutKind, pairs: &[PairView], o: PairOptions) -> Result<PairLogps> {
    let (layout, scored) = layout::build_with(kind, pairs, o.score_prompt);
    let f = decoder.forward(&layout)?;
    let (tokens, stats) = decoder.token_logps_stats(&f.hidden, &scored, o.stats)?;
    let aux_loss = decoder.aux_loss(&f.router_logits, &layout.token_weights())?;
    PairLogps::from_tokens(pairs, tokens, scored, stats, o, aux_loss)
}

impl PairLogps {
    /// Sums per-token log-probs (in `scored` order) into the pairs' sequence log-probs.
    pub fn from_tokens(
        pairs: &[PairView],
        tokens: Tensor,
        scored: Scored,
        stats: TokenStats,
        o: PairOptions,
        aux_loss: Option<Tensor>,
    ) -> Result<Self> {
        let n = pairs.len();
        let weights = o.ld_alpha.map(|a| ld_weights(pairs, &scored, a));
        let seqs = sequence_logps(&tokens, &scored, weights.as_deref())?;
        let pair_seqs = seqs.narrow(0, 0, 2 * n)?.reshape((n, 2))?;
        let prompt = if o.score_prompt { Some(seqs.narrow(0, 2 * n, n)?) } else { None };
        Ok(PairLogps {
            chosen: pair_seqs.narrow(1, 0, 1)?.squeeze(1)?,
            rejected: pair_seqs.narrow(1, 1, 1)?.squeeze(1)?,
            tokens,
            scored,
            stats,
            prompt,
            aux_loss,
        })
    }
}

impl PairLogps {
    /// Each completion's log-probs summed over its first min(chosen, rejected) scored tokens
    /// (LD-DPO's shared part), from the same forward: (chosen [n], rejected [n]).
    pub fn shared_sums(&self, pairs: &[PairView]) -> Result<(Tensor, Tensor)> {
        let n = pairs.len();
        let seqs = sequence_logps(&self.tokens, &self.scored, Some(&ld_weights(pairs, &self.scored, 0.0)))?;
        let pair_seqs = seqs.narrow(0, 0, 2 * n)?.reshape((n, 2))?;
        Ok((pair_seqs.narrow(1, 0, 1)?.squeeze(1)?, pair_seqs.narrow(1, 1, 1)?.squeeze(1)?))
    }
}

/// LD-DPO's token weights, in the order of `scored`: a pair's first min(chosen, rejected)
/// scored completion tokens 1, the rest α (prompt tokens 1).
pub fn ld_weights(pairs: &[PairView], scored: &Scored, alpha: f64) -> Vec<f32> {
    let n = pairs.len();
    let mut seen = vec![0usize; scored.num_seqs];
    scored
        .seq
        .iter()
        .map(|&s| {
            let s = s as usize;
            let j = seen[s];
            seen[s] += 1;
            if s >= 2 * n {
                return 1.0;
            }
            let p = &pairs[s / 2];
            if j < p.chosen_scored.min(p.rejected_scored) {
                1.0
            } else {
                alpha as f32
            }
        })
        .collect()
}
