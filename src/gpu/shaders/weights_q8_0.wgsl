// GGML q8_0 (value = d · q, q an int8, 32 values per scale), in weights_ggml.wgsl's layout.
const VALUES_PER_WORD: u32 = 4u;

// The four int8 of a word, sign-extended.
fn int8s(word: u32) -> vec4<f32> {
    return vec4<f32>(
        f32(bitcast<i32>(word << 24u) >> 24u),
        f32(bitcast<i32>(word << 16u) >> 24u),
        f32(bitcast<i32>(word << 8u) >> 24u),
        f32(bitcast<i32>(word) >> 24u),
    );
}

fn w4_at(row: u32, col: u32) -> vec4<f32> {
    let base = row * row_words();
    return scale_at(base, col / 32u) * int8s(w[base + col / 4u]);
}

fn w_at(row: u32, col: u32) -> f32 {
    return w4_at(row, col & ~3u)[col & 3u];
}
