// Decode-time y = x · wᵀ + b for a single row x, for real GPUs: a workgroup of 256
// invocations takes ROWS output rows, LANES invocations per row. Each invocation sums the
// chunks lane, lane + LANES, … of its row (chunks_*.wgsl: one 16-byte load each), so
// neighbouring invocations read neighbouring words of the same row, and `row_sum`
// (reduce_*.wgsl) adds up the row's LANES partial sums. Phi-2's n = 2,560 outputs make 640
// workgroups, enough to fill a large GPU. Parameters: MatmulParams (params.rs); b and y:
// matmul_bindings.wgsl.

const ROWS: u32 = 4u;
const LANES: u32 = 64u;

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
    SUBGROUP_BUILTINS
) {
    SUBGROUP_INIT
    let lane = li % LANES;
    let row = (wg.y * nw.x + wg.x) * ROWS + li / LANES;
    var acc = 0.0;
    if (row < p.n) {
        for (var c = lane; c < p.k / CHUNK; c += LANES) {
            let raw = chunk_raw(row, c);
            var s = 0.0;
            for (var i = 0u; i < CHUNK / 4u; i++) {
                s += dot(chunk_vec4(raw, i), x[c * (CHUNK / 4u) + i]);
            }
            acc += chunk_scale(row, c) * s;
        }
    }
    let total = row_sum(acc, li);
    if (row < p.n && lane == 0u) {
        var v = total;
        if (p.has_bias == 1u) {
            v += b[row];
        }
        y[p.col_offset + row] = v;
    }
}
