//! The memory plan of a training run, per rank: the frozen base, the trained weights, their
//! gradients and AdamW moments (computed from the tensors), the activations per token
//! (measured on one pair), and under `--max-memory` what the run turns on to fit: gradient
//! checkpointing first, then micro-batches in pieces of fewer tokens.
use anyhow::{bail, Result};

const GB: f64 = 1e9;
/// Kept spare of the room for activations: allocator slack and pairs longer than the probe.
const SPARE: f64 = 0.1;

/// What one rank of the run needs. Bytes throughout.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Frozen base weights as held (4-bit layers packed); 0 under full fine-tuning.
    pub frozen_bytes: u64,
    pub trainable_params: u64,
    /// The trained weights (the f32 master copy).
    pub trainable_bytes: u64,
    /// One set of gradients, and a second one while micro-batches or pieces accumulate.
    pub gradient_bytes: u64,
    /// This rank's AdamW moments (its share under ZeRO-1).
    pub optimizer_bytes: u64,
    /// Everything else live before any pass: heap beyond the weights and moments (tokenizer,
    /// data index, cached reference columns) and mapped files (the program, the data).
    pub other_bytes: u64,
    /// Under --shard-params: what a step holds whole beyond this rank's shards at its peak:
    /// the root unit's full gradients and one layer gathered with its gradients.
    pub gathered_bytes: u64,
    /// Activations per token of one pair's forward and backward (measured, gradients excluded).
    pub per_token_bytes: f64,
    /// The pair the activations were measured on, its computed tokens.
    pub probe_tokens: usize,
    /// The most tokens a micro-batch of this run can hold (its longest pairs together).
    pub largest_micro_batch_tokens: usize,
    pub gradient_checkpointing: bool,
    /// Tokens per piece when micro-batches run in pieces (--batch-tokens or --max-memory).
    pub piece_tokens: Option<usize>,
    pub max_memory_gb: Option<f64>,
    /// What --max-memory turned on, in words (empty when it changed nothing).
    pub chose: String,
}

impl Plan {
    /// Activations of the largest micro-batch, or of one piece.
    pub fn activation_bytes(&self) -> f64 {
        self.per_token_bytes * self.largest_micro_batch_tokens.min(self.piece_tokens.unwrap_or(usize::MAX)) as f64
    }

    pub fn total_bytes(&self) -> f64 {
        (self.frozen_bytes + self.trainable_bytes + self.gradient_bytes + self.optimizer_bytes + self.other_bytes + self.gathered_bytes) as f64
            + self.activation_bytes()
    }

    /// Everything but the activations: what the room under --max-memory is left after.
    fn fixed_bytes(&self) -> f64 {
        self.total_bytes() - self.activation_bytes()
    }

    /// One line per figure, for the log.
    pub fn describe(&self) -> String {
        let g = |b: f64| format!("{:.2} GB", b / GB);
        let mut s = format!(
            "train: memory plan per rank: frozen base {}, trained weights {} ({} parameters), gradients {}, AdamW moments {}, \
             other {}{}; activations {:.1} kB per token (measured on a {}-token pair{}), {} for {} tokens; total {}",
            g(self.frozen_bytes as f64),
            g(self.trainable_bytes as f64),
            self.trainable_params,
            g(self.gradient_bytes as f64),
            g(self.optimizer_bytes as f64),
            g(self.other_bytes as f64),
            if self.gathered_bytes > 0 { format!(", gathered while a step runs {}", g(self.gathered_bytes as f64)) } else { String::new() },
            self.per_token_bytes / 1e3,
            self.probe_tokens,
            if self.gradient_checkpointing { ", gradient checkpointing" } else { "" },
            g(self.activation_bytes()),
            self.largest_micro_batch_tokens.min(self.piece_tokens.unwrap_or(usize::MAX)),
            g(self.total_bytes()),
        );
        if !self.chose.is_empty() {
            s += &format!("\ntrain: --max-memory {} GB: {}", self.max_memory_gb.unwrap_or(0.0), self.chose);
        }
        s
    }

    /// The manifest's `memory_plan` (GB, as `peak_memory_gb`).
    pub fn to_json(&self) -> serde_json::Value {
        let g = |b: f64| b / GB;
        serde_json::json!({
            "frozen_gb": g(self.frozen_bytes as f64),
            "trainable_params": self.trainable_params,
            "trainable_gb": g(self.trainable_bytes as f64),
            "gradients_gb": g(self.gradient_bytes as f64),
            "optimizer_gb": g(self.optimizer_bytes as f64),
            "other_gb": g(self.other_bytes as f64),
            "gathered_gb": g(self.gathered_bytes as f64),
            "activation_bytes_per_token": self.per_token_bytes,
            "probe_tokens": self.probe_tokens,
            "largest_micro_batch_tokens": self.largest_micro_batch_tokens,
            "activations_gb": g(self.activation_bytes()),
            "total_gb": g(self.total_bytes()),
            "gradient_checkpointing": self.gradient_checkpointing,
            "micro_batch_tokens": self.piece_tokens,
            "max_memory_gb": self.max_memory_gb,
            "chose": self.chose,
        })
    }

