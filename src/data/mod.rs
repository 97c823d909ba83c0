//! Preference data: reading user parquet, chat templates, TRL-style tokenization, the prepared
//! dataset (owned by the prepare stage), batching, and the synthetic demo data.
pub mod batch;
pub mod chat;
pub mod input;
pub mod prepared;
pub mod synth;
pub mod tokenize;
