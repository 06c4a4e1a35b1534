// y = x · wᵀ + b, with x (m × k), w (n × k) in Hugging Face's (out, in) layout, b (n).
// y has row stride `ldy` and the n columns start at `col_offset`, so a weight split by rows
// (an lm_head larger than one binding) writes its slice of the full logits row.
// 16 × 16 output tiles; x and w tiles of 16 along k are staged in workgroup memory.
// Used for prefill (m > 1); a single row goes to gemv.wgsl. Parameters: matmul_params.wgsl.

const T: u32 = 16u;
var<workgroup> xs: array<array<f32, 16>, 16>;
var<workgroup> ws: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) l: vec3<u32>) {
    let row = wg.y * T + l.y;
    let col = wg.x * T + l.x;
    // The w row this thread stages: output column wg.x * T + l.y.
    let w_row = wg.x * T + l.y;
    var acc = 0.0;
    let tiles = (p.k + T - 1u) / T;
    for (var t = 0u; t < tiles; t++) {
        let kk = t * T + l.x;
        var xv = 0.0;
        if (row < p.m && kk < p.k) {
            xv = x[row * p.k + kk];
        }
        xs[l.y][l.x] = xv;
        var wv = 0.0;
        if (w_row < p.n && kk < p.k) {
            wv = w_at(w_row * p.k + kk);
        }
        ws[l.y][l.x] = wv;
        workgroupBarrier();
        for (var i = 0u; i < T; i++) {
            acc += xs[l.y][i] * ws[l.x][i];
        }
        workgroupBarrier();
    }
    if (row < p.m && col < p.n) {
        if (p.has_bias == 1u) {
            acc += b[col];
        }
        y[row * p.ldy + p.col_offset + col] = acc;
    }
}
