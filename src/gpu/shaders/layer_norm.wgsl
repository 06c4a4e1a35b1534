// LayerNorm over the last dimension, one workgroup per row, statistics in f32:
// y = (x - mean) / sqrt(var + eps) * gamma + beta.

@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> gamma: array<f32>;
@group(0) @binding(3) var<storage, read> beta: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;

const N: u32 = 256u;
var<workgroup> red: array<f32, 256>;

// Sums `red` across the workgroup into red[0].
fn reduce(l: u32) {
    for (var s = N / 2u; s > 0u; s >>= 1u) {
        if (l < s) {
            red[l] += red[l + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_id) lid: vec3<u32>) {
    let l = lid.x;
    let base = wg.x * p.dim;
    var s = 0.0;
    for (var i = l; i < p.dim; i += N) {
        s += x[base + i];
    }
    red[l] = s;
    workgroupBarrier();
    reduce(l);
    let mean = red[0] / f32(p.dim);
    workgroupBarrier();
    var v = 0.0;
    for (var i = l; i < p.dim; i += N) {
        let d = x[base + i] - mean;
        v += d * d;
    }
    red[l] = v;
    workgroupBarrier();
    reduce(l);
    let inv = inverseSqrt(red[0] / f32(p.dim) + p.eps);
    for (var i = l; i < p.dim; i += N) {
        y[base + i] = (x[base + i] - mean) * inv * gamma[i] + beta[i];
    }
}
