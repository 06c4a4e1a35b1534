//! `FineTune`: LoRA SFT in the browser with the CLI's trainer (`train::Trainer`): the base
//! model's files and prompt/response rows come in as values, step metrics go out after each
//! step (the worker calls `step` in a loop, yielding between steps so Stop is heard), and
//! the adapter comes out as the PEFT files `medphi --adapter` and `peft` load.

use candle_core::Device;
use serde::{Deserialize, Serialize};
use wasm_bindgen::prelude::*;

use super::files::open_checkpoint;
use super::{from_js, js_error, to_js};
use crate::error::Error;
use crate::memory_plan::readable;
use crate::model::PhiConfig;
use crate::train::{
    defaults, rows_from_text, rows_from_values, Examples, LoraConfig, Objective, Params, Precision,
    Stage, TrainConfig, Trainer,
};
use crate::weights::ReadAhead;

/// What `FineTune.start` accepts; what is left out takes the CLI's default.
#[derive(Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
struct FineTuneRequest {
    data: Vec<serde_json::Value>,
    lora_rank: usize,
    lora_alpha: f64,
    steps: u64,
    batch_size: usize,
    lr: f64,
    seed: u64,
    seq_len: usize,
}

impl Default for FineTuneRequest {
    fn default() -> Self {
        Self {
            data: Vec::new(),
            lora_rank: 8,
            lora_alpha: defaults::LORA_ALPHA,
            steps: 100,
            batch_size: 8,
            lr: defaults::LR,
            seed: 0,
            seq_len: defaults::SEQ_LEN,
        }
    }
}

impl FineTuneRequest {
    /// Refuses settings that are not numbers a run can use, naming the setting.
    fn check(&self) -> Result<(), Error> {
        let bad = |what: &str, why: &str| Err(Error::input(format!("finetune: {what} {why}")));
        if !(1..=256).contains(&self.lora_rank) {
            return bad("loraRank", "must be from 1 to 256");
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            return bad("loraAlpha", "must be a positive number");
        }
        if !(1..=100_000).contains(&self.steps) {
            return bad("steps", "must be from 1 to 100000");
        }
        if !(1..=256).contains(&self.batch_size) {
            return bad("batchSize", "must be from 1 to 256");
        }
        if !(self.lr.is_finite() && self.lr > 0.0 && self.lr < 1.0) {
            return bad("lr", "must be a number between 0 and 1");
        }
        if !(2..=4096).contains(&self.seq_len) {
            return bad("seqLen", "must be from 2 to 4096");
        }
        Ok(())
    }
}

/// One step as the page sees it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Step {
    step: u64,
    steps: u64,
    loss: f64,
    lr: f64,
    tokens_per_s: f64,
    grad_norm: f64,
}

/// The bytes training holds beyond the base weights, roughly: the merged copy of every
/// adapted weight and its gradient, and per token of a batch the activations the backward
/// pass keeps (about 24 hidden-sized rows a layer) and three vocabulary-sized rows.
fn training_bytes(cfg: &PhiConfig, batch: usize, seq_len: usize) -> u64 {
    let weights = 4 * cfg.parameter_count() as u64;
    let per_token = 4 * (24 * cfg.hidden_size * cfg.num_hidden_layers + 3 * cfg.vocab_size);
    3 * weights + (batch * seq_len * per_token) as u64
}

/// A prompt/response row as the page sees it.
#[derive(Serialize)]
struct Pair<'a> {
    prompt: &'a str,
    response: &'a str,
}

/// The `[{prompt, response}]` rows of an uploaded training file: CSV with a header row when
/// `file` ends in `.csv`, else JSON lines; a malformed row is an error naming its line.
#[wasm_bindgen(js_name = parseTrainingRows)]
pub fn parse_training_rows(text: &str, file: &str) -> Result<JsValue, JsValue> {
    let rows = rows_from_text(text, file).map_err(js_error)?;
    let pairs = rows
        .iter()
        .map(|r| {
            Ok(Pair {
                prompt: r.text("prompt")?,
                response: r.text("response")?,
            })
        })
        .collect::<Result<Vec<_>, Error>>()
        .map_err(js_error)?;
    if pairs.is_empty() {
        return Err(js_error(Error::file(file, "holds no rows")));
    }
    to_js(&pairs)
}

/// A LoRA fine-tune of one base model, run a step at a time.
#[wasm_bindgen]
pub struct FineTune {
    trainer: Trainer,
}

