//! One Phi-2 decoder layer at the real model's width (hidden 2560, MLP 10240, 32 heads),
//! on the CPU backend: a prefill of 128 tokens and a decode step after 128 cached tokens.
//! The vocabulary is shrunk so the embedding and lm_head do not dominate.
//!
//! cargo bench --bench decoder_layer

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use medphi::model::{Activation, Logits, Phi, PhiConfig};
use medphi::weights::RandomWeights;

fn phi2_layer() -> Phi {
    let cfg = PhiConfig {
        vocab_size: 256,
        hidden_size: 2560,
        intermediate_size: 10240,
        num_hidden_layers: 1,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        max_position_embeddings: 2048,
        layer_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        partial_rotary_factor: 0.4,
        hidden_act: Activation::GeluTanh,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: None,
    };
    Phi::load(&cfg, &RandomWeights { dtype: DType::F32 }, true).expect("random Phi-2 layer")
}

fn bench(c: &mut Criterion) {
    let model = phi2_layer();
    let prompt: Vec<u32> = (0..128).map(|i| i % 256).collect();
    let input = Tensor::new(prompt.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let one = Tensor::new(&[7u32], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let mut group = c.benchmark_group("phi2_decoder_layer");
    group.sample_size(10);
    group.bench_function("prefill_128", |b| {
        b.iter(|| {
            let mut cache = model.new_cache(1, 256).unwrap();
            model
                .forward(&input, Some(&mut cache), Logits::Last)
                .unwrap()
        })
    });
    let mut cache = model.new_cache(1, 256).unwrap();
    model
        .forward(&input, Some(&mut cache), Logits::Last)
        .unwrap();
    group.bench_function("decode_at_128", |b| {
        b.iter(|| {
            cache.truncate(128);
            model.forward(&one, Some(&mut cache), Logits::Last).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
