// Weights as f16 pairs packed in u32 (low half first), unpacked in f32 arithmetic so no
// `shader-f16` feature is needed: half the memory and bandwidth of f32.
@group(0) @binding(2) var<storage, read> w: array<u32>;

fn w_at(i: u32) -> f32 {
    let pair = unpack2x16float(w[i >> 1u]);
    return select(pair.x, pair.y, (i & 1u) == 1u);
}
