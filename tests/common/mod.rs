//! Shared helpers for integration tests: fixture paths and the transformers reference.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use medphi::backend::CpuBackend;
use medphi::checkpoint::Checkpoint;
use medphi::generate::Session;
use medphi::model::{Logits, Phi};
use medphi::tokenizer::PhiTokenizer;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// What transformers computed for the fixture checkpoint (scripts/fixtures/make_tiny_phi.py).
pub struct Reference {
    pub input_ids: Vec<u32>,
    pub greedy_ids: Vec<u32>,
    /// `(seq, vocab)` logits at every prompt position.
    pub logits: Tensor,
    /// Every tensor of reference.safetensors, including `logits_q8_0` etc.: transformers'
    /// logits for the weights of each GGUF file as llama.cpp's gguf-py dequantizes them.
    pub tensors: HashMap<String, Tensor>,
    pub json: serde_json::Value,
}

pub fn reference() -> Reference {
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("reference.safetensors"), &Device::Cpu)
            .unwrap();
    let ids = |name: &str| -> Vec<u32> {
        tensors[name]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1::<u32>()
            .unwrap()
    };
    let json = std::fs::read_to_string(fixtures().join("reference.json")).unwrap();
    Reference {
        input_ids: ids("input_ids"),
        greedy_ids: ids("greedy_ids"),
        logits: tensors["logits"].clone(),
        tensors: tensors.clone(),
        json: serde_json::from_str(&json).unwrap(),
    }
}

pub fn open(path: &str) -> Checkpoint {
    Checkpoint::open(&fixtures().join(path), None, DType::F32).unwrap()
}

pub fn session(path: &str) -> (Session<CpuBackend>, PhiTokenizer) {
    let (model, tokenizer) = open(path).into_model(true).unwrap();
    (
        Session::new(CpuBackend::new(model, None).unwrap()),
        tokenizer,
    )
}

/// Largest absolute value in a tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

/// `(seq, vocab)` logits of one sequence at every position, without a cache.
pub fn forward_all(model: &Phi, ids: &[u32]) -> Tensor {
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(&input, None, Logits::All)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

/// The tiny-phi fixture saved with f16 weights in `dir`; returns the model folder.
pub fn f16_copy_of_tiny_phi(dir: &std::path::Path) -> PathBuf {
    let model = dir.join("f16");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(fixtures().join("tiny-phi").join(f), model.join(f)).unwrap();
    }
    let f32_weights =
        candle_core::safetensors::load(fixtures().join("tiny-phi/model.safetensors"), &Device::Cpu)
            .unwrap();
    let f16_weights: HashMap<String, Tensor> = f32_weights
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(&f16_weights, model.join("model.safetensors")).unwrap();
    model
}

/// The `medphi` binary, for a test to add arguments to.
pub fn medphi_cmd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_medphi"))
}

/// Runs `cmd`, asserts it succeeded (showing its stderr if not) and returns its output.
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A local file read through `RangeRead`, as the page reads a download it keeps on disk,
/// recording each read.
pub struct Recorded {
    pub bytes: Vec<u8>,
    pub reads: std::rc::Rc<std::cell::RefCell<Vec<std::ops::Range<u64>>>>,
    /// Give back one byte less than asked from the given read on, as a cut-short read would.
    pub short_from: usize,
}

impl medphi::weights::RangeRead for Recorded {
    fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read(
        &self,
        range: std::ops::Range<u64>,
    ) -> medphi::model::BoxFuture<'_, medphi::Result<Vec<u8>>> {
        self.reads.borrow_mut().push(range.clone());
        let mut out = self.bytes[range.start as usize..range.end as usize].to_vec();
        if self.reads.borrow().len() > self.short_from {
            out.pop();
        }
        Box::pin(std::future::ready(Ok(out)))
    }
}

pub type Reads = std::rc::Rc<std::cell::RefCell<Vec<std::ops::Range<u64>>>>;

/// Logits of every row of `ids`, the model loaded as the page loads a streamed checkpoint
/// (each tensor fetched, then read): on the GPU (emulator kernels) or the CPU model.
pub fn streamed_logits(ckpt: &Checkpoint, ids: &[u32], gpu: bool) -> Vec<f32> {
    use medphi::backend::{Backend, Want};
    use medphi::gpu::{GpuBackend, KernelChoice};
    use pollster::block_on;
    let cfg = &ckpt.config;
    if gpu {
        let src = ckpt.weights.as_ref();
        let mut backend =
            block_on(GpuBackend::load(cfg, src, None, KernelChoice::Emulator)).unwrap();
        block_on(backend.forward(ids, Want::AllRows))
            .unwrap()
            .rows()
            .unwrap()
    } else {
        let read = block_on(medphi::weights::ReadAhead::read(
            ckpt.weights.as_ref(),
            cfg,
            &mut |_| {},
        ))
        .unwrap();
        forward_all(&Phi::load(cfg, &read, true).unwrap(), ids)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }
}
