//! f16 weight matrices multiplied by f32 activations on x86-64 CPUs with AVX2, F16C and FMA.
//!
//! Why: a checkpoint stored as f16 (Phi-2 as published) was upcast to f32 at load, so it
//! held twice its file in memory (a Phi-2: 11 GB of weights, 17 GB at the peak, issue #19)
//! and every decoded token read twice the bytes. Here a matrix stays f16 where it is stored
//! (a mapped safetensors shard is used in place, so loading copies nothing), and is widened
//! eight values at a time in registers; activations and sums stay f32, so products equal the
//! f32 path's but for the order of the sums.
//!
//! How: rows of weights are dotted with rows of activations in tiles of two weight rows by
//! four activation rows (eight accumulators: six loads per eight multiply-adds), or four
//! weight rows by one activation row when decoding, on candle's thread pool as the q8_0
//! kernel is.

use candle_core::utils::barrier_pool;
use half::f16;

use super::disjoint::{rows_of, Disjoint};
use super::stored::StoredBytes;
use crate::error::{Error, Result};

/// Weight rows per unit of work handed to a thread.
const UNIT_ROWS: usize = 16;
/// Values per register.
const LANES: usize = 8;

/// A `rows × cols` matrix of f16 values, row-major and little-endian as stored.
pub struct F16Matrix {
    rows: usize,
    cols: usize,
    values: StoredBytes,
}

impl F16Matrix {
    /// Whether this CPU has what the kernel needs: AVX2, F16C and FMA.
    pub fn runs_here() -> bool {
        is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("fma")
    }

    /// `rows × cols` values, row-major; an error where the kernel does not run here.
    pub fn new(values: StoredBytes, rows: usize, cols: usize) -> Result<Self> {
        if rows.checked_mul(cols).and_then(|n| n.checked_mul(2)) != Some(values.len()) {
            return Err(Error::input(format!(
                "{} bytes of f16 values are not a {rows}×{cols} matrix",
                values.len()
            )));
        }
        if !Self::runs_here() {
            return Err(Error::input(
                "f16 matrices need a CPU with AVX2, F16C and FMA",
            ));
        }
        Ok(Self { rows, cols, values })
    }

