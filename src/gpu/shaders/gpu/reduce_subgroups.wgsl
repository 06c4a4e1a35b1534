// `row_sum` with subgroup operations: `subgroupAdd` adds a subgroup's partial sums in one
// step, then each subgroup's total goes through workgroup memory to its row. Used where the
// adapter's subgroups are at most LANES wide, so none spans two rows (subgroups are the
// consecutive runs of the workgroup's invocations). The browser's WGSL needs `enable
// subgroups;` for this, which kernels.rs adds there (wgpu's own compiler takes the feature
// from the device instead and refuses the directive).

var<workgroup> red: array<f32, 256>;
var<private> subgroup_width: u32;

fn row_sum(v: f32, li: u32) -> f32 {
    let s = subgroupAdd(v);
    if (li % subgroup_width == 0u) {
        red[li / subgroup_width] = s;
    }
    workgroupBarrier();
    let per_row = LANES / subgroup_width;
    let first = (li / LANES) * per_row;
    var total = 0.0;
    for (var i = 0u; i < per_row; i++) {
        total += red[first + i];
    }
    return total;
}
