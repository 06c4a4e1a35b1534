// `row_sum` by a tree in workgroup memory, for adapters without subgroup operations: the
// LANES partial sums of each row of gemv.wgsl, halved log2(LANES) times.
var<workgroup> red: array<f32, 256>;

fn row_sum(v: f32, li: u32) -> f32 {
    let lane = li % LANES;
    red[li] = v;
    workgroupBarrier();
    for (var s = LANES / 2u; s > 0u; s >>= 1u) {
        if (lane < s) {
            red[li] += red[li + s];
        }
        workgroupBarrier();
    }
    return red[li - lane];
}
