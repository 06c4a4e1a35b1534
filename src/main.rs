//! The `medphi` command line: a thin shell over the library.

mod cli;

fn main() -> std::process::ExitCode {
    keep_freed_memory();
    cli::main()
}

/// Training and long prefills allocate and free tensors of tens of megabytes at every op.
/// glibc serves those with mmap and gives them back with munmap, so every op page-faults
/// its memory in again: a third of a training step went to the kernel (measured on the
/// bundled model's pretraining: 580 tokens/s before, 985 after). Serving everything from
/// the heap and never trimming it keeps freed memory for reuse.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
