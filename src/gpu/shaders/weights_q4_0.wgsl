// GGML q4_0 (value = d · (nibble − 8), 32 values per scale), in weights_ggml.wgsl's layout: a
// block's quants are 16 bytes whose low nibbles are values 0..15 and high nibbles 16..31.
const VALUES_PER_WORD: u32 = 8u;

fn w4_at(row: u32, col: u32) -> vec4<f32> {
    let base = row * row_words();
    let j = col % 32u;
    let word = w[base + (col / 32u) * 4u + (j % 16u) / 4u];
    let shift = select(0u, 4u, j >= 16u);
    let nibbles = vec4<u32>(word >> shift, word >> (8u + shift), word >> (16u + shift), word >> (24u + shift)) & vec4<u32>(0xfu);
    return scale_at(base, col / 32u) * (vec4<f32>(nibbles) - 8.0);
}

fn w_at(row: u32, col: u32) -> f32 {
    return w4_at(row, col & ~3u)[col & 3u];
}
