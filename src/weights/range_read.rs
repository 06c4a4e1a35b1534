//! A weight file read piece by piece instead of whole: what the browser offers for a
//! download it keeps on disk (Cache Storage) or a file the user picked (`Blob.slice`). The
//! page implements it in JavaScript; tests implement it over a local file.

use crate::error::Result;
use crate::model::BoxFuture;

pub trait RangeRead {
    /// The file's size in bytes.
    fn size(&self) -> u64;
    /// Bytes `range` of the file (exactly that many, or an error).
    fn read(&self, range: std::ops::Range<u64>) -> BoxFuture<'_, Result<Vec<u8>>>;
}
