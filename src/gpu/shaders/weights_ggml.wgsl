// GGML q8_0/q4_0 rows as the GPU holds them (repacked at load, gpu/weights.rs): a row's
// quantized values first, four int8 or eight 4-bit values to a u32, then its blocks' f16
// scales two to a u32, the row padded to whole 16 bytes. Quants are thus u32-aligned and a
// 32-value block's quants are whole words (one vec4<u32> for q4_0, two for q8_0), where the
// 34- and 18-byte blocks of the file would need byte-by-byte reads.
@group(0) @binding(2) var<storage, read> w: array<u32>;

// Words of the row's quants, and of the whole row.
fn quant_words() -> u32 {
    return w_cols() / VALUES_PER_WORD;
}

fn row_words() -> u32 {
    let scales = (w_cols() / 32u + 1u) / 2u;
    return (quant_words() + scales + 3u) & ~3u;
}

// The scale of block `block` of the row starting at word `base`.
fn scale_at(base: u32, block: u32) -> f32 {
    let pair = unpack2x16float(w[base + quant_words() + block / 2u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}
