// Index of the largest of the first `len` values (the first one on ties, as torch.argmax),
// so greedy decoding reads back one u32 instead of a vocabulary of logits.
// Params: len_params.wgsl.

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;

const N: u32 = 256u;
var<workgroup> best_v: array<f32, 256>;
var<workgroup> best_i: array<u32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_id) lid: vec3<u32>) {
    let l = lid.x;
    // The lowest finite f32, written so that Tint (Chrome) accepts it: -3.4028235e38 is
    // out of range for its exact literal check.
    var v = -3.40282346e38;
    var bi = 0xffffffffu;
    for (var i = l; i < p.len; i += N) {
        if (x[i] > v || bi == 0xffffffffu) {
            v = x[i];
            bi = i;
        }
    }
    best_v[l] = v;
    best_i[l] = bi;
    workgroupBarrier();
    for (var s = N / 2u; s > 0u; s >>= 1u) {
        if (l < s) {
            let ov = best_v[l + s];
            let oi = best_i[l + s];
            if (oi != 0xffffffffu && (best_i[l] == 0xffffffffu || ov > best_v[l] || (ov == best_v[l] && oi < best_i[l]))) {
                best_v[l] = ov;
                best_i[l] = oi;
            }
        }
        workgroupBarrier();
    }
    if (l == 0u) {
        out[0] = best_i[0];
    }
}
