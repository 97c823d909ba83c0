//! On-disk building blocks shared by every stage, each layer using only those before it:
//! `space` (free bytes, allocation, full-disk messages) < `atomic` (partial files, renames,
//! space checks) < memory-mapped columns, parquet output, manifests and fingerprints,
//! directory locks. Each stage owns its directory; these only know how to write safely.
pub mod atomic;
pub mod column;
pub mod lock;
pub mod manifest;
pub mod parquet;
pub mod space;

pub use atomic::{ensure_free, write_atomic, PartialFile};
pub use column::{Column, ColumnFill, ColumnWriter, Dtype, Pod};
pub use lock::DirLock;
pub use manifest::{file_hash, short, Fingerprint, InputRef, Manifest};
pub use parquet::{parquet_props, ParquetOut};
