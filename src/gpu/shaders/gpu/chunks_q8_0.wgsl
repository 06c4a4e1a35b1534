// q8_0 weights for the gpu kernel family: a 16-byte chunk is 16 int8 values, half a block.
// See chunks_f32.wgsl for the contract and chunks_ggml.wgsl for the layout.
const VALUES_PER_WORD: u32 = 4u;
const CHUNK: u32 = 16u;

// The four int8 of word i, sign-extended.
fn chunk_vec4(raw: vec4<u32>, i: u32) -> vec4<f32> {
    let word = raw[i];
    return vec4<f32>(
        f32(bitcast<i32>(word << 24u) >> 24u),
        f32(bitcast<i32>(word << 16u) >> 24u),
        f32(bitcast<i32>(word << 8u) >> 24u),
        f32(bitcast<i32>(word) >> 24u),
    );
}