    /// Fits the plan under `gb`: as it is if the largest micro-batch fits; else with gradient
    /// checkpointing (`per_token(true)` measures its cost) if that fits; else checkpointing and
    /// pieces of as many tokens as the room holds. `accumulating` is the gradient set the
    /// pieces add (see `gradient_bytes`). Fails when not even the longest pair fits.
    pub fn fit(&mut self, gb: f64, longest_pair: usize, accumulating: u64, mut per_token: impl FnMut(bool) -> Result<f64>) -> Result<()> {
        self.max_memory_gb = Some(gb);
        let room = |p: &Plan| (1.0 - SPARE) * (gb * GB - p.fixed_bytes());
        let needs = |p: &Plan| p.per_token_bytes * p.largest_micro_batch_tokens as f64;
        if needs(self) <= room(self) {
            return Ok(());
        }
        let mut chose = Vec::new();
        if !self.gradient_checkpointing {
            let before = self.total_bytes();
            self.per_token_bytes = per_token(true)?;
            self.gradient_checkpointing = true;
            chose.push(format!(
                "the largest micro-batch ({} tokens) would need {:.2} GB, so --gradient-checkpointing is on ({:.1} kB per token)",
                self.largest_micro_batch_tokens,
                before / GB,
                self.per_token_bytes / 1e3
            ));
        }
        if needs(self) > room(self) {
            if self.piece_tokens.is_none() {
                self.gradient_bytes += accumulating;
            }
            let tokens = (room(self) / self.per_token_bytes).floor();
            if tokens < longest_pair as f64 {
                bail!(
                    "--max-memory {gb} GB: the longest pair ({longest_pair} tokens) needs {:.2} GB of activations even with gradient checkpointing, \
                     and the weights, gradients and optimizer take {:.2} GB: raise --max-memory, train a LoRA adapter (--lora-r), \
                     or shard the optimizer over ranks",
                    self.per_token_bytes * longest_pair as f64 / GB,
                    self.fixed_bytes() / GB
                );
            }
            self.piece_tokens = Some(tokens as usize);
            chose.push(format!("micro-batches run in pieces of at most {} tokens", tokens as usize));
        }
        self.chose = chose.join("; ") + &format!(" (planned total {:.2} GB)", self.total_bytes() / GB);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        // 1 GB fixed; 100 kB per token plain, 20 kB checkpointed; micro-batches of 10,000 tokens.
        Plan {
            trainable_bytes: 400_000_000,
            optimizer_bytes: 400_000_000,
            gradient_bytes: 200_000_000,
            per_token_bytes: 1e5,
            largest_micro_batch_tokens: 10_000,
            ..Default::default()
        }
    }

    #[test]
    fn fit_turns_on_checkpointing_then_pieces_then_refuses() {
        let ckpt = |on: bool| -> Result<f64> { Ok(if on { 2e4 } else { 1e5 }) };
        // 1 GB + 1 GB of activations: fits at 2.3 GB (0.9 × 1.3 GB of room ≥ 1 GB).
        let mut p = plan();
        p.fit(2.3, 500, 200_000_000, ckpt).unwrap();
        assert!(!p.gradient_checkpointing && p.piece_tokens.is_none() && p.chose.is_empty());
        // At 1.5 GB: plain needs 1 GB > 0.45 GB of room; checkpointed 0.2 GB fits.
        let mut p = plan();
        p.fit(1.5, 500, 200_000_000, ckpt).unwrap();
        assert!(p.gradient_checkpointing && p.piece_tokens.is_none(), "{p:?}");
        assert_eq!(p.per_token_bytes, 2e4);
        assert!(p.chose.contains("--gradient-checkpointing"), "{}", p.chose);
        // At 1.2 GB the checkpointed 0.2 GB does not fit in 0.18 GB of room; pieces add a
        // 50 MB accumulation buffer: 0.9 × (1.2 − 1.05) GB holds 6,750 checkpointed tokens.
        let mut p = plan();
        p.fit(1.2, 500, 50_000_000, ckpt).unwrap();
        assert!(p.gradient_checkpointing && matches!(p.piece_tokens, Some(6_749..=6_750)), "{p:?}");
        assert_eq!(p.gradient_bytes, 250_000_000);
        assert!(p.total_bytes() <= 1.2e9, "{}", p.total_bytes());
        assert!(p.chose.contains("pieces of at most"), "{}", p.chose);
        // At 1.06 GB 450 tokens fit: a 500-token pair is refused.
        let mut p = plan();
        let e = p.fit(1.06, 500, 50_000_000, ckpt).unwrap_err().to_string();
        assert!(e.contains("--max-memory 1.06 GB") && e.contains("500 tokens"), "{e}");
        // Checkpointing already on: it is not measured again.
        let mut p = Plan { gradient_checkpointing: true, per_token_bytes: 2e4, ..plan() };
        p.fit(1.5, 500, 200_000_000, |_| panic!("measured again")).unwrap();
        assert!(p.chose.is_empty());
    }
}
