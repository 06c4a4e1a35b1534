//! The model built with `fused = false` is the training path: every weight must receive a
//! gradient, and the gradient must agree with a finite difference; in f32 on the CPU (the
//! fused kernels: linear layers, attention, LayerNorm, …) it must agree with the f64 path
//! (composed from candle's primitives).
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

use std::cell::RefCell;

use candle_core::{DType, Device, Tensor, Var};
use medphi::model::{Activation, Logits, Phi, PhiConfig};
use medphi::weights::{StoredTensor, TensorSource, Weight};

/// Hands out fresh random `Var`s and remembers them, as a trainer's parameter store would.
struct Vars(RefCell<Vec<(String, Var)>>);

impl TensorSource for Vars {
    fn tensor(&self, name: &str, shape: &[usize]) -> medphi::Result<Weight> {
        let init = if name.ends_with("layernorm.weight") {
            (Tensor::randn(0f64, 0.1, shape, &Device::Cpu)? + 1.0)?
        } else {
            Tensor::randn(0f64, 0.3, shape, &Device::Cpu)?
        };
        let var = Var::from_tensor(&init)?;
        self.0.borrow_mut().push((name.to_string(), var.clone()));
        Ok(Weight::Dense(var.as_tensor().clone()))
    }
    fn check_tensor(&self, _: &str, _: &[usize]) -> medphi::Result<()> {
        Ok(())
    }
    fn stored_tensors(&self) -> Vec<StoredTensor> {
        Vec::new()
    }
}

/// Hands out f32 `Var`s holding the values of another store's.
struct F32Copies {
    of: Vec<(String, Var)>,
    made: RefCell<Vec<(String, Var)>>,
}

impl TensorSource for F32Copies {
    fn tensor(&self, name: &str, _: &[usize]) -> medphi::Result<Weight> {
        let (_, of) = self.of.iter().find(|(n, _)| n == name).expect(name);
        let var = Var::from_tensor(&of.as_tensor().to_dtype(DType::F32)?)?;
        self.made.borrow_mut().push((name.to_string(), var.clone()));
        Ok(Weight::Dense(var.as_tensor().clone()))
    }
    fn check_tensor(&self, _: &str, _: &[usize]) -> medphi::Result<()> {
        Ok(())
    }
    fn stored_tensors(&self) -> Vec<StoredTensor> {
        Vec::new()
    }
}

fn tiny_config() -> PhiConfig {
    PhiConfig {
        vocab_size: 11,
        hidden_size: 8,
        intermediate_size: 12,
        num_hidden_layers: 2,
        num_attention_heads: 2,
        num_key_value_heads: 2,
        max_position_embeddings: 16,
        layer_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        partial_rotary_factor: 0.5,
        hidden_act: Activation::GeluTanh,
        tie_word_embeddings: false,
        bos_token_id: None,
        eos_token_id: None,
    }
}

fn loss(model: &Phi, tokens: &Tensor) -> Tensor {
    let logits = model.forward(tokens, None, Logits::All).unwrap();
    // Next-token cross-entropy over the sequence.
    let (_, seq, _) = logits.dims3().unwrap();
    let logits = logits.narrow(1, 0, seq - 1).unwrap().squeeze(0).unwrap();
    let targets = tokens.narrow(1, 1, seq - 1).unwrap().squeeze(0).unwrap();
    candle_nn::loss::cross_entropy(&logits, &targets).unwrap()
}

#[test]
fn every_weight_gets_a_gradient_that_matches_finite_differences() {
    let vars = Vars(RefCell::new(Vec::new()));
    let cfg = tiny_config();
    let model = Phi::load(&cfg, &vars, false).unwrap();
    let tokens = Tensor::new(&[[1u32, 5, 2, 9, 3, 7]], &Device::Cpu).unwrap();
    let l = loss(&model, &tokens);
    let grads = l.backward().unwrap();
    let vars = vars.0.into_inner();
    assert_eq!(vars.len(), medphi::model::expected_tensors(&cfg).len());
    for (name, var) in &vars {
        let g = grads
            .get(var)
            .unwrap_or_else(|| panic!("{name} received no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(norm > 0.0, "{name} has a zero gradient");
    }
    // Central differences on a few entries of a few tensors (the model is f64 here).
    let eps = 1e-5;
    for (name, var) in vars.iter().filter(|(n, _)| {
        n.contains("q_proj.weight")
            || n.contains("fc2.bias")
            || n.contains("input_layernorm.weight")
            || n == "lm_head.weight"
    }) {
        let analytic = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let original = var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for idx in [0, original.len() / 2, original.len() - 1] {
            let eval = |delta: f64| {
                let mut v = original.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                loss(&model, &tokens).to_scalar::<f64>().unwrap()
            };
            let numeric = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(original.clone(), var.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let a = analytic[idx];
            assert!(
                (a - numeric).abs() < 1e-6 + 1e-4 * numeric.abs(),
                "{name}[{idx}]: analytic {a} vs numeric {numeric}"
            );
        }
    }
}

#[test]
fn f32_kernels_give_the_composed_f64_gradients() {
    let cfg = PhiConfig {
        hidden_size: 16,
        num_attention_heads: 2,
        num_key_value_heads: 2,
        ..tiny_config()
    };
    let vars = Vars(RefCell::new(Vec::new()));
    let model = Phi::load(&cfg, &vars, false).unwrap();
    let tokens = Tensor::new(&[[1u32, 5, 2, 9, 3, 7, 7, 0, 4, 10]], &Device::Cpu).unwrap();
    let g64 = loss(&model, &tokens).backward().unwrap();
    let copies = F32Copies {
        of: vars.0.into_inner(),
        made: RefCell::new(Vec::new()),
    };
    let model = Phi::load(&cfg, &copies, false).unwrap();
    let g32 = loss(&model, &tokens).backward().unwrap();
    for ((name, v64), (_, v32)) in copies.of.iter().zip(copies.made.borrow().iter()) {
        let values = |g: &Tensor| -> Vec<f64> {
            let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
            g.to_vec1().unwrap()
        };
        let (a, b) = (values(g64.get(v64).unwrap()), values(g32.get(v32).unwrap()));
        let scale = a.iter().fold(0f64, |m, x| m.max(x.abs()));
        let worst = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            worst <= 1e-4 * scale.max(1e-3),
            "{name}: differs by {worst} (largest {scale})"
        );
    }
}
