// The `k` largest of the first `len` logits, largest first (the lower id first on ties, so
// k = 1 is torch.argmax), and log Σ exp(x / T) over all of them. Sampling on the host then
// needs only these 2k + 1 numbers: the normaliser says how much probability lies outside
// the k candidates, and the row of logits is read back only when a draw lands there.
// NaN logits are skipped, as the host sampler does. An inverse temperature of 0 (greedy)
// skips the normaliser.
//
// out: ids[0..k], then the values' bits [k..2k], then the log-normaliser's bits at 2k; an id
// of 0xffffffff marks a missing candidate (len < k).
//
// One workgroup: each thread keeps the top k of its strided share sorted in private memory,
// then k rounds of a tree argmax over the threads' current heads merge them.

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const N: u32 = 256u;
const MAX_K: u32 = 64u;
const NONE: u32 = 0xffffffffu;
// The lowest finite f32, written so that Tint (Chrome) accepts it.
const LOWEST: f32 = -3.40282346e38;

var<workgroup> head_v: array<f32, 256>;
var<workgroup> head_i: array<u32, 256>;
var<workgroup> head_t: array<u32, 256>;
var<workgroup> lse_m: array<f32, 256>;
var<workgroup> lse_s: array<f32, 256>;

// By the bits: shader compilers may fold `v != v` to false.
fn is_nan(v: f32) -> bool {
    let b = bitcast<u32>(v);
    return (b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu) != 0u;
}

// Whether candidate (av, ai) ranks before (bv, bi); NONE ranks last.
fn before(av: f32, ai: u32, bv: f32, bi: u32) -> bool {
    if (ai == NONE) {
        return false;
    }
    if (bi == NONE) {
        return true;
    }
    return av > bv || (av == bv && ai < bi);
}

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
    let l = lid.x;
    let k = min(p.k, MAX_K);
    var top_v: array<f32, 64>;
    var top_i: array<u32, 64>;
    var n = 0u;
    var m = LOWEST;
    var s = 0.0;
    for (var i = l; i < p.len; i += N) {
        let v = x[i];
        if (is_nan(v)) {
            continue;
        }
        if (p.inv_temp > 0.0) {
            let xs = v * p.inv_temp;
            if (xs > m) {
                s = s * exp(m - xs) + 1.0;
                m = xs;
            } else {
                s += exp(xs - m);
            }
        }
        // Ids arrive in increasing order, so an equal value never displaces a kept one.
        if (n < k || v > top_v[n - 1u]) {
            var j = min(n, k - 1u);
            while (j > 0u && v > top_v[j - 1u]) {
                top_v[j] = top_v[j - 1u];
                top_i[j] = top_i[j - 1u];
                j -= 1u;
            }
            top_v[j] = v;
            top_i[j] = i;
            n = min(n + 1u, k);
        }
    }

    var h = 0u;
    for (var r = 0u; r < k; r++) {
        if (h < n) {
            head_v[l] = top_v[h];
            head_i[l] = top_i[h];
        } else {
            head_v[l] = LOWEST;
            head_i[l] = NONE;
        }
        head_t[l] = l;
        workgroupBarrier();
        for (var w = N / 2u; w > 0u; w >>= 1u) {
            if (l < w && before(head_v[l + w], head_i[l + w], head_v[l], head_i[l])) {
                head_v[l] = head_v[l + w];
                head_i[l] = head_i[l + w];
                head_t[l] = head_t[l + w];
            }
            workgroupBarrier();
        }
        if (l == 0u) {
            out[r] = head_i[0];
            out[k + r] = bitcast<u32>(head_v[0]);
        }
        if (head_i[0] != NONE && head_t[0] == l) {
            h += 1u;
        }
        workgroupBarrier();
    }

    if (p.inv_temp == 0.0) {
        return;
    }
    lse_m[l] = m;
    lse_s[l] = s;
    workgroupBarrier();
    for (var w = N / 2u; w > 0u; w >>= 1u) {
        if (l < w) {
            let m2 = max(lse_m[l], lse_m[l + w]);
            lse_s[l] = lse_s[l] * exp(lse_m[l] - m2) + lse_s[l + w] * exp(lse_m[l + w] - m2);
            lse_m[l] = m2;
        }
        workgroupBarrier();
    }
    if (l == 0u) {
        out[2u * k] = bitcast<u32>(lse_m[0] + log(lse_s[0]));
    }
}
