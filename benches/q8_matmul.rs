//! q8_0 matrix products at Phi-2's shapes: our kernel (`model::quant_matmul`) against candle's
//! `QMatMul` on the same blocks, for one activation row (a decode step) and 64 (a prefill).
//! Criterion reports both in the same run, so their ratio is what to read.
//!
//! cargo bench --bench q8_matmul
//!
//! Our kernel runs only on x86-64 CPUs with AVX-512 VNNI; elsewhere this says so and stops.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
#[cfg(target_arch = "x86_64")]
use medphi::model::quant_matmul::Q8Matrix;

#[cfg(not(target_arch = "x86_64"))]
fn bench(_: &mut Criterion) {
    eprintln!("medphi's q8_0 kernel is for x86-64 CPUs with AVX-512 VNNI: nothing to compare here");
}

#[cfg(target_arch = "x86_64")]
fn bench(c: &mut Criterion) {
    let dev = Device::Cpu;
    if !(is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni")) {
        eprintln!(
            "this CPU lacks AVX-512 VNNI, where medphi's q8_0 kernel runs: nothing to compare"
        );
        return;
    }
    // (rows, cols): attention projections, fc1, fc2.
    for (rows, cols) in [(2560, 2560), (10240, 2560), (2560, 10240)] {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev).unwrap();
        let q = QTensor::quantize(&w, GgmlDType::Q8_0).unwrap();
        let ours = Q8Matrix::for_this_cpu(&q.data().unwrap(), rows, cols)
            .unwrap()
            .expect("a CPU with AVX-512 VNNI");
        let candle = QMatMul::from_qtensor(q).unwrap();
        let mut group = c.benchmark_group(format!("q8_0 {rows}x{cols}"));
        group.sample_size(10);
        for m in [1, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, cols), &dev).unwrap();
            let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            group.bench_with_input(BenchmarkId::new("candle", m), &x, |b, x| {
                b.iter(|| candle.forward(x).unwrap())
            });
            group.bench_with_input(BenchmarkId::new("medphi", m), &values, |b, v| {
                b.iter(|| ours.matmul(v).unwrap())
            });
        }
        group.finish();
    }
    // A decode step reads every weight once, from memory rather than the caches: fc2-shaped
    // matrices adding up to 670 MB, one activation row through each.
    let (rows, cols, count) = (2560, 10240, 24);
    let w = Tensor::randn(0f32, 0.02, (rows, cols), &dev).unwrap();
    let blocks = QTensor::quantize(&w, GgmlDType::Q8_0)
        .unwrap()
        .data()
        .unwrap()
        .into_owned();
    let ours: Vec<Q8Matrix> = (0..count)
        .map(|_| {
            Q8Matrix::for_this_cpu(&blocks, rows, cols)
                .unwrap()
                .unwrap()
        })
        .collect();
    let candle: Vec<QMatMul> = (0..count)
        .map(|_| QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap())
        .collect();
    let x = Tensor::randn(0f32, 1.0, (1, cols), &dev).unwrap();
    let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let mut group = c.benchmark_group(format!("q8_0 {count} x {rows}x{cols} from memory"));
    group.sample_size(10);
    group.bench_function("candle", |b| {
        b.iter(|| {
            for q in &candle {
                black_box(q.forward(&x).unwrap());
            }
        })
    });
    group.bench_function("medphi", |b| {
        b.iter(|| {
            for q in &ours {
                black_box(q.matmul(&values).unwrap());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
