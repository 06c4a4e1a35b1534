// GGML q4_0: blocks of 32 values, 18 bytes each: f16 scale d, then 16 bytes whose low
// nibbles are values 0..15 and high nibbles values 16..31; value = d * (nibble - 8).
fn w_at(i: u32) -> f32 {
    let o = (i / 32u) * 18u;
    let j = i % 32u;
    let byte = byte_at(o + 2u + j % 16u);
    let nibble = select(byte & 0xfu, byte >> 4u, j >= 16u);
    return scale_at(o) * (f32(nibble) - 8.0);
}
