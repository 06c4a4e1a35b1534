// f16 weights (pairs packed in u32) for the gpu kernel family: a 16-byte chunk is 8 values.
// See chunks_f32.wgsl for the contract.
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;

const CHUNK: u32 = 8u;

fn chunk_raw(row: u32, c: u32) -> vec4<u32> {
    return w[row * (w_cols() / 8u) + c];
}

fn chunk_scale(row: u32, c: u32) -> f32 {
    return 1.0;
}

fn chunk_vec4(raw: vec4<u32>, i: u32) -> vec4<f32> {
    return vec4<f32>(unpack2x16float(raw[2u * i]), unpack2x16float(raw[2u * i + 1u]));
}
