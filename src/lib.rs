//! dpo-pipeline: offline DPO in three stages (prepare, cache-ref, train). See README.md.
pub mod config;
pub mod data;
pub mod demo;
pub mod model;
pub mod rng;
pub mod stages;
pub mod store;
pub mod train;
