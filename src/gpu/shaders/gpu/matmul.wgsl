// Prefill y = x · wᵀ + b for real GPUs: a workgroup of 16 × 16 invocations computes a
// 32-row × 64-column tile of y, each invocation a 2 × 4 block in registers. Per step of 32
// along k, the x tile (32 × 32) and the w tile (64 × 32, dequantized while staged: whole
// 16-byte chunks, chunks_*.wgsl) go to workgroup memory (12 KiB of WebGPU's guaranteed 16) as
// vec4s of consecutive k; loads are coalesced along k. k is a multiple of 32.
// Parameters: MatmulParams (params.rs); b and y: matmul_bindings.wgsl.

const TM: u32 = 32u;
const TN: u32 = 64u;
const TK: u32 = 32u;
// [row][k / 4]: 8 vec4s per row of a tile.
var<workgroup> xs: array<vec4<f32>, 256>;
var<workgroup> ws: array<vec4<f32>, 512>;

@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) l: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let row0 = wg.y * TM;
    let col0 = wg.x * TN;
    let k4 = p.k / 4u;
    var acc: array<vec4<f32>, 2>;
    for (var k0 = 0u; k0 < p.k; k0 += TK) {
        // x: 256 vec4s, one each.
        let xr = row0 + li / 8u;
        xs[li] = vec4<f32>(0.0);
        if (xr < p.m) {
            xs[li] = x[xr * k4 + k0 / 4u + li % 8u];
        }
        // w: 64 rows of TK / CHUNK chunks.
        let per_row = TK / CHUNK;
        for (var i = li; i < TN * per_row; i += 256u) {
            let r = i / per_row;
            let c = i % per_row;
            let at = r * 8u + c * (CHUNK / 4u);
            var raw = vec4<u32>(0u);
            var d = 0.0;
            if (col0 + r < p.n) {
                raw = chunk_raw(col0 + r, k0 / CHUNK + c);
                d = chunk_scale(col0 + r, k0 / CHUNK + c);
            }
            for (var j = 0u; j < CHUNK / 4u; j++) {
                ws[at + j] = d * chunk_vec4(raw, j);
            }
        }
        workgroupBarrier();
        for (var q = 0u; q < 8u; q++) {
            let a0 = xs[(l.y * 2u) * 8u + q];
            let a1 = xs[(l.y * 2u + 1u) * 8u + q];
            let b0 = ws[(l.x * 4u) * 8u + q];
            let b1 = ws[(l.x * 4u + 1u) * 8u + q];
            let b2 = ws[(l.x * 4u + 2u) * 8u + q];
            let b3 = ws[(l.x * 4u + 3u) * 8u + q];
            acc[0] += vec4<f32>(dot(a0, b0), dot(a0, b1), dot(a0, b2), dot(a0, b3));
            acc[1] += vec4<f32>(dot(a1, b0), dot(a1, b1), dot(a1, b2), dot(a1, b3));
        }
        workgroupBarrier();
    }
    for (var i = 0u; i < 2u; i++) {
        let row = row0 + l.y * 2u + i;
        for (var j = 0u; j < 4u; j++) {
            let col = col0 + l.x * 4u + j;
            if (row < p.m && col < p.n) {
                var v = acc[i][j];
                if (p.has_bias == 1u) {
                    v += b[col];
                }
                y[row * p.ldy + p.col_offset + col] = v;
            }
        }
    }
}
