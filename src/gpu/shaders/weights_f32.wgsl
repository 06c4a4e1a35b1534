// Weights as plain f32. Every weight format defines the binding `w` and `w_at(i)`, the
// i-th value of the row-major matrix, so one matmul/gemv/embedding source serves all.
@group(0) @binding(2) var<storage, read> w: array<f32>;

fn w_at(i: u32) -> f32 {
    return w[i];
}

// Four consecutive values from i (a multiple of 4 for every caller); matmul.wgsl's tile loads.
fn w4_at(i: u32) -> vec4<f32> {
    return vec4<f32>(w[i], w[i + 1u], w[i + 2u], w[i + 3u]);
}
