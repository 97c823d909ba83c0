//! dpo-pipeline: offline DPO and its relatives as batch stages (prepare, cache-ref, train, and
//! sample / label for iterative rounds), each a command writing its own directory. See README.md.
//!
//! Layers, each using only those listed before it:
//! `rng`, `memory` (seeded randomness; RSS, and the heap counted by the global allocator) · `store` (atomic files, disk space, manifests,
//! columns, locks) · `hub` (hub ids through the Hugging Face cache) · `model` (config, weights, the decoder and its ops: tensors in, tensors out)
//! · `data` (user files, tokenizers, chat templates, the prepared, ref-cache and sample/label
//! formats) · `score` (pairs -> decoder inputs -> sequence log-probs) · `generate` (sampling with
//! a key-value cache) · `train` (losses, optimizer, policy, its memory plan, metrics) · `settings` (every flag
//! and TOML key) · `stages` (one per command) · `iterative` (rounds of stages) · `synth`
//! (generated models, data, judge) · `demo` · `main.rs`.
pub mod data;
pub mod demo;
pub mod generate;
pub mod hub;
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
