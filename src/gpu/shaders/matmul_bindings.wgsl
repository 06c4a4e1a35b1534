// Bindings shared by matmul.wgsl and gemv.wgsl (prepended to each, after the parameters and
// one weights_*.wgsl that binds `w` at binding 2 and defines `w_at`; each kernel binds x at 1
// as it reads it): y[row * ldy + col_offset + col] = x[row, :] · w[col, :] + b[col].

@group(0) @binding(3) var<storage, read> b: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

fn w_cols() -> u32 {
    return p.k;
}
