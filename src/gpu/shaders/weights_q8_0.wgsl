// GGML q8_0: blocks of 32 values, 34 bytes each: f16 scale d, then 32 int8 q; value = d * q.
// Rows are whole blocks (k is a multiple of 32), so block = i / 32 for flat index i.
fn w_at(i: u32) -> f32 {
    let o = (i / 32u) * 34u;
    let q = bitcast<i32>(byte_at(o + 2u + i % 32u) << 24u) >> 24u; // sign-extend the int8
    return scale_at(o) * f32(q);
}
