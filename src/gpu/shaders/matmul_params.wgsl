// Parameters and bindings shared by matmul.wgsl and gemv.wgsl (prepended to each, with one
// weights_*.wgsl that binds `w` at binding 2 and defines `w_at`; each kernel binds x at 1 as
// it reads it):
// y[row * ldy + col_offset + col] = x[row, :] · w[col, :] + b[col].

struct Params {
    m: u32,
    n: u32,
    k: u32,
    has_bias: u32,
    ldy: u32,
    col_offset: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
