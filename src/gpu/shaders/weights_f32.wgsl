// Weights as plain f32. Every weight format defines the binding `w` and `w_at(i)`, the
// i-th value of the row-major matrix, so one matmul/gemv/embedding source serves all.
@group(0) @binding(2) var<storage, read> w: array<f32>;

fn w_at(i: u32) -> f32 {
    return w[i];
}
