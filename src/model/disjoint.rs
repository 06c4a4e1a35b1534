//! An output buffer written by candle's pool threads in disjoint parts.

/// The output's base pointer, handed to the pool's threads. The kernels that use it give
/// each unit of work its own elements, so no two threads write the same one.
#[derive(Clone, Copy)]
pub(super) struct Disjoint(*mut f32);

// SAFETY: writes through it go to disjoint elements (each kernel's `matmul` says how).
unsafe impl Sync for Disjoint {}

impl Disjoint {
    pub(super) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// A method, so closures capture the whole `Sync` wrapper rather than its raw field.
    pub(super) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}
