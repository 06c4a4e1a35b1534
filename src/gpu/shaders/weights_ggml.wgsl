// Byte access into GGML block data uploaded as-is (blocks are 34 or 18 bytes, so they are not
// u32-aligned). Shared by the q8_0 and q4_0 formats.
@group(0) @binding(2) var<storage, read> w: array<u32>;

fn byte_at(o: u32) -> u32 {
    return (w[o >> 2u] >> ((o & 3u) * 8u)) & 0xffu;
}

// The block's f16 scale `d`, little-endian at byte offset `o`.
fn scale_at(o: u32) -> f32 {
    return unpack2x16float(byte_at(o) | (byte_at(o + 1u) << 8u)).x;
}

// Four consecutive values from i, a multiple of 4 (so within one 32-value block).
fn w4_at(i: u32) -> vec4<f32> {
    return vec4<f32>(w_at(i), w_at(i + 1u), w_at(i + 2u), w_at(i + 3u));
}
