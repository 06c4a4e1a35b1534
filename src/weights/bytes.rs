//! The bytes of one weight file: memory-mapped natively, owned when they came from the
//! browser (fetch, Cache Storage or a file picker) or from a test.

use std::ops::Deref;

pub enum Bytes {
    Owned(Vec<u8>),
    #[cfg(all(not(target_arch = "wasm32"), feature = "cli"))]
    Mapped(memmap2::Mmap),
}

impl Bytes {
    /// Maps `path` read-only. Natively this avoids copying multi-gigabyte checkpoints.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn open(path: &std::path::Path) -> crate::Result<Self> {
        use crate::Error;
        let file = std::fs::File::open(path).map_err(|e| Error::file(path.display(), e))?;
        #[cfg(feature = "cli")]
        {
            // SAFETY: the map is read-only; a file truncated by another process while
            // mapped would fault, which is the documented trade-off of memory-mapping.
            let map =
                unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(path.display(), e))?;
            Ok(Bytes::Mapped(map))
        }
        #[cfg(not(feature = "cli"))]
        {
            use std::io::Read;
            let mut buf = Vec::new();
            let mut file = file;
            file.read_to_end(&mut buf)
                .map_err(|e| Error::file(path.display(), e))?;
            Ok(Bytes::Owned(buf))
        }
    }
}

impl Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Owned(v) => v,
            #[cfg(all(not(target_arch = "wasm32"), feature = "cli"))]
            Bytes::Mapped(m) => m,
        }
    }
}
