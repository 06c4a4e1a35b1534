//! The thread count, settled once at startup.

/// candle 0.11 asks for its thread count at every f32 matrix product (attention's two per
/// layer and token), and unless `RAYON_NUM_THREADS` is set it counts physical cores by
/// reading `/proc/cpuinfo`: tens of microseconds each, over a millisecond per decoded token
/// of a 14-layer model (seen in `perf` as `show_cpuinfo`). Setting the variable to the count
/// candle would find keeps every pool the same size and skips the reads.
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // Called first thing in main, before any thread exists that could read the environment.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}
