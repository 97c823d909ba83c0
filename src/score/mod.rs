//! Scoring pairs with the decoder: turns prepared pairs into decoder inputs (`layout`) and
//! sums the completion tokens' log-probs per sequence. The one place that knows both the
//! prepared format and the model; the same code serves cache-ref and train.
pub mod layout;

use crate::data::prepared::PairView;
use crate::model::logprobs::{sequence_logps, token_logps, Scored};
use crate::model::Decoder;
use anyhow::Result;
use candle_core::Tensor;
use layout::LayoutKind;

/// Sequence log-probs of a batch of pairs: (chosen [n], rejected [n]) f32, plus the per-token
/// values of every scored position (sequence 2i = pair i's chosen, 2i+1 its rejected).
pub struct PairLogps {
    pub chosen: Tensor,
    pub rejected: Tensor,
    pub tokens: Tensor,
    pub scored: Scored,
    /// MoE models: the router's load-balancing loss over the batch's tokens, each shared prompt
    /// token counted once per completion as in TRL's padded rows (None for dense models).
    pub aux_loss: Option<Tensor>,
}

pub fn pair_logps(decoder: &Decoder, kind: LayoutKind, pairs: &[PairView]) -> Result<PairLogps> {
    let (layout, scored) = layout::build(kind, pairs);
    let f = decoder.forward(&layout)?;
    let tokens = token_logps(&f.hidden, decoder.lm_head(), &scored, decoder.cfg.final_softcap)?;
    let seqs = sequence_logps(&tokens, &scored)?.reshape((pairs.len(), 2))?;
    let aux_loss = decoder.aux_loss(&f.router_logits, &layout.token_weights())?;
    Ok(PairLogps { chosen: seqs.narrow(1, 0, 1)?.squeeze(1)?, rejected: seqs.narrow(1, 1, 1)?.squeeze(1)?, tokens, scored, aux_loss })
}
