//! A weight matrix's bytes as stored, where they already lie (a memory-mapped file, shared by
//! all the matrices in it and kept alive by them) or in a buffer of their own.
//!
//! Why: our CPU kernels read q8_0 and q4_0 blocks and f16 values in their stored form, so a mapped
//! checkpoint is used in place: loading copies nothing, and its pages stay the page cache's
//! (issue #19).

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};

#[derive(Clone)]
pub struct StoredBytes {
    bytes: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl StoredBytes {
    /// `range` of `bytes`; an error unless it lies inside them.
    pub fn shared(
        bytes: Arc<impl AsRef<[u8]> + Send + Sync + 'static>,
        range: Range<usize>,
    ) -> Result<Self> {
        let len = (*bytes).as_ref().len();
        if range.start > range.end || range.end > len {
            return Err(Error::input(format!(
                "bytes {range:?} of a stored matrix lie outside the {len} stored"
            )));
        }
        Ok(Self { bytes, range })
    }

    /// Bytes of their own.
    pub fn owned(bytes: Vec<u8>) -> Self {
        let range = 0..bytes.len();
        Self {
            bytes: Arc::new(bytes),
            range,
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        &(*self.bytes).as_ref()[self.range.clone()]
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_outside_the_bytes_is_an_error() {
        let bytes = Arc::new(vec![0u8; 34]);
        assert!(StoredBytes::shared(bytes.clone(), 2..35).is_err());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = 5..4;
        assert!(StoredBytes::shared(bytes.clone(), backwards).is_err());
        let inside = StoredBytes::shared(bytes, 3..34).unwrap();
        assert_eq!((inside.len(), inside.as_slice().len()), (31, 31));
    }
}
