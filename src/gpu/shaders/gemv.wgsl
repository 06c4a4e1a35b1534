// Decode-time y = x · wᵀ + b for a single row x (1 × k): one invocation per output column,
// each a straight dot product over w's row, so no workgroup memory, no barriers and no
// idle invocations (the tiled matmul would leave 15 of 16 rows of its tile empty).
// A cooperative variant (a workgroup per column, neighbouring invocations reading
// neighbouring weights, a tree reduction in workgroup memory) was measured 10× slower on
// the CPU-emulated adapters we test on (lavapipe, SwiftShader: barriers are costly there);
// on discrete GPUs it may win, which needs measuring on one.
// Parameters: MatmulParams (params.rs); bindings b and y: matmul_bindings.wgsl.

@group(0) @binding(1) var<storage, read> x: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let col = id.y * nw.x * 256u + id.x;
    if (col >= p.n) {
        return;
    }
    var acc = 0.0;
    for (var i = 0u; i < p.k; i++) {
        acc += x[i] * w_at(col, i);
    }
    if (p.has_bias == 1u) {
        acc += b[col];
    }
    y[p.col_offset + col] = acc;
}
