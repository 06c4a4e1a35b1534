// Phi's parallel block output: x ← x + attn + mlp.
// Params: LenParams (params.rs).

@group(0) @binding(1) var<storage, read_write> x: array<f32>;
@group(0) @binding(2) var<storage, read> attn: array<f32>;
@group(0) @binding(3) var<storage, read> mlp: array<f32>;

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = id.y * nw.x * 256u + id.x;
    if (i < p.len) {
        x[i] = x[i] + attn[i] + mlp[i];
    }
}
