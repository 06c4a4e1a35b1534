// The one-length parameter block of the elementwise kernels (prepended to each),
// padded to the 16 bytes a uniform block needs.

struct Params {
    len: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}
