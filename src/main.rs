//! The `medphi` command line: a thin shell over the library.

mod cli;

fn main() -> std::process::ExitCode {
    cli::memory::keep_freed_memory();
    cli::threads::settle_thread_count();
    cli::main()
}
