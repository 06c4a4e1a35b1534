//! Names for the targets our quantized kernels run on, so that code gated on them says
//! which it means.

fn main() {
    cfg_aliases::cfg_aliases! {
        // The native kernels, on a GGUF's blocks where they lie (model/quant_matmul).
        native_kernels: { any(target_arch = "x86_64", target_arch = "aarch64") },
        // Those and the browser's, on tiles repacked at load.
        quant_kernels: { any(native_kernels, target_arch = "wasm32") },
    }
}
