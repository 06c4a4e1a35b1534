// Weights as plain f32, bound as vec4s (buffers are padded to 16 bytes). Every weight format
// defines the binding `w`, `w_at(i)`, the i-th value of the row-major matrix, and `w4_at(i)`,
// four values from a multiple of 4, so one matmul/gemv/embedding source serves all.
@group(0) @binding(2) var<storage, read> w: array<vec4<f32>>;

fn w_at(i: u32) -> f32 {
    return w[i >> 2u][i & 3u];
}

// One 16-byte load: matmul.wgsl's tile staging.
fn w4_at(i: u32) -> vec4<f32> {
    return w[i >> 2u];
}
