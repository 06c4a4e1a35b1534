// out[t, :] = table[ids[t], :] for the ids that fall in this chunk of the table (the
// weights `w`, in any format: a weights_*.wgsl is prepended). A table larger than one
// storage binding (Phi-2's 51200 × 2560) is bound in row chunks, one dispatch per chunk.

@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

fn w_cols() -> u32 {
    return p.dim;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) id: vec3<u32>, @builtin(num_workgroups) nw: vec3<u32>) {
    let i = id.y * nw.x * 256u + id.x;
    if (i >= p.tokens * p.dim) {
        return;
    }
    let t = i / p.dim;
    let row = ids[t];
    if (row >= p.row_start && row < p.row_start + p.row_count) {
        out[i] = w_at(row - p.row_start, i % p.dim);
    }
}
