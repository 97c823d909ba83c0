//! On-disk building blocks shared by every stage: atomic files, manifests and fingerprints,
//! memory-mapped columns. Each stage owns its directory; these only know how to write safely.
pub mod atomic;
pub mod column;
pub mod manifest;

pub use atomic::{write_atomic, PartialFile};
pub use column::{Column, ColumnFill, ColumnWriter, Dtype, Pod};
pub use manifest::{file_hash, Fingerprint, Manifest};
