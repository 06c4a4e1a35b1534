//! A weight file read piece by piece instead of whole: what the browser offers for a
//! download it keeps on disk (Cache Storage) or a file the user picked (`Blob.slice`). The
//! page implements it in JavaScript; tests implement it over a local file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::rc::Rc;

use crate::error::{Error, Result};
use crate::model::BoxFuture;

pub trait RangeRead {
    /// The file's size in bytes.
    fn size(&self) -> u64;
    /// Bytes `range` of the file (exactly that many, or an error).
    fn read(&self, range: Range<u64>) -> BoxFuture<'_, Result<Vec<u8>>>;
}

/// Bytes `range` of `file` (called `name`), for `what`; a reader that hands back another
/// number of bytes than asked for is an error, not a short tensor.
pub async fn read_exact(
    file: &dyn RangeRead,
    name: &str,
    range: Range<u64>,
    what: &str,
) -> Result<Vec<u8>> {
    let expected = range.end - range.start;
    let bytes = file
        .read(range)
        .await
        .map_err(|e| Error::file(name, format!("reading {what}: {e}")))?;
    if bytes.len() as u64 != expected {
        return Err(Error::file(
            name,
            format!(
                "reading {what}: {} bytes came back for {expected}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// A file read by ranges and the extents `fetch` has read from it, held until the tensor
/// built from them no longer needs them: the asynchronous read happens in `fetch`, the
/// synchronous `TensorSource::tensor` then finds the bytes here.
pub struct Staged {
    pub name: String,
    file: Rc<dyn RangeRead>,
    extents: RefCell<HashMap<Range<u64>, Vec<u8>>>,
}

impl Staged {
    pub fn new(name: String, file: Rc<dyn RangeRead>) -> Self {
        Self {
            name,
            file,
            extents: RefCell::default(),
        }
    }

    /// Reads `extent` (tensor `tensor`'s bytes) unless it is already held.
    pub async fn fetch(&self, extent: Range<u64>, tensor: &str) -> Result<()> {
        if self.extents.borrow().contains_key(&extent) {
            return Ok(());
        }
        let what = format!("tensor {tensor}");
        let bytes = read_exact(&*self.file, &self.name, extent.clone(), &what).await?;
        self.extents.borrow_mut().insert(extent, bytes);
        Ok(())
    }

    /// `use_bytes` on bytes `part` of the fetched `extent`; with `last` the extent is let go.
    pub fn with<T>(
        &self,
        extent: &Range<u64>,
        part: Range<u64>,
        tensor: &str,
        last: bool,
        use_bytes: impl FnOnce(&[u8]) -> Result<T>,
    ) -> Result<T> {
        let mut extents = self.extents.borrow_mut();
        let bytes = extents.get(extent).ok_or_else(|| {
            Error::input(format!("tensor {tensor} was read before it was fetched"))
        })?;
        let offset = |at: u64| {
            at.checked_sub(extent.start)
                .and_then(|o| usize::try_from(o).ok())
        };
        let slice = offset(part.start)
            .zip(offset(part.end))
            .and_then(|(s, e)| bytes.get(s..e))
            .ok_or_else(|| {
                Error::input(format!(
                    "bytes {part:?} lie outside tensor {tensor}'s {extent:?}"
                ))
            })?;
        let out = use_bytes(slice);
        if last {
            extents.remove(extent);
        }
        out
    }
}
