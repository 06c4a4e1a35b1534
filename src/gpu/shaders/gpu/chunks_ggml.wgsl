// The gpu kernel family's view of weights_ggml.wgsl's layout (a row's quants, then its f16
// scales, padded to 16 bytes) as vec4<u32> chunks. Shared by chunks_q8_0 and chunks_q4_0.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

// The row's first vec4.
fn row_base(row: u32) -> u32 {
    let quants = w_cols() / VALUES_PER_WORD;
    let scales = (w_cols() / 32u + 1u) / 2u;
    return row * ((quants + scales + 3u) / 4u);
}

fn chunk_raw(row: u32, c: u32) -> vec4<u32> {
    return w[row_base(row) + c];
}

fn chunk_scale(row: u32, c: u32) -> f32 {
    let block = c * CHUNK / 32u;
    let word = row_base(row) * 4u + w_cols() / VALUES_PER_WORD + block / 2u;
    let pair = unpack2x16float(w[word / 4u][word % 4u]);
    return select(pair.x, pair.y, (block & 1u) == 1u);
}
