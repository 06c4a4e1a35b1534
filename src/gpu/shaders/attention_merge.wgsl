// Merges the per-split partials of attention.wgsl's split mode for one query: for head h,
// out[h, d] = Σ_s acc_s[d]·e^(m_s − M) / Σ_s l_s·e^(m_s − M), with M the largest m_s.
// One workgroup per head; its threads take every 32nd dimension.

@group(0) @binding(1) var<storage, read> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let h = wg.x;
    let stride = p.head_dim + 2u;
    let base = h * p.splits * stride;
    var big_m = partials[base];
    for (var s = 1u; s < p.splits; s++) {
        big_m = max(big_m, partials[base + s * stride]);
    }
    var total = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        total += partials[base + s * stride + 1u] * exp(partials[base + s * stride] - big_m);
    }
    for (var d = lid.x; d < p.head_dim; d += 32u) {
        var o = 0.0;
        for (var s = 0u; s < p.splits; s++) {
            o += partials[base + s * stride + 2u + d] * exp(partials[base + s * stride] - big_m);
        }
        out[h * p.head_dim + d] = o / total;
    }
}
