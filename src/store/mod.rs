//! On-disk building blocks shared by every stage: atomic files, manifests and fingerprints,
//! memory-mapped columns, parquet output, directory locks. Each stage owns its directory;
//! these only know how to write safely.
pub mod atomic;
pub mod column;
pub mod lock;
pub mod manifest;
pub mod parquet;
pub mod space;

pub use atomic::{write_atomic, PartialFile};
pub use column::{Column, ColumnFill, ColumnWriter, Dtype, Pod};
pub use lock::DirLock;
pub use manifest::{file_hash, short, Fingerprint, InputRef, Manifest};
pub use parquet::{parquet_props, ParquetOut};
