// gelu_new (tanh approximation), in place:
// x ← 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³))).
// The tanh argument is clamped: WGSL's tanh may compute exp(2a) and overflow to NaN for
// large |a|, and tanh(±10) is already ±1 in f32.
// Params: LenParams (params.rs).

@group(0) @binding(1) var<storage, read_write> x: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = id.y * nw.x * 256u + id.x;
    if (i >= p.len) {
        return;
    }
    let v = x[i];
    let a = clamp(0.7978845608028654 * (v + 0.044715 * v * v * v), -10.0, 10.0);
    x[i] = 0.5 * v * (1.0 + tanh(a));
}
