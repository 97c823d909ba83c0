//! Preference data and the formats the stages pass along: reading user files (parquet, JSON
//! Lines, JSON, `datasets` directories), tokenizers as transformers builds them, chat templates,
//! TRL-style tokenization, the prepared dataset (written by `prepare`), the reference cache
//! (written by `cache-ref`) and the sample / label files (`samples`). Knows nothing of models.
pub mod chat;
pub mod hf_tokenizer;
pub mod input;
pub mod prepared;
pub mod ref_cache;
pub mod samples;
pub mod tokenize;
