// Weights as plain f32 rows, bound as vec4s (buffers are padded to 16 bytes). Every weight
// format defines the binding `w`, `w_at(row, col)`, the value at (row, col) of the row-major
// (out × in) matrix, and `w4_at(row, col)`, the four values from a column that is a multiple of
// 4 (rows a multiple of 4 long), so one matmul/gemv/embedding source serves all. The kernel
// that includes it defines `w_cols()`, the length of a row.
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;

fn w_at(row: u32, col: u32) -> f32 {
    let i = row * w_cols() + col;
    return w[i >> 2u][i & 3u];
}

// One 16-byte load.
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    return w[(row * w_cols() + col) >> 2u];
}
