// Decode-time y = x · wᵀ + b for a single row x (1 × k). One workgroup per output column:
// invocation l sums x[i] · w[col, i] for i = l, l + 64, …, so neighbouring invocations read
// neighbouring weights (whole blocks at a time for the GGML formats), then the 64 partial
// sums are added in workgroup memory. Parameters and bindings: matmul_params.wgsl.

const WG: u32 = 64u;
var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
) {
    // The same for the whole workgroup, so the barriers below stay in uniform control flow.
    let col = wg.y * nw.x + wg.x;
    var acc = 0.0;
    if (col < p.n) {
        let base = col * p.k;
        for (var i = lid.x; i < p.k; i += WG) {
            acc += x[i] * w_at(base + i);
        }
    }
    partial[lid.x] = acc;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid.x < s) {
            partial[lid.x] += partial[lid.x + s];
        }
        workgroupBarrier();
    }
    if (lid.x == 0u && col < p.n) {
        var sum = partial[0];
        if (p.has_bias == 1u) {
            sum += b[col];
        }
        y[p.col_offset + col] = sum;
    }
}
