// Causal attention for query token t (at position start + t) and head h over the cached
// keys 0..=start+t, with an online (single-pass) softmax. One workgroup per (head, token);
// its 32 threads take every 32nd key, then their partial maxima, sums and weighted values
// are merged. head_dim ≤ 128.
//
// Split over the sequence (decode with a long cache, `split_keys` > 0): workgroup (h, s)
// covers keys s·split_keys .. (s+1)·split_keys only and writes its unnormalised partial
// [max, sum, acc[0..head_dim]] to `out` for attention_merge.wgsl, so a single query still
// keeps many workgroups busy.

@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k_cache: array<f32>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const W: u32 = 32u;
const MAX_D: u32 = 128u;
var<workgroup> part_m: array<f32, 32>;
var<workgroup> part_l: array<f32, 32>;
var<workgroup> part_acc: array<f32, 4096>; // W × MAX_D

@compute @workgroup_size(32)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let h = wg.x;
    // In split mode the grid's second dimension is the split and there is one query.
    let t = select(wg.y, 0u, p.split_keys > 0u);
    let l = lid.x;
    let hd = p.head_dim;
    let kv = h / (p.heads / p.kv_heads);
    let q_base = (t * p.heads + h) * hd;
    var lo = 0u;
    var hi = p.start + t + 1u;
    if (p.split_keys > 0u) {
        lo = wg.y * p.split_keys;
        hi = min(hi, lo + p.split_keys);
    }
    var m = -3.40282346e38; // lowest finite f32 (see argmax.wgsl)
    var sum = 0.0;
    var acc: array<f32, 128>;
    for (var d = 0u; d < hd; d++) {
        acc[d] = 0.0;
    }
    for (var j = lo + l; j < hi; j += W) {
        let k_base = (kv * p.capacity + j) * hd;
        var s = 0.0;
        for (var d = 0u; d < hd; d++) {
            s += q[q_base + d] * k_cache[k_base + d];
        }
        s *= p.scale;
        let m_new = max(m, s);
        let correction = exp(m - m_new);
        let w = exp(s - m_new);
        sum = sum * correction + w;
        for (var d = 0u; d < hd; d++) {
            acc[d] = acc[d] * correction + w * v_cache[k_base + d];
        }
        m = m_new;
    }
    part_m[l] = m;
    workgroupBarrier();
    var big_m = part_m[0];
    for (var i = 1u; i < W; i++) {
        big_m = max(big_m, part_m[i]);
    }
    // Threads that saw no key keep m = -max and contribute exp(-huge) = 0.
    let f = exp(m - big_m);
    part_l[l] = sum * f;
    for (var d = 0u; d < hd; d++) {
        part_acc[l * MAX_D + d] = acc[d] * f;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < W; i++) {
        total += part_l[i];
    }
    let partial = (h * (p.start / max(p.split_keys, 1u) + 1u) + wg.y) * (hd + 2u);
    if (p.split_keys > 0u && l == 0u) {
        out[partial] = big_m;
        out[partial + 1u] = total;
    }
    for (var d = l; d < hd; d += W) {
        var o = 0.0;
        for (var i = 0u; i < W; i++) {
            o += part_acc[i * MAX_D + d];
        }
        if (p.split_keys > 0u) {
            out[partial + 2u + d] = o;
        } else {
            out[q_base + d] = o / total;
        }
    }
}
