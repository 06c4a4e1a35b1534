// f32 weights for the gpu kernel family, read as 16-byte chunks: a chunk is 4 values.
// Every chunks_*.wgsl binds `w` (as vec4<u32>: one 16-byte load a chunk) and defines CHUNK
// (values per chunk), `chunk_raw(row, c)` (chunk c of a weight row, as loaded),
// `chunk_scale(row, c)` (the scale its values are multiplied by) and `chunk_vec4(raw, i)` (its
// i-th four values, unscaled, for i < CHUNK / 4). Rows are `w_cols()` long, a multiple of 32.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

const CHUNK: u32 = 4u;

fn chunk_raw(row: u32, c: u32) -> vec4<u32> {
    return w[row * (w_cols() / 4u) + c];
}

fn chunk_scale(row: u32, c: u32) -> f32 {
    return 1.0;
}

fn chunk_vec4(raw: vec4<u32>, i: u32) -> vec4<f32> {
    return bitcast<vec4<f32>>(raw);
}
