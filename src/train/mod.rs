//! DPO training pieces: losses, AdamW + schedules + clipping, metrics.
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
