//! The thread count, settled once at startup.

/// candle 0.11 asks for its thread count at every f32 matrix product (attention's two per
/// layer and token), and unless `RAYON_NUM_THREADS` is set it counts physical cores by
/// reading `/proc/cpuinfo`: tens of microseconds each, over a millisecond per decoded token
/// of a 14-layer model (seen in `perf` as `show_cpuinfo`). Setting the variable to the count
/// candle finds skips the reads, and sizes rayon's pool (which would take every logical CPU)
/// like candle's: one thread per physical core, PyTorch's default too, so neither pool
/// runs more threads than there are cores.
pub fn settle_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let threads = candle_core::utils::get_num_threads();
        // Called first thing in main, before any thread exists that could read the environment.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
}

/// For training: candle's element-wise ops on the calling thread. candle runs them on a pool
/// of its own whose workers spin between ops, beside rayon's pool that runs training's
/// matrix products; with a thread per core, the spinning took cores from the products.
/// Bundled model, batch 8×256, 2 threads: 4,277 -> 4,662 tokens/s. (Decoding keeps the
/// pool: our quantized kernels run on it.) Called before any candle op builds the pool and
/// while no other thread exists to read the environment.
pub fn train_on_rayon_alone() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}
