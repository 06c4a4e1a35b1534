// Decode-time y = x · wᵀ + b for a single row x (1 × k): one invocation per output column,
// each a straight dot product over w's row, so no workgroup memory, no barriers and no
// idle invocations (the tiled matmul would leave 15 of 16 rows of its tile empty).
// Same parameters and bindings as matmul.wgsl.

struct Params {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    ldy: u32,
    col_offset: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let col = id.y * nw.x * 256u + id.x;
    if (col >= p.n) {
        return;
    }
    let base = col * p.k;
    var acc = 0.0;
    for (var i = 0u; i < p.k; i++) {
        acc += x[i] * w[base + i];
    }
    if (p.has_bias == 1u) {
        acc += b[col];
    }
    y[p.col_offset + col] = acc;
}
