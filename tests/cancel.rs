//! Stopping generation: the session's `Cancel` flag is heard before every token, whether or
//! not the token completed any text, and between the chunks of a long prompt's prefill.
#![cfg(not(target_arch = "wasm32"))] // native only; the browser suite is tests/web.rs

mod common;

use common::{fixtures, reference};
use medphi::backend::{Backend, BoxFuture, CpuBackend, Next, Want};
use medphi::cancel::Cancel;
use medphi::generate::{GenerateOptions, Session, StopReason};
use medphi::model::PhiConfig;

/// A backend that raises `cancel` during its `at`-th forward (counting from 1).
struct CancelAt<B> {
    inner: B,
    forwards: usize,
    at: usize,
    cancel: Cancel,
}

impl<B: Backend> CancelAt<B> {
    fn count(&mut self) {
        self.forwards += 1;
        if self.forwards == self.at {
            self.cancel.cancel();
        }
    }
}

impl<B: Backend> Backend for CancelAt<B> {
    fn name(&self) -> String {
        self.inner.name()
    }
    fn config(&self) -> &PhiConfig {
        self.inner.config()
    }
    fn capacity(&self) -> usize {
        self.inner.capacity()
    }
    fn cached(&self) -> usize {
        self.inner.cached()
    }
    fn truncate(&mut self, len: usize) {
        self.inner.truncate(len)
    }
    fn forward<'a>(
        &'a mut self,
        tokens: &'a [u32],
        want: Want,
    ) -> BoxFuture<'a, medphi::Result<Next>> {
        self.count();
        self.inner.forward(tokens, want)
    }
    fn last_row(&mut self) -> BoxFuture<'_, medphi::Result<Vec<f32>>> {
        self.inner.last_row()
    }
}

fn session_cancelled_at(
    model_dir: &std::path::Path,
    at: usize,
) -> (
    Session<CancelAt<CpuBackend>>,
    medphi::tokenizer::PhiTokenizer,
) {
    let ckpt =
        medphi::checkpoint::Checkpoint::open(model_dir, None, candle_core::DType::F32).unwrap();
    let (model, tokenizer) = ckpt.into_model(true).unwrap();
    let cancel = Cancel::new();
    let backend = CancelAt {
        inner: CpuBackend::new(model, None).unwrap(),
        forwards: 0,
        at,
        cancel: cancel.clone(),
    };
    (Session::new(backend).with_cancel(cancel), tokenizer)
}

#[test]
fn cancel_is_heard_before_every_token() {
    let r = reference();
    for at in [2, 3, 7] {
        let (mut session, tokenizer) = session_cancelled_at(&fixtures().join("tiny-phi"), at);
        let opts = GenerateOptions {
            max_new_tokens: 64,
            ..Default::default()
        };
        // The callback never asks to stop: only the flag does.
        let g = run(session.generate(&tokenizer, &r.input_ids, &opts, &mut |_| true));
        assert_eq!(g.stop_reason, StopReason::Cancelled);
        // Forward 1 is the prompt; forward n runs token n − 1, and the flag it raised is
        // heard before token n is taken.
        assert_eq!(
            g.output_ids,
            r.greedy_ids[..at - 1],
            "cancelled in forward {at}"
        );
        // No forward ran after the one that raised the flag.
        assert_eq!(session.backend().forwards, at);
    }
}

#[test]
fn cancel_is_heard_between_prefill_chunks() {
    // The tiny checkpoint with room for a prompt several prefill chunks long.
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "model.safetensors"] {
        std::fs::copy(fixtures().join("tiny-phi").join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["max_position_embeddings"] = 4096.into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let (mut session, tokenizer) = session_cancelled_at(dir.path(), 1);
    let ids: Vec<u32> = reference()
        .input_ids
        .iter()
        .copied()
        .cycle()
        .take(900)
        .collect();
    let g = run(session.generate(&tokenizer, &ids, &GenerateOptions::default(), &mut |_| true));
    assert_eq!(g.stop_reason, StopReason::Cancelled);
    assert!(g.output_ids.is_empty());
    // One 256-token chunk ran; the other three were not started.
    assert_eq!(session.backend().forwards, 1);
    assert_eq!(session.backend().cached(), 256);
}

/// Drives a generation to its end (natively a future completes without waiting).
fn run<T>(f: impl std::future::Future<Output = medphi::Result<T>>) -> T {
    pollster::block_on(f).unwrap()
}
