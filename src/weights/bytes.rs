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

impl Bytes {
    /// Says that `range` will not be read again: a mapped file's pages there leave the
    /// process's resident set (read again from the file if they ever are). Loading reads each
    /// tensor once, so a checkpoint converted on load does not stay resident beside the model
    /// built from it. Owned bytes cannot give back part of themselves and stay as they are.
    pub fn release(&self, range: std::ops::Range<usize>) {
        #[cfg(all(unix, not(target_arch = "wasm32"), feature = "cli"))]
        if let Bytes::Mapped(m) = self {
            if range.end <= m.len() && range.start < range.end {
                // SAFETY: the map is private and read-only, so dropping its pages loses
                // nothing: the next read faults the same bytes back in from the file. Errors
                // are ignored because the advice only saves memory.
                let _ = unsafe {
                    m.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        range.start,
                        range.len(),
                    )
                };
            }
        }
        #[cfg(not(all(unix, not(target_arch = "wasm32"), feature = "cli")))]
        let _ = range;
    }
}

impl AsRef<[u8]> for Bytes {
    fn as_ref(&self) -> &[u8] {
        self
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
