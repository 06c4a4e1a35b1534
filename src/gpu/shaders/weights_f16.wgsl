// Weights as f16 pairs packed in u32 (low half first), unpacked in f32 arithmetic so no
// `shader-f16` feature is needed: half the memory and bandwidth of f32.
@group(0) @binding(2) var<storage, read> w: array<u32>;

fn w_at(row: u32, col: u32) -> f32 {
    let i = row * w_cols() + col;
    let pair = unpack2x16float(w[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}

// Two whole u32 words.
fn w4_at(row: u32, col: u32) -> vec4<f32> {
    let at = (row * w_cols() + col) >> 1u;
    return vec4<f32>(unpack2x16float(w[at]), unpack2x16float(w[at + 1u]));
}
