//! dpo-pipeline: offline DPO in three stages (prepare, cache-ref, train). See README.md.
//!
//! Layers, each using only those listed before it:
//! `store` (atomic files, manifests, columns, locks) · `model` (the decoder: tensors in,
//! tensors out) · `data` (user parquet, tokenization, the prepared and ref-cache formats) ·
//! `score` (pairs -> decoder inputs -> sequence log-probs) · `generate` (sampling with a
//! key-value cache) · `train` (losses, optimizer,
//! policy, metrics) · `settings` · `stages` (one per command) · `synth`, `demo` · `main.rs`.
pub mod data;
pub mod demo;
pub mod generate;
pub mod iterative;
pub mod memory;
pub mod model;
pub mod rng;
pub mod score;
pub mod settings;
pub mod stages;
pub mod store;
pub mod synth;
pub mod train;
