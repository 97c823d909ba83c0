//! DPO training pieces: losses, one micro-batch's loss and gradients, AdamW + schedules +
//! clipping, the trainable policy, its memory plan, metrics, plots and TensorBoard event files.
pub mod dist;
pub mod loss;
pub mod metrics;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod policy;
pub mod shard;
pub mod step;
pub mod tensorboard;
