// Causal attention for real GPUs: query token t (at position start + t) and head h over the
// cached keys 0..=start+t, one workgroup of 64 invocations per (head, token), or per (head,
// split) for one query over a long cache (split mode, `split_keys` > 0, merged by
// attention_merge.wgsl as for the emulator kernel). Keys stream in blocks of BK = 16: four
// invocations per key each dot a quarter of the head (neighbouring invocations read
// neighbouring 16 bytes), the block's scores update an online softmax, and invocation i
// accumulates value dimensions i and i + 64 (neighbouring invocations, neighbouring floats of
// each value row). head_dim ≤ 128, a multiple of 4.

@group(0) @binding(1) var<storage, read> q: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> k_cache: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> v_cache: array<f32>;
@group(0) @binding(4) var<storage, read_write> out: array<f32>;

const BK: u32 = 16u;
var<workgroup> parts: array<f32, 64>;
var<workgroup> scores: array<f32, 16>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) l: u32) {
    let h = wg.x;
    let t = select(wg.y, 0u, p.split_keys > 0u);
    let hd = p.head_dim;
    let kv = h / (p.heads / p.kv_heads);
    let q4 = (t * p.heads + h) * hd / 4u;
    var lo = 0u;
    var hi = p.start + t + 1u;
    if (p.split_keys > 0u) {
        lo = wg.y * p.split_keys;
        hi = min(hi, lo + p.split_keys);
    }
    let key = l / 4u;
    let quarter = l % 4u;
    var m = -3.40282346e38; // lowest finite f32
    var sum = 0.0;
    var acc = vec2<f32>(0.0);
    for (var j0 = lo; j0 < hi; j0 += BK) {
        // Scores: invocation (key, quarter) dots every fourth vec4 of the head.
        var s = 0.0;
        let j = j0 + key;
        if (j < hi) {
            let k4 = (kv * p.capacity + j) * hd / 4u;
            for (var d = quarter; d < hd / 4u; d += 4u) {
                s += dot(q[q4 + d], k_cache[k4 + d]);
            }
        }
        parts[l] = s;
        workgroupBarrier();
        if (quarter == 0u) {
            let total = parts[l] + parts[l + 1u] + parts[l + 2u] + parts[l + 3u];
            scores[key] = select(-3.40282346e38, total * p.scale, j < hi);
        }
        workgroupBarrier();
        var block_max = scores[0];
        for (var i = 1u; i < BK; i++) {
            block_max = max(block_max, scores[i]);
        }
        let m_new = max(m, block_max);
        let correction = exp(m - m_new);
        sum *= correction;
        acc *= correction;
        for (var i = 0u; i < BK && j0 + i < hi; i++) {
            let wgt = exp(scores[i] - m_new);
            sum += wgt;
            let v = (kv * p.capacity + j0 + i) * hd;
            if (l < hd) {
                acc.x += wgt * v_cache[v + l];
            }
            if (l + 64u < hd) {
                acc.y += wgt * v_cache[v + l + 64u];
            }
        }
        m = m_new;
        workgroupBarrier();
    }
    let partial = (h * (p.start / max(p.split_keys, 1u) + 1u) + wg.y) * (hd + 2u);
    if (p.split_keys > 0u) {
        if (l == 0u) {
            out[partial] = m;
            out[partial + 1u] = sum;
        }
        if (l < hd) {
            out[partial + 2u + l] = acc.x;
        }
        if (l + 64u < hd) {
            out[partial + 2u + l + 64u] = acc.y;
        }
    } else {
        let o = (t * p.heads + h) * hd;
        if (l < hd) {
            out[o + l] = acc.x / sum;
        }
        if (l + 64u < hd) {
            out[o + l + 64u] = acc.y / sum;
        }
    }
}
