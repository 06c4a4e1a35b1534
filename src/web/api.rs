//! The `Model` class and `parseBenchmark` function that the wasm package exports.

use std::cell::RefCell;
use std::rc::Rc;

use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;
use web_time::Instant;

use super::files::{open_adapter, open_checkpoint, Announced};
use super::pacing::Paced;
use super::{from_js, js_error, to_js};
use crate::backend::{Backend, CpuBackend, Want};
use crate::bench::{decode_speed, prompt_ids};
use crate::cancel::Cancel;
use crate::checkpoint::Checkpoint;
use crate::error::Error;
use crate::eval::report::{results_json, TaskSummary};
use crate::eval::{evaluate_item, sample_json, Item, Task};
use crate::generate::{GenerateOptions, PromptFormat, SamplingParams, Session, Turn};
use crate::gpu::{GpuBackend, GpuInfo, KernelChoice, KernelFamily};
use crate::memory_plan::{readable, MemoryPlan, Target};
use crate::model::{expected_tensors, StoredTensor};
use crate::tokenizer::PhiTokenizer;
use crate::weights::{Adapter, Quantization, ReadAhead};

type Shared = Rc<RefCell<Option<Inner>>>;

struct Inner {
    session: Session<Paced<Box<dyn Backend>>>,
    tokenizer: PhiTokenizer,
}

/// A loaded model on one backend. Calls run one at a time: a call made while another is
/// running fails with an `InputError` instead of interleaving with it.
#[wasm_bindgen]
pub struct Model {
    inner: Shared,
    /// Raised by `stop`; the running generation ends at its next token.
    cancel: Cancel,
    info: ModelInfo,
    /// The WebGPU device, when on WebGPU.
    device: Option<wgpu::Device>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ModelInfo {
    /// "webgpu" or "cpu".
    backend: String,
    /// The backend's own description (adapter name for WebGPU).
    device: String,
    gpu: Option<GpuInfo>,
    /// WebGPU: the kernel family in use ("gpu" or "emulator").
    kernels: Option<KernelFamily>,
    format: &'static str,
    weight_bytes: u64,
    parameters: usize,
    layers: usize,
    hidden: usize,
    vocab: usize,
    context: usize,
    load_ms: f64,
    /// The block type weights were converted to on load ("q8_0", "q4_0"), if any.
    quantize: Option<String>,
    /// Weight matrices a LoRA adapter changed (0 without one).
    adapted_matrices: usize,
    /// The WebAssembly memory's size once loaded: what the load cost the tab's heap.
    wasm_memory_bytes: f64,
}

/// What `generate` accepts: the prompt, its format and earlier turns, and sampling options.
#[derive(Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct GenerateRequest {
    prompt: String,
    format: PromptFormat,
    history: Vec<Turn>,
    max_new_tokens: usize,
    stop: Vec<String>,
    #[serde(flatten)]
    sampling: SamplingParams,
}

impl Default for GenerateRequest {
    fn default() -> Self {
        Self {
            prompt: String::new(),
            format: PromptFormat::Raw,
            history: Vec::new(),
            max_new_tokens: GenerateOptions::default().max_new_tokens,
            stop: Vec::new(),
            sampling: SamplingParams::default(),
        }
    }
}

/// One multiple-choice question as the page sees it.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Question {
    context: String,
    choices: Vec<String>,
    gold: usize,
    /// Also score each choice alone and pick by mutual information (continuation tasks).
    #[serde(default)]
    mutual_info: bool,
    /// The record the question came from, and its index in its file (for the lm-eval
    /// sample line).
    #[serde(default)]
    doc: serde_json::Value,
    #[serde(default)]
    doc_id: usize,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Scored {
    loglikelihoods: Vec<f64>,
    is_greedy: Vec<bool>,
    pred: usize,
    pred_norm: usize,
    acc: bool,
    acc_norm: bool,
    /// For `mutualInfo` questions: each choice's log-likelihood alone, the choice the
    /// context raised most, and whether it is the gold one.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    unconditional: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pred_mutual_info: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    acc_mutual_info: Option<bool>,
    /// The question's line of lm-eval's `samples_<task>.jsonl`, as `medphi eval` writes it.
    sample: serde_json::Value,
}