    /// Bytes held (and read by each product).
    pub fn bytes(&self) -> usize {
        self.values.len()
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x · Wᵀ` for `x` holding whole rows of `cols` values: one row of `rows` values out
    /// per row in.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let m = rows_of(x, self.cols, "an f16 matrix")?;
        let (rows, cols) = (self.rows, self.cols);
        let mut out = vec![0f32; m * rows];
        let shared = Disjoint::new(&mut out);
        // As in the q8_0 kernel: a unit's weight rows are read from memory once, then from
        // cache for each group of four activation rows.
        let groups = m.div_ceil(4);
        barrier_pool().execute_chunked(rows.div_ceil(UNIT_ROWS) * groups, |units| {
            for unit in units {
                let (first, j) = (unit / groups * UNIT_ROWS, unit % groups * 4);
                let unit_rows = first..(first + UNIT_ROWS).min(rows);
                let x_row = |i: usize| &x[i * cols..][..cols];
                let write = |i: usize, r: usize, value: f32| {
                    // SAFETY: row `r` of activation row `i` lies inside `out`, and only this
                    // unit writes it; `out` outlives the pool's call.
                    unsafe { *shared.at(i * rows + r) = value };
                };
                if m - j >= 4 {
                    let xs = std::array::from_fn(|i| x_row(j + i));
                    self.rows_times::<2, 4>(unit_rows, xs, |i, r, v| write(j + i, r, v));
                } else {
                    // Alone, an activation row meets four weight rows at a time: four chains
                    // of multiply-adds, none waiting on another's latency.
                    for i in j..m {
                        self.rows_times::<4, 1>(unit_rows.clone(), [x_row(i)], |_, r, v| {
                            write(i, r, v)
                        });
                    }
                }
            }
        });
        Ok(out)
    }
}

impl F16Matrix {
    /// Weight rows `rows`, `R` at a time, dotted with `N` activation rows: `out(n, row, dot)`.
    fn rows_times<const R: usize, const N: usize>(
        &self,
        rows: std::ops::Range<usize>,
        xs: [&[f32]; N],
        mut out: impl FnMut(usize, usize, f32),
    ) {
        let (values, row_bytes) = (self.values.as_slice(), 2 * self.cols);
        for r in rows.clone().step_by(R) {
            // The last step repeats the last row where fewer than R are left, unwritten.
            let ws = std::array::from_fn(|k| {
                &values[(r + k).min(rows.end - 1) * row_bytes..][..row_bytes]
            });
            for (n, dots) in dots::<R, N>(ws, xs).iter().enumerate() {
                for (k, dot) in dots.iter().enumerate().take(rows.end - r) {
                    out(n, r + k, *dot);
                }
            }
        }
    }
}

/// `R` weight rows (stored f16 values, 2 bytes each, at any alignment) dotted with `N`
/// activation rows of as many values.
fn dots<const R: usize, const N: usize>(ws: [&[u8]; R], xs: [&[f32]; N]) -> [[f32; R]; N] {
    let cols = xs[0].len();
    assert!(ws.iter().all(|w| w.len() == 2 * cols) && xs.iter().all(|x| x.len() == cols));
    // SAFETY: an F16Matrix exists only where `new` found AVX2, F16C and FMA, and the
    // assertion above keeps every load inside the slices.
    unsafe { dots_avx2(ws, xs) }
}

#[target_feature(enable = "avx2,f16c,fma")]
unsafe fn dots_avx2<const R: usize, const N: usize>(
    ws: [&[u8]; R],
    xs: [&[f32]; N],
) -> [[f32; R]; N] {
    use std::arch::x86_64::*;
    let cols = xs[0].len();
    let whole = cols / LANES * LANES;
    let mut acc = [[_mm256_setzero_ps(); R]; N];
    for c in (0..whole).step_by(LANES) {
        let w = ws.map(|w| _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(2 * c).cast())));
        for (acc, x) in acc.iter_mut().zip(xs) {
            let x = _mm256_loadu_ps(x.as_ptr().add(c));
            for (acc, w) in acc.iter_mut().zip(w) {
                *acc = _mm256_fmadd_ps(w, x, *acc);
            }
        }
    }
    let mut out = [[0f32; R]; N];
    for (i, (acc, x)) in acc.iter().zip(xs).enumerate() {
        for (k, (acc, w)) in acc.iter().zip(ws).enumerate() {
            let mut lanes = [0f32; LANES];
            _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
            let weight = |c: usize| f16::from_le_bytes([w[2 * c], w[2 * c + 1]]).to_f32();
            let tail: f32 = (whole..cols).map(|c| weight(c) * x[c]).sum();
            out[i][k] = lanes.iter().sum::<f32>() + tail;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    fn stored(values: &[f16]) -> StoredBytes {
        StoredBytes::owned(values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// An odd number of rows (the last pair short), columns that leave a tail past the last
    /// register, one to nine activation rows (whole and partial groups of four): against the
    /// plain product of the same f16 weights, summed in f64; from bytes of their own and in
    /// place at an odd offset of a larger buffer (a mapped file promises no alignment).
    #[test]
    fn products_match_the_plain_product_where_the_cpu_has_f16c() {
        let (rows, cols) = (37, 203);
        let weights: Vec<f16> = values(rows * cols, 1)
            .into_iter()
            .map(f16::from_f32)
            .collect();
        if !F16Matrix::runs_here() {
            assert!(F16Matrix::new(stored(&weights), rows, cols).is_err());
            return;
        }
        let mut file = vec![5u8; 7];
        file.extend(stored(&weights).as_slice());
        file.push(9);
        let range = 7..file.len() - 1;
        let in_place = StoredBytes::shared(std::sync::Arc::new(file), range).unwrap();
        for bytes in [stored(&weights), in_place] {
            let m = F16Matrix::new(bytes, rows, cols).unwrap();
            for n in [1, 4, 5, 9] {
                let x = values(n * cols, 2);
                let got = m.matmul(&x).unwrap();
                for j in 0..n {
                    for r in 0..rows {
                        let want: f64 = (0..cols)
                            .map(|c| weights[r * cols + c].to_f64() * x[j * cols + c] as f64)
                            .sum();
                        let g = got[j * rows + r] as f64;
                        assert!(
                            (g - want).abs() <= 1e-4 * want.abs().max(1.0),
                            "{g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(F16Matrix::new(stored(&[f16::ZERO; 5]), 2, 3).is_err());
        assert!(F16Matrix::new(StoredBytes::owned(vec![0; 11]), 2, 3).is_err());
        assert!(F16Matrix::new(stored(&[]), usize::MAX, 2).is_err());
        if !F16Matrix::runs_here() {
            return;
        }
        let m = F16Matrix::new(stored(&[f16::ZERO; 6]), 2, 3).unwrap();
        assert!(m.matmul(&[0.0; 4]).is_err());
        assert!(m.matmul(&[]).unwrap().is_empty());
    }
}
