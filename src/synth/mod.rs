//! What the project generates for itself, so tests, benchmarks and the demo need no downloads:
//! random models in Hugging Face layout with a trained BPE tokenizer, and synthetic
//! preference data with a learnable signal.
pub mod judge;
pub mod model;
pub mod prefs;