#[wasm_bindgen]
impl FineTune {
    /// Reads the base model from `files` (as `Model.load` takes them), tokenizes
    /// `options.data` (`[{prompt, response}]`, a malformed row named by its number) and sets
    /// up LoRA adapters of `options.loraRank` on every linear layer, the base frozen.
    pub async fn start(files: js_sys::Array, options: JsValue) -> Result<FineTune, JsValue> {
        let req: FineTuneRequest = from_js(options, "finetune options")?;
        req.check().map_err(js_error)?;
        let ckpt = open_checkpoint(files).await?;
        const BUDGET: u64 = 3 << 30;
        let need = training_bytes(&ckpt.config, req.batch_size, req.seq_len);
        if need > BUDGET {
            return Err(js_error(Error::input(format!(
                "fine-tuning this model needs about {} of WebAssembly memory (f32 weights, their \
                 adapted copy and its gradient, and activations for {} × {} tokens), more than \
                 the {} a tab can spare; use a smaller model, batchSize or seqLen",
                readable(need),
                req.batch_size,
                req.seq_len,
                readable(BUDGET)
            ))));
        }
        let rows = rows_from_values(req.data, "data").map_err(js_error)?;
        let eos = ckpt
            .tokenizer
            .eos_token_id()
            .or(ckpt.config.eos_token_id)
            .ok_or_else(|| js_error(Error::input("the tokenizer has no end-of-text token")))?;
        let examples =
            Examples::sft(&ckpt.tokenizer, &rows, "data", req.seq_len, eos).map_err(js_error)?;
        let base = ReadAhead::read(ckpt.weights.as_ref(), &ckpt.config, &mut |_| {})
            .await
            .map_err(js_error)?;
        let lora = LoraConfig {
            rank: req.lora_rank,
            alpha: req.lora_alpha,
        };
        let params = Params::lora(&ckpt.config, &base, lora, req.seed, None, &Device::Cpu)
            .map_err(js_error)?;
        drop(base);
        let config = TrainConfig {
            stage: Stage::Sft,
            steps: req.steps,
            batch_size: req.batch_size,
            grad_accum: 1,
            seq_len: req.seq_len,
            lr: req.lr,
            warmup: defaults::warmup(req.steps),
            weight_decay: defaults::WEIGHT_DECAY,
            clip: defaults::CLIP,
            seed: req.seed,
            eval_every: 0,
            eval_batches: 1,
            save_every: 0,
            beta: 0.0,
            init_from: None,
            lora: Some(lora),
            merge: false,
            precision: Precision::F32,
            group_by_length: false,
        };
        let trainer =
            Trainer::new(ckpt.config, params, Objective::Lm(examples), config).map_err(js_error)?;
        Ok(FineTune { trainer })
    }

    /// Runs the next step: `{step, steps, loss, lr, tokensPerS, gradNorm}`. A step past the
    /// planned count, or one whose loss is not finite, is an error and changes nothing.
    pub fn step(&mut self) -> Result<JsValue, JsValue> {
        let steps = self.trainer.config.steps;
        if self.trainer.step >= steps {
            return Err(js_error(Error::input(format!(
                "the fine-tune has run all its {steps} steps"
            ))));
        }
        let m = self.trainer.step().map_err(js_error)?;
        to_js(&Step {
            step: m.step,
            steps,
            loss: m.loss,
            lr: m.lr,
            tokens_per_s: m.tokens_per_s,
            grad_norm: m.grad_norm,
        })
    }

    /// Steps run so far.
    #[wasm_bindgen(getter, js_name = stepsDone)]
    pub fn steps_done(&self) -> f64 {
        self.trainer.step as f64
    }

    /// The adapter trained so far: `[{name, bytes}]`, `adapter_config.json` and
    /// `adapter_model.safetensors`, as PEFT saves them.
    #[wasm_bindgen(js_name = adapterFiles)]
    pub fn adapter_files(&self) -> Result<js_sys::Array, JsValue> {
        let files = js_sys::Array::new();
        for (name, bytes) in self.trainer.adapter_files().map_err(js_error)? {
            let file = js_sys::Object::new();
            js_sys::Reflect::set(&file, &"name".into(), &name.into())?;
            let array = js_sys::Uint8Array::from(bytes.as_slice());
            js_sys::Reflect::set(&file, &"bytes".into(), &array.into())?;
            files.push(&file);
        }
        Ok(files)
    }
}
