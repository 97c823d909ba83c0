//! Preference data and the two dataset formats the stages pass along: reading user parquet,
//! chat templates, TRL-style tokenization, the prepared dataset (written by `prepare`) and the
//! reference cache (written by `cache-ref`). Knows nothing of models.
pub mod chat;
pub mod hf_tokenizer;
pub mod input;
pub mod prepared;
pub mod ref_cache;
pub mod tokenize;
