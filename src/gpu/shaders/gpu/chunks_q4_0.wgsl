// q4_0 weights for the gpu kernel family: a 16-byte chunk is a whole 32-value block, byte j
// holding value j in its low nibble and value j + 16 in its high nibble.
// See chunks_f32.wgsl for the contract and chunks_ggml.wgsl for the layout.
const VALUES_PER_WORD: u32 = 8u;
const CHUNK: u32 = 32u;

// Values 4i..4i+3: the low nibbles of word i (i < 4), or the high nibbles of word i − 4.
fn chunk_vec4(raw: vec4<u32>, i: u32) -> vec4<f32> {
    let word = raw[i % 4u];
    let shift = select(0u, 4u, i >= 4u);
    let n = vec4<u32>(word >> shift, word >> (8u + shift), word >> (16u + shift), word >> (24u + shift));
    return vec4<f32>(n & vec4<u32>(0xfu)) - 8.0;
}
