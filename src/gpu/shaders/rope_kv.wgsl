// Partial NeoX rotary embedding on the first `rotary_dim` features of each head, for the
// tokens at positions start..start+seq. Queries go to `q_out`; keys (rotated) and values are
// written straight into the KV cache, laid out [kv_head][capacity][head_dim].
// cos/sin come from tables made like the CPU path's ((positions, rotary_dim / 2)),
// since WGSL's cos/sin are imprecise for large angles.

@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> k: array<f32>;
@group(0) @binding(3) var<storage, read> v: array<f32>;
@group(0) @binding(4) var<storage, read> cos_t: array<f32>;
@group(0) @binding(5) var<storage, read> sin_t: array<f32>;
@group(0) @binding(6) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> k_cache: array<f32>;
@group(0) @binding(8) var<storage, read_write> v_cache: array<f32>;

// Feature d of a head whose features start at `base` in `src`, rotated for position `pos`.
fn rotate(src_is_q: bool, base: u32, d: u32, pos: u32) -> f32 {
    let half = p.rotary_dim / 2u;
    var x = 0.0;
    var partner = 0.0;
    if (src_is_q) {
        x = q[base + d];
    } else {
        x = k[base + d];
    }
    if (d >= p.rotary_dim) {
        return x;
    }
    let j = d % half;
    let c = cos_t[pos * half + j];
    let s = sin_t[pos * half + j];
    if (d < half) {
        if (src_is_q) { partner = q[base + d + half]; } else { partner = k[base + d + half]; }
        return x * c - partner * s;
    }
    if (src_is_q) { partner = q[base + d - half]; } else { partner = k[base + d - half]; }
    return x * c + partner * s;
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) id: vec3<u32>) {
    // id.x: feature, id.y: head (queries and then kv heads), id.z: token.
    let d = id.x;
    let h = id.y;
    let t = id.z;
    if (d >= p.head_dim || t >= p.seq) {
        return;
    }
    let pos = p.start + t;
    if (h < p.heads) {
        let base = (t * p.heads + h) * p.head_dim;
        q_out[base + d] = rotate(true, base, d, pos);
    } else if (h < p.heads + p.kv_heads) {
        let kh = h - p.heads;
        let base = (t * p.kv_heads + kh) * p.head_dim;
        let dst = (kh * p.capacity + pos) * p.head_dim + d;
        k_cache[dst] = rotate(false, base, d, pos);
        v_cache[dst] = v[base + d];
    }
}