fn busy() -> JsValue {
    js_error(Error::input(
        "the model is busy with another request; wait for it or stop it first",
    ))
}

/// Runs `f` with the model taken out of its cell, so no borrow is held across an await.
async fn with_inner<T, F>(shared: &Shared, f: impl FnOnce(Inner) -> F) -> Result<T, JsValue>
where
    F: std::future::Future<Output = (Inner, Result<T, JsValue>)>,
{
    let inner = shared.borrow_mut().take().ok_or_else(busy)?;
    let (inner, result) = f(inner).await;
    *shared.borrow_mut() = Some(inner);
    result
}

/// Refuses, from headers alone and before any weight is read, a load that cannot fit in
/// this tab's WebAssembly memory (4 GiB at most), saying what would: the CPU backend holds
/// the converted weights and the KV cache there, and any load holds the tensor it is
/// converting (raw, converted and, for the GPU, its upload copy).
fn refuse_what_cannot_fit(
    ckpt: &Checkpoint,
    backend: &str,
    context: Option<usize>,
) -> Result<(), JsValue> {
    const WASM_MEMORY: u64 = 4 << 30;
    // The module, tokenizer and working buffers.
    const HEADROOM: u64 = 512 << 20;
    let stored = ckpt.weights.stored_tensors();
    let context = context.unwrap_or(usize::MAX);
    let need = |stored: &[StoredTensor]| {
        let (target, copies) = match backend {
            "cpu" => (Target::Cpu, 2),
            _ => (Target::Gpu, 4),
        };
        let plan = MemoryPlan::new(stored, &ckpt.config, context, target);
        let held = if target == Target::Cpu {
            plan.total()
        } else {
            0
        };
        (held + copies * plan.largest_stored + HEADROOM, plan)
    };
    let (bytes, plan) = need(&stored);
    if bytes <= WASM_MEMORY {
        return Ok(());
    }
    let q4: Vec<StoredTensor> = stored
        .iter()
        .cloned()
        .map(|t| Quantization::Q4_0.stored(t))
        .collect();
    let (q4_bytes, _) = need(&q4);
    let advice = if q4_bytes <= WASM_MEMORY && q4_bytes < bytes {
        format!("with quantize: 'q4_0' it needs {}", readable(q4_bytes))
    } else if backend == "cpu" {
        "use the webgpu backend, a smaller model or a shorter context".to_string()
    } else {
        "use a smaller model".to_string()
    };
    Err(js_error(Error::input(format!(
        "this model needs about {} of WebAssembly memory on the {backend} backend (weights {}, KV cache {}, largest tensor {}), more than the {} a browser tab can give; {advice}",
        readable(bytes),
        readable(plan.weights),
        readable(plan.kv_cache),
        readable(plan.largest_stored),
        readable(WASM_MEMORY),
    ))))
}

/// The size of this module's linear memory (shared or not: the threaded build's is a
/// SharedArrayBuffer, which `ArrayBuffer`'s accessors refuse).
fn wasm_memory_bytes() -> f64 {
    (std::arch::wasm32::memory_size::<0>() * 65536) as f64
}

