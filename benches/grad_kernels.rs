//! The training path's fused CPU kernels against the same math composed from candle
//! primitives (what training ran before them, and still runs on other devices), forward
//! plus backward, at the shapes of one tiny-medphi pretraining micro-batch: 8 sequences of
//! 256 tokens, hidden 256, MLP 1024, 8 heads, vocabulary 4096. The ratio of each pair is
//! the speed-up of that op. (`linear/composed` is candle's broadcast product and add: the
//! graph nodes the model's composed layer has.)
//!
//! cargo bench --bench grad_kernels

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, criterion_main, Criterion};
use medphi::model::grad_kernels as k;

fn var(shape: &[usize]) -> Var {
    Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
}

/// One forward and backward of `op` (the backward of its output's sum).
fn step(op: impl Fn() -> candle_core::Result<Tensor>) -> candle_core::backprop::GradStore {
    op().unwrap().sum_all().unwrap().backward().unwrap()
}

fn bench(c: &mut Criterion) {
    let (b, t, h, heads, mlp, vocab) = (8, 256, 256, 8, 1024, 4096);
    let x = var(&[b, t, h]);
    let (w, bias) = (var(&[h]), var(&[h]));
    let act = var(&[b, t, mlp]);
    let mlp_bias = var(&[mlp]);
    let scores = var(&[b, heads, t, t]);
    let logits = var(&[b, t, vocab]);
    let targets = Tensor::arange(0u32, (b * t) as u32, &Device::Cpu)
        .unwrap()
        .reshape((b, t))
        .unwrap();
    let scale = 1.0 / ((h / heads) as f64).sqrt();
    let (fc1, fc1_bias) = (var(&[mlp, h]), var(&[mlp]));
    let (q, kk, v) = (var(&[b, t, h]), var(&[b, t, h]), var(&[b, t, h]));
    // Phi's partial rotary: a quarter of each head's features turn, in pairs.
    let angles = Tensor::randn(0f32, 1.0, (t, h / heads / 4), &Device::Cpu).unwrap();
    let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
    let mask = k::causal_mask(t, 0, DType::F32, &Device::Cpu).unwrap();

    let mut g = c.benchmark_group("grad_kernels");
    g.sample_size(10);
    g.bench_function("layer_norm/kernel", |r| {
        r.iter(|| step(|| k::layer_norm(&x, &w, &bias, 1e-5)))
    });
    g.bench_function("layer_norm/composed", |r| {
        r.iter(|| step(|| k::layer_norm_composed(&x, &w, &bias, 1e-5)))
    });
    g.bench_function("add_bias/kernel", |r| {
        r.iter(|| step(|| k::add_bias(&act, &mlp_bias)))
    });
    g.bench_function("add_bias/composed", |r| {
        r.iter(|| step(|| act.broadcast_add(&mlp_bias)))
    });
    g.bench_function("linear/kernel", |r| {
        r.iter(|| step(|| k::linear(&x, &fc1, &fc1_bias)))
    });
    g.bench_function("linear/composed", |r| {
        r.iter(|| step(|| x.broadcast_matmul(&fc1.t()?)?.broadcast_add(&fc1_bias)))
    });
    g.bench_function("attention/kernel", |r| {
        r.iter(|| step(|| k::attention(&q, &kk, &v, heads, (&cos, &sin), scale)))
    });
    g.bench_function("attention/composed", |r| {
        r.iter(|| step(|| k::attention_composed(&q, &kk, &v, heads, (&cos, &sin), scale)))
    });
    g.bench_function("gelu/kernel", |r| r.iter(|| step(|| k::gelu_tanh(&act))));
    g.bench_function("gelu/composed", |r| r.iter(|| step(|| act.gelu())));
    g.bench_function("causal_softmax/kernel", |r| {
        r.iter(|| step(|| k::causal_softmax(&scores, scale, mask.as_ref())))
    });
    g.bench_function("causal_softmax/composed", |r| {
        r.iter(|| step(|| k::causal_softmax_composed(&scores, scale, mask.as_ref())))
    });
    g.bench_function("target_logp/kernel", |r| {
        r.iter(|| step(|| k::target_logp(&logits, &targets)))
    });
    g.bench_function("target_logp/composed", |r| {
        r.iter(|| step(|| k::target_logp_composed(&logits, &targets)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
