// y = x · wᵀ + b, with x (m × k), w (n × k) in Hugging Face's (out, in) layout, b (n).
// y has row stride `ldy` and the n columns start at `col_offset`, so a weight split by rows
// (an lm_head larger than one binding) writes its slice of the full logits row.
// Used for prefill (m > 1); a single row goes to gemv.wgsl. Parameters: MatmulParams (params.rs); bindings b and y: matmul_bindings.wgsl.
//
// A workgroup of 16 × 4 threads computes a 16-row × 64-column tile of y; each thread keeps a
// 4 × 4 block of it in registers. Per step of 16 along k, the x tile (16 × 16) and the w tile
// (64 × 16) are staged in workgroup memory as vec4s of four consecutive k (whole vec4 loads of
// x, and of w where the format allows, `w4_at`), and every vec4 a thread reads back feeds four dot
// products: a quarter of the workgroup-memory traffic per multiply of one output per thread.
// Tiles are 16 rows tall because prompts are often short: taller tiles would mostly multiply
// padding.

const ROWS: u32 = 16u;
const COLS: u32 = 64u;
const TK: u32 = 16u;
// [row or column][k / 4]: 4 vec4s per row or column.
var<workgroup> xs: array<vec4<f32>, 64>;
var<workgroup> ws: array<vec4<f32>, 256>;

// x as vec4s: whole 16-byte loads when rows are whole vec4s (k a multiple of 4, as in every
// real model); buffers are padded to 16 bytes so the last partial vec4 is addressable.
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

// x[row, kk..kk+4], zero outside the matrix.
fn x4(row: u32, kk: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (row >= p.m) {
        return v;
    }
    let at = row * p.k + kk;
    if (p.k % 4u == 0u && kk + 4u <= p.k) {
        return x[at >> 2u];
    }
    for (var j = 0u; j < 4u; j++) {
        if (kk + j < p.k) {
            v[j] = x[(at + j) >> 2u][(at + j) & 3u];
        }
    }
    return v;
}

// w[col, kk..kk+4], zero outside the matrix.
fn w4(col: u32, kk: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (col >= p.n) {
        return v;
    }
    if (p.k % 4u == 0u && kk + 4u <= p.k) {
        return w4_at(col, kk);
    }
    for (var j = 0u; j < 4u; j++) {
        if (kk + j < p.k) {
            v[j] = w_at(col, kk + j);
        }
    }
    return v;
}

@compute @workgroup_size(16, 4)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) l: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * ROWS;
    let col0 = wg.x * COLS;
    var acc: array<vec4<f32>, 4>;
    let tiles = (p.k + TK - 1u) / TK;
    for (var t = 0u; t < tiles; t++) {
        let k0 = t * TK;
        xs[li] = x4(row0 + li / 4u, k0 + (li % 4u) * 4u);
        for (var s = 0u; s < 4u; s++) {
            let e = li + 64u * s;
            ws[e] = w4(col0 + e / 4u, k0 + (e % 4u) * 4u);
        }
        workgroupBarrier();
        for (var q = 0u; q < 4u; q++) {
            let b0 = ws[(l.x * 4u) * 4u + q];
            let b1 = ws[(l.x * 4u + 1u) * 4u + q];
            let b2 = ws[(l.x * 4u + 2u) * 4u + q];
            let b3 = ws[(l.x * 4u + 3u) * 4u + q];
            for (var i = 0u; i < 4u; i++) {
                let a = xs[(l.y * 4u + i) * 4u + q];
                acc[i] += vec4<f32>(dot(a, b0), dot(a, b1), dot(a, b2), dot(a, b3));
            }
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 4u; i++) {
        let row = row0 + l.y * 4u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + l.x * 4u + j;
            if (row < p.m && col < p.n) {
                var v = acc[i][j];
                if (p.has_bias == 1u) {
                    v += b[col];
                }
                y[row * p.ldy + p.col_offset + col] = v;
            }
        }
    }
}