#[wasm_bindgen]
impl Model {
    /// Loads a model from `files` onto `backend` ("webgpu" or "cpu"), with the KV cache
    /// capped at `context` tokens if given and, on WebGPU, the kernel family `gpu_kernels`
    /// ("auto", the default, "gpu" or "emulator"). Each file is `{name, bytes: Uint8Array}`
    /// or, to stream safetensors weights through the load a tensor at a time,
    /// `{name, size, read(start, end) → Promise<Uint8Array>}`. `quantize` ("q8_0" or
    /// "q4_0") converts f32/f16/bf16 weight matrices to those blocks as they load; `adapter`
    /// (the files of a PEFT LoRA adapter, as `files`) is merged into the weights first;
    /// `on_tensor(name, index, total)` hears each tensor as its reading starts.
    pub async fn load(
        files: js_sys::Array,
        backend: String,
        context: Option<u32>,
        gpu_kernels: Option<String>,
        quantize: Option<String>,
        adapter: Option<js_sys::Array>,
        on_tensor: Option<js_sys::Function>,
    ) -> Result<Model, JsValue> {
        let t0 = Instant::now();
        let kernels: KernelChoice = gpu_kernels
            .as_deref()
            .unwrap_or("auto")
            .parse()
            .map_err(js_error)?;
        let quantization: Option<Quantization> = quantize
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(js_error)?;
        let ckpt = open_checkpoint(files).await?;
        let adapter = match adapter {
            Some(files) => Some(open_adapter(files, &ckpt.config).await?),
            None => None,
        };
        let adapted_matrices = adapter.as_ref().map_or(0, Adapter::adapted);
        let mut ckpt = ckpt.convert_on_load(adapter, quantization);
        if let Some(f) = on_tensor {
            let total = expected_tensors(&ckpt.config).len();
            ckpt.weights = Box::new(Announced::new(ckpt.weights, f, total));
        }
        let context = context.map(|c| c as usize);
        refuse_what_cannot_fit(&ckpt, &backend, context)?;
        let (format, weight_bytes) = (ckpt.format, ckpt.weight_bytes);
        let parameters = ckpt.config.parameter_count();
        let mut device = None;
        let mut family = None;
        let (runner, tokenizer, gpu): (Box<dyn Backend>, PhiTokenizer, Option<GpuInfo>) =
            match backend.as_str() {
                "webgpu" => {
                    let gpu =
                        GpuBackend::load(&ckpt.config, ckpt.weights.as_ref(), context, kernels)
                            .await
                            .map_err(js_error)?;
                    let info = gpu.info().clone();
                    device = Some(gpu.device());
                    family = Some(gpu.kernel_family());
                    (Box::new(gpu), ckpt.tokenizer, Some(info))
                }
                "cpu" => {
                    // The CPU model reads synchronously: its tensors are fetched and
                    // converted ahead, one at a time.
                    let read = ReadAhead::read(ckpt.weights.as_ref(), &ckpt.config, &mut |_| {})
                        .await
                        .map_err(js_error)?;
                    ckpt.weights = Box::new(read);
                    let (model, tokenizer) = ckpt.into_model(true).map_err(js_error)?;
                    let cpu = CpuBackend::new(model, context).map_err(js_error)?;
                    (Box::new(cpu), tokenizer, None)
                }
                other => {
                    return Err(js_error(Error::input(format!(
                        "unknown backend {other:?} (expected \"webgpu\" or \"cpu\")"
                    ))))
                }
            };
        let cfg = runner.config();
        let info = ModelInfo {
            backend,
            device: runner.name(),
            gpu,
            kernels: family,
            format,
            weight_bytes,
            parameters,
            layers: cfg.num_hidden_layers,
            hidden: cfg.hidden_size,
            vocab: cfg.vocab_size,
            context: runner.capacity(),
            load_ms: t0.elapsed().as_secs_f64() * 1e3,
            quantize,
            adapted_matrices,
            wasm_memory_bytes: wasm_memory_bytes(),
        };
        let session = Session::new(Paced::new(runner));
        let cancel = session.cancel_handle();
        let inner = Inner { session, tokenizer };
        Ok(Model {
            inner: Rc::new(RefCell::new(Some(inner))),
            cancel,
            info,
            device,
        })
    }

    /// Destroys the WebGPU device, as a driver reset or a GPU-process crash would: the
    /// next request fails with a `GpuError`. For testing the page's fall-back to the CPU.
    #[wasm_bindgen(js_name = loseGpuDevice)]
    pub fn lose_gpu_device(&self) {
        if let Some(d) = &self.device {
            d.destroy();
        }
    }

