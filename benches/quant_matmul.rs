//! q8_0, q4_0, q4_K and q6_K matrix products at Phi-2's shapes: each of our kernels this CPU runs
//! (`model::quant_matmul`: AVX-512 VNNI, AVX2, NEON's dot product) against candle's `QMatMul` on the same blocks,
//! for one activation row (a decode step) and 64 (a prefill). Criterion reports them in the
//! same run, so their ratios are what to read.
//!
//! cargo bench --bench quant_matmul
//!
//! Our kernels run on x86-64 CPUs with AVX2 and aarch64 CPUs with the dot product
//! instructions; elsewhere this says so and stops.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
#[cfg(native_kernels)]
use medphi::model::quant_matmul::{Kernel, QuantMatrix};

#[cfg(not(native_kernels))]
fn bench(_: &mut Criterion) {
    eprintln!(
        "medphi's quantized kernels are for x86-64 and aarch64 CPUs: nothing to compare here"
    );
}

/// `blocks` (a `rows × cols` matrix stored as `dtype`) for `kernel`.
#[cfg(native_kernels)]
fn ours(dtype: GgmlDType, blocks: &[u8], rows: usize, cols: usize, kernel: Kernel) -> QuantMatrix {
    QuantMatrix::copied(kernel, dtype, blocks, rows, cols)
        .unwrap()
        .expect("a format our kernels serve")
}

#[cfg(native_kernels)]
fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    let kernels = Kernel::all_here();
    if kernels.is_empty() {
        eprintln!("this CPU lacks what medphi's quantized kernels need (AVX2; on ARM, the dot product instructions): nothing to compare");
        return;
    }
    let name = |kernel: Kernel| format!("medphi {kernel:?}");
    for dtype in [
        GgmlDType::Q8_0,
        GgmlDType::Q4_0,
        GgmlDType::Q4K,
        GgmlDType::Q6K,
    ] {
        // (rows, cols): attention projections, fc1, fc2.
        for (rows, cols) in [(2560, 2560), (10240, 2560), (2560, 10240)] {
            let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev).unwrap();
            let q = QTensor::quantize(&w, dtype).unwrap();
            let mats: Vec<QuantMatrix> = kernels
                .iter()
                .map(|&k| ours(dtype, &q.data().unwrap(), rows, cols, k))
                .collect();
            let candle = QMatMul::from_qtensor(q).unwrap();
            let mut group = c.benchmark_group(format!("{dtype:?} {rows}x{cols}"));
            group.sample_size(10);
            for m in [1, 64] {
                let x = Tensor::randn(0f32, 1.0, (m, cols), &dev).unwrap();
                let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                group.bench_with_input(BenchmarkId::new("candle", m), &x, |b, x| {
                    b.iter(|| candle.forward(x).unwrap())
                });
                for (kernel, ours) in kernels.iter().zip(&mats) {
                    group.bench_with_input(BenchmarkId::new(name(*kernel), m), &values, |b, v| {
                        b.iter(|| ours.matmul(v).unwrap())
                    });
                }
            }
            group.finish();
        }
        // A decode step reads every weight once, from memory rather than the caches:
        // fc2-shaped matrices adding up to 670 MB as q8_0 (355 MB as q4_0 and q4_K, 516 MB
        // as q6_K), one activation row through each.
        let (rows, cols, count) = (2560, 10240, 24);
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev).unwrap();
        let blocks = QTensor::quantize(&w, dtype)
            .unwrap()
            .data()
            .unwrap()
            .into_owned();
        let candle: Vec<QMatMul> = (0..count)
            .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap())
            .collect();
        let x = Tensor::randn(0f32, 1.0, (1, cols), &dev).unwrap();
        let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut group = c.benchmark_group(format!("{dtype:?} {count} x {rows}x{cols} from memory"));
        group.sample_size(10);
        group.bench_function("candle", |b| {
            b.iter(|| {
                for q in &candle {
                    black_box(q.forward(&x).unwrap());
                }
            })
        });
        for &kernel in &kernels {
            let mats: Vec<QuantMatrix> = (0..count)
                .map(|_| ours(dtype, &blocks, rows, cols, kernel))
                .collect();
            group.bench_function(name(kernel), |b| {
                b.iter(|| {
                    for q in &mats {
                        black_box(q.matmul(&values).unwrap());
                    }
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
