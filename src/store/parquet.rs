//! Parquet files for people to read with polars: zstd, small row groups, written under a
//! partial name and renamed when whole.
use super::space::write_error;
use super::PartialFile;
use anyhow::Result;
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use std::path::Path;

pub fn parquet_props() -> WriterProperties {
    // Small row groups keep the writer's buffered memory flat however many rows there are.
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3).expect("valid zstd level")))
        .set_max_row_group_row_count(Some(16 * 1024))
        .build()
}

/// A parquet file written under a partial name and renamed on `finish`.
pub struct ParquetOut {
    writer: ArrowWriter<std::fs::File>,
    file: PartialFile,
}

impl ParquetOut {
    pub fn create(path: &Path, schema: SchemaRef) -> Result<Self> {
        let file = PartialFile::create(path)?;
        let writer = ArrowWriter::try_new(file.try_clone_file()?, schema, Some(parquet_props()))?;
        Ok(Self { writer, file })
    }

    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        self.writer.write(batch).map_err(|e| write_error(self.file.partial(), e))
    }

    pub fn finish(self) -> Result<()> {
        self.writer.close().map_err(|e| write_error(self.file.partial(), e))?;
        self.file.commit()
    }
}