    /// `{backend, device, gpu, format, weightBytes, parameters, layers, hidden, vocab,
    /// context, loadMs}`.
    pub fn info(&self) -> Result<JsValue, JsValue> {
        to_js(&self.info)
    }

    /// Token ids of `text` (no special tokens added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, JsValue> {
        let inner = self.inner.borrow();
        let inner = inner.as_ref().ok_or_else(busy)?;
        inner.tokenizer.encode(text).map_err(js_error)
    }

    /// Ends the running generation before its next token (or prefill chunk); it resolves
    /// with what it has and `stop_reason: "cancelled"`. Does nothing when none is running.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Forgets the cached conversation.
    pub fn reset(&self) -> Result<(), JsValue> {
        let mut inner = self.inner.borrow_mut();
        inner.as_mut().ok_or_else(busy)?.session.reset();
        Ok(())
    }

    /// Generates a reply to `request` (`{prompt, format: "raw"|"instruct"|"chat", history:
    /// [{user, assistant}], maxNewTokens, temperature, topP, topK, repetitionPenalty, seed,
    /// stop}`), calling `on_text(piece)` as text arrives; `on_text` returns `false` to stop.
    /// Resolves to `{inputIds, outputIds, text, stopReason, prefillTokS, decodeTokS,
    /// reusedTokens}`: what `medphi generate --json` prints, in JavaScript's camelCase.
    pub fn generate(&self, request: JsValue, on_text: js_sys::Function) -> js_sys::Promise {
        let shared = Rc::clone(&self.inner);
        // A stop meant for an earlier generation must not end this one; lowered here, before
        // the promise exists, so a `stop()` made right after this call is never lost.
        self.cancel.reset();
        future_to_promise(async move {
            let req: GenerateRequest = from_js(request, "generate request")?;
            with_inner(&shared, |mut inner| async move {
                let result = generate(&mut inner, req, &on_text).await;
                (inner, result)
            })
            .await
        })
    }

    /// Times the prefill of a `promptLen`-token prompt and greedy decoding of `gen` tokens,
    /// as `medphi bench` does. Resolves to `{prefillTokS, decodeTokS, bytesPerToken,
    /// effectiveGbS}` (the last two: what a decode token reads from GPU memory, or memory on
    /// the CPU, and the bandwidth that makes). Forgets the cached conversation.
    pub fn benchmark(&self, prompt_len: u32, gen: u32) -> js_sys::Promise {
        let shared = Rc::clone(&self.inner);
        future_to_promise(async move {
            with_inner(&shared, |mut inner| async move {
                let Inner { session, tokenizer } = &mut inner;
                let vocab_limit = tokenizer
                    .vocab_limit()
                    .min(session.backend().config().vocab_size);
                let result = async {
                    let ids = prompt_ids(tokenizer, prompt_len as usize)?;
                    let want = Want::Greedy { vocab_limit };
                    decode_speed(session.backend_mut(), &ids, gen as usize, want).await
                }
                .await
                .map_err(js_error)
                .and_then(|speed| to_js(&speed));
                (inner, result)
            })
            .await
        })
    }

    /// Scores a multiple-choice question `{context, choices, gold}` as lm-eval does.
    /// Resolves to `{loglikelihoods, isGreedy, pred, predNorm, acc, accNorm, sample}`, and for
    /// `mutualInfo` questions also `{unconditional, predMutualInfo, accMutualInfo}`; `sample`
    /// is the question's lm-eval sample line (see `evalReport`).
    pub fn score(&self, question: JsValue) -> js_sys::Promise {
        let shared = Rc::clone(&self.inner);
        future_to_promise(async move {
            let q: Question = from_js(question, "question")?;
            if q.choices.len() < 2 || q.gold >= q.choices.len() {
                return Err(js_error(Error::input(format!(
                    "a question needs at least two choices and a gold index below their count (got {} choices, gold {})",
                    q.choices.len(),
                    q.gold
                ))));
            }
            let doc_id = q.doc_id;
            let item = Item {
                doc: q.doc,
                context: q.context,
                choices: q.choices,
                gold: q.gold,
                mutual_info: q.mutual_info,
            };
            with_inner(&shared, |mut inner| async move {
                let Inner { session, tokenizer } = &mut inner;
                let result = evaluate_item(session.backend_mut(), tokenizer, doc_id, &item, true)
                    .await
                    .map_err(js_error)
                    .and_then(|s| {
                        to_js(&Scored {
                            loglikelihoods: s.scores.iter().map(|c| c.loglikelihood).collect(),
                            is_greedy: s.scores.iter().map(|c| c.is_greedy).collect(),
                            pred: s.pred,
                            pred_norm: s.pred_norm,
                            acc: s.acc,
                            acc_norm: s.acc_norm,
                            unconditional: s
                                .unconditional
                                .iter()
                                .map(|c| c.loglikelihood)
                                .collect(),
                            pred_mutual_info: s.pred_mutual_info,
                            acc_mutual_info: s.acc_mutual_info,
                            sample: sample_json(&item, &s),
                        })
                    });
                (inner, result)
            })
            .await
        })
    }
}

