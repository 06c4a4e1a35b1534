//! What our CPU kernels share: the activation rows they are handed, the threads they split
//! their work across (candle's pool natively, rayon's in the browser), and the output buffer
//! those threads write in disjoint parts.

use crate::error::{Error, Result};

/// How many rows of `cols` values `x` holds: an error unless it holds whole rows of a
/// matrix with columns (`matrix` names its kind for the message).
#[cfg_attr(not(quant_kernels), allow(dead_code))]
pub(super) fn rows_of(x: &[f32], cols: usize, matrix: &str) -> Result<usize> {
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(Error::input(format!(
            "{} values are not rows of {matrix}'s {cols} columns",
            x.len()
        )));
    }
    Ok(x.len() / cols)
}

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

/// Calls `unit(i)` for every `i` in `0..units` on the threads the kernels share: candle's
/// barrier pool natively (its workers spin between candle's ops, so a decode step's short
/// kernels do not wait for sleeping threads), the forward pass's spinning threads in the
/// browser ([`super::spin_pool`]).
pub(super) fn for_each_unit(units: usize, unit: impl Fn(usize) + Sync) {
    #[cfg(not(target_arch = "wasm32"))]
    candle_core::utils::barrier_pool().execute_chunked(units, |range| range.for_each(&unit));
    #[cfg(target_arch = "wasm32")]
    super::spin_pool::split(units, unit);
}