async fn generate(
    inner: &mut Inner,
    req: GenerateRequest,
    on_text: &js_sys::Function,
) -> Result<JsValue, JsValue> {
    let prompt = req.format.render(&req.history, &req.prompt);
    let ids = inner.tokenizer.encode(&prompt).map_err(js_error)?;
    let mut stop = req.format.stop_strings();
    stop.extend(req.stop);
    let opts = GenerateOptions {
        max_new_tokens: req.max_new_tokens,
        sampling: req.sampling,
        stop,
    };
    let mut callback_error = None;
    let g = inner
        .session
        .generate(&inner.tokenizer, &ids, &opts, &mut |piece| match on_text
            .call1(&JsValue::NULL, &JsValue::from_str(piece))
        {
            Ok(keep_going) => keep_going.as_bool() != Some(false),
            Err(e) => {
                callback_error = Some(e);
                false
            }
        })
        .await
        .map_err(js_error)?;
    match callback_error {
        Some(e) => Err(e),
        None => to_js(&g),
    }
}

/// Parses a benchmark file in its original format (`task`: an lm-eval task name such as
/// `medqa_4options`, `pubmedqa`, `medmcqa`, `mmlu_anatomy`) into `[{context, choices,
/// gold}]`, with lm-eval's prompts. `file` names the file in errors.
#[wasm_bindgen(js_name = parseBenchmark)]
pub fn parse_benchmark(task: &str, text: &str, file: &str) -> Result<JsValue, JsValue> {
    let task: Task = task.parse().map_err(js_error)?;
    let items = task.load(text, file).map_err(js_error)?;
    let questions: Vec<Question> = items
        .into_iter()
        .enumerate()
        .map(|(doc_id, i)| Question {
            context: i.context,
            choices: i.choices,
            gold: i.gold,
            mutual_info: i.mutual_info,
            doc: i.doc,
            doc_id,
        })
        .collect();
    to_js(&questions)
}

/// lm-eval's results object for scored questions of `task`, built by the code that writes
/// `medphi eval`'s results.json: `samples` are the `sample` lines `score` returned,
/// `original` the question count of the file, `config` the run's description, `seconds` its
/// duration. The samples themselves are included under `samples[task]`, as lm-eval's
/// in-memory results carry them.
#[wasm_bindgen(js_name = evalReport)]
pub fn eval_report(
    task: &str,
    samples: JsValue,
    original: usize,
    config: JsValue,
    seconds: f64,
) -> Result<JsValue, JsValue> {
    let lines: Vec<serde_json::Value> = from_js(samples, "samples")?;
    let config: serde_json::Value = from_js(config, "config")?;
    let summary = TaskSummary {
        name: task,
        original,
        lines: &lines,
    };
    let mut report = results_json(&[summary], config, seconds);
    report["samples"] = serde_json::json!({ task: lines });
    to_js(&report)
}
