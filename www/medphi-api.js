// The page's JavaScript API, `window.medphi`: a promise per request to the model worker.
// The page's own UI uses it, its tests use it, and educators can use it from the console:
//
//   await medphi.load({ url: 'models/tiny-medphi/', backend: 'webgpu' })   // -> {backend, ...}
//   await medphi.generate({ prompt: 'Instruct: What is macrocephaly?\nOutput:', maxNewTokens: 32 })
//     // -> {inputIds, outputIds, text, stopReason, prefillTokS, decodeTokS, reusedTokens}
//     //    (what `medphi generate --json` prints, in camelCase, straight from the wasm Model)
//   const qs = await medphi.parseBenchmark('medqa_4options', text, 'medqa_test.jsonl')
//     // -> [{context, choices, gold, mutualInfo, doc, docId}]
//   const r = await medphi.score(qs[0])
//     // -> {loglikelihoods, pred, acc, ..., sample}: `sample` is the question's line of
//     //    lm-eval's samples_<task>.jsonl, as `medphi eval` writes it
//   await medphi.report({ task: 'medqa_4options', samples: [r.sample], original: qs.length,
//                         config: { model: 'medphi' }, seconds: 1 })
//     // -> lm-eval's results object (`medphi eval`'s results.json, from the same Rust code):
//     //    {results: {[task]: {'acc,none', 'acc_stderr,none', ...}}, 'n-samples', 'n-shot',
//     //     higher_is_better, config, total_evaluation_time_seconds, medphi_version,
//     //     samples: {[task]: [lines]}}
//   await medphi.load({ url: 'models/tiny-medphi/', backend: 'webgpu', gpuKernels: 'gpu' })
//     // -> {..., kernels: 'gpu'}: the WebGPU kernel family, 'auto' (the default: 'emulator'
//     //    on CPU-type adapters such as SwiftShader, 'gpu' on hardware GPUs), 'gpu' or 'emulator'
//   await medphi.load({ url: 'https://huggingface.co/microsoft/phi-2/resolve/main/', quantize: 'q4_0',
//                       adapterUrl: 'https://huggingface.co/<org>/<lora>/resolve/main/' })
//     // -> {..., quantize: 'q4_0', adaptedMatrices, wasmMemoryBytes}: f32/f16/bf16 weight
//     //    matrices converted to GGUF blocks as they load, a PEFT LoRA adapter merged first
//     //    (every load's info has `threads`: the CPU threads the wasm's matrix products use,
//     //    more than 1 when the page is cross-origin isolated; `threadsNote` says why not)
//   const { losses, adapterFiles } = await medphi.finetune({ data: [{ prompt, response }, ...],
//                                                            loraRank: 8, steps: 100, onProgress })
//     // -> LoRA SFT of the model in use by the CLI's trainer; the adapter stays applied
//     //    (`medphi.useBase()` / `medphi.useAdapter()` switch) and adapterFiles are PEFT's
//   await medphi.cachedModels()     // -> [{url, bytes, files: [{name, bytes}]}]: downloads kept offline
//   await medphi.deleteCachedModel(url)
//   await medphi.benchmark({ promptLen: 128, gen: 32 })
//     // -> {prefillTokS, decodeTokS, bytesPerToken, effectiveGbS, backend, device, kernels, adapter, threads}:
//     //    what `medphi bench` measures (prefill of a promptLen-token clinical prompt, then gen
//     //    greedy tokens), with the bytes a decode token reads from memory and the bandwidth
//     //    that makes, labelled with the model in use and the wasm's CPU threads
//
// Requests run one at a time in the order they were made (see worker.js). A `load` made
// while another is still under way supersedes it: the earlier one rejects with a
// SupersededError. `generate`, `score`, `benchmark`, `finetune`, `applyAdapter`, `useBase`, `useAdapter`, `reset` and `loseGpuDevice` run on the
// model of the last `load` made before them, once it has loaded, and reject (SupersededError,
// LoadFailedError) rather than run on another model if that load does not finish. A failed
// load leaves the previous model in use. `probe`, `parseBenchmark`, `report`, `cachedModels`,
// `deleteCachedModel` and `clearCache` need no model and answer at once. `load`, `generate`, `score` and `benchmark` take an AbortSignal
// (`signal`): aborting rejects the promise with an AbortError at once and drops the request,
// or ends it if it is running. `info` and `source` always describe the model in use (null
// while none is); a "model" event says when it changes.

export class MedphiApi extends EventTarget {
  constructor() {
    super();
    this.worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    this.pending = new Map();
    this.nextId = 1;
    /** The model in use: what its `load` resolved with, or null while none is loaded. */
    this.info = null;
    /** Where the model in use came from: {url} or {files}, with `adapter` ({url} or {files}) if it had one. */
    this.source = null;
    /** The other model kept loaded to switch to: 'base' (`useBase`), 'adapter' (`useAdapter`) or null. */
    this.kept = null;
    this.failed = null;
    this.worker.onmessage = ({ data }) => this.receive(data);
    this.worker.onerror = (e) => {
      // A worker that failed to start never answers: fail what is pending and what comes.
      this.failed = new Error(`the model worker failed: ${e.message || 'unknown error'}`);
      for (const p of this.pending.values()) p.reject(this.failed);
      this.pending.clear();
    };
  }

  receive(msg) {
    if (msg.type === 'warning') {
      this.dispatchEvent(new CustomEvent('warning', { detail: msg.message }));
      return;
    }
    if (msg.type === 'model') {
      // The worker changed models (a load finished, a failed load brought the previous
      // one back, or a model was freed to make room): this comes before any answer that
      // depends on it.
      this.info = msg.info;
      this.source = msg.source;
      this.kept = msg.kept;
      this.dispatchEvent(new CustomEvent('model', { detail: { info: msg.info, source: msg.source, kept: msg.kept } }));
      return;
    }
    const p = this.pending.get(msg.id);
    if (!p) return;
    if (msg.type === 'text') p.onText?.(msg.piece);
    else if (msg.type === 'progress') p.onProgress?.(msg);
    else {
      this.pending.delete(msg.id);
      p.cleanup?.();
      if (msg.type === 'result') p.resolve(msg.value);
      else {
        const e = msg.name === 'AbortError' ? new DOMException(msg.message, 'AbortError') : new Error(msg.message);
        if (!(e instanceof DOMException)) e.name = msg.name;
        p.reject(e);
      }
    }
  }

  /**
   * Posts a request; `signal` (an AbortSignal) rejects it with an AbortError and tells
   * the worker to drop it, or to end it if it is running.
   */
  request(type, payload = {}, hooks = {}, signal = undefined) {
    if (this.failed) return Promise.reject(this.failed);
    if (signal?.aborted) return Promise.reject(new DOMException(`the ${type} request was aborted`, 'AbortError'));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      const entry = { resolve, reject, ...hooks };
      if (signal) {
        const onAbort = () => {
          if (!this.pending.has(id)) return;
          this.pending.delete(id);
          this.worker.postMessage({ type: 'abort', target: id });
          reject(new DOMException(`the ${type} request was aborted`, 'AbortError'));
        };
        signal.addEventListener('abort', onAbort, { once: true });
        entry.cleanup = () => signal.removeEventListener('abort', onAbort);
      }
      this.pending.set(id, entry);
      this.worker.postMessage({ id, type, ...payload });
    });
  }

  /** {webgpu: bool, adapter?, reason?}: whether the worker can get a WebGPU adapter. */
  probe() {
    return this.request('probe');
  }

  /**
   * Loads a model from `url` (a folder with config.json, tokenizer.json and
   * model.safetensors, or a .gguf file) or from `files` (File objects) on `backend`
   * ("webgpu", "cpu", or "auto": WebGPU when it can take the model, else the CPU).
   * On WebGPU, `gpuKernels` picks the kernel family: "auto" (the default: "emulator" on
   * CPU-type adapters such as SwiftShader or lavapipe, "gpu" on hardware GPUs), "gpu" (built
   * for hardware GPUs) or "emulator" (for CPU-emulated adapters); any other value rejects
   * with the wasm's InputError. The worker keeps the choice for the reloads it makes itself
   * (the CPU fall-back, bringing back a model freed for a failed load).
   * `quantize` ("q8_0" | "q4_0") converts f32/f16/bf16 weight matrices to those GGUF blocks
   * as they load (any other value rejects with the wasm's InputError, the model in use
   * untouched). `adapterUrl` (a folder holding adapter_config.json and
   * adapter_model.safetensors, fetched and cached like a model folder) or `adapterFiles`
   * (those two File objects; they win over `adapterUrl`, as `files` win over `url`) is a
   * PEFT LoRA adapter merged into the weights before any conversion. The worker's own
   * reloads keep the quantization and adapter too.
   * Resolves to the model's info: {backend, device, gpu, kernels ("gpu" | "emulator" on
   * WebGPU, null on the CPU), parameters, quantize (null without one), adaptedMatrices (0
   * without an adapter), wasmMemoryBytes (the wasm memory's size after the load), ...}. Rejects with a
   * SupersededError if another load is made before this one finishes, and with an
   * AbortError when `signal` aborts (a download under way and the reading of the weights
   * stop). (`freeFirst`, for tests: free the model in use before building this one, as is
   * done for models too big to hold two of.)
   * Weights (safetensors shards or a GGUF file) stream in: Model.load reads the header,
   * then a tensor at a time, by byte ranges (HTTP Range requests, kept in Cache Storage in
   * parts, for other origins; Blob.slice for picked files), so their size is limited by the
   * backend, not by WebAssembly memory.
   * `onProgress` hears downloads, {file, loaded, total, cached, bytesPerSecond} (bytes of
   * the file at hand, its size, whether they came from the offline cache, the download's
   * speed), and the weights' reading, {tensor, index, total} (the tensor being read and
   * converted, its 0-based place, how many there are).
   */
  load({ url, files, adapterUrl, adapterFiles, backend = 'webgpu', quantize, context, gpuKernels, onProgress, signal, freeFirst } = {}) {
    const source = files ? { files: [...files] } : { url };
    if (adapterFiles) source.adapter = { files: [...adapterFiles] };
    else if (adapterUrl) source.adapter = { url: adapterUrl };
    return this.request('load', { source, backend, context, gpuKernels, quantize, freeFirst: Boolean(freeFirst) }, { onProgress }, signal);
  }

  /**
   * Generates from `prompt` (with `format` "raw" | "instruct" | "chat", earlier `history`
   * turns [{user, assistant}], and `maxNewTokens`, `temperature`, `topP`, `topK`,
   * `repetitionPenalty`, `seed`, `stop`). `onText(piece)` receives text as it streams;
   * `signal` aborts it (an AbortError; `stop()` instead ends it with what it has).
   * Resolves to the wasm Model's result as it is: {inputIds, outputIds, text, stopReason,
   * prefillTokS, decodeTokS, reusedTokens} (ids: the prompt's and the generated ones, EOS
   * excluded; stopReason "eos" | "max_tokens" | "stop_string" | "context_full" |
   * "cancelled"; reusedTokens: prompt tokens already in the KV cache).
   */
  generate({ onText, signal, ...request } = {}) {
    return this.request('generate', { request }, { onText }, signal);
  }

  /** Ends the running generation before its next token: it resolves with what it has, stopReason "cancelled". */
  stop() {
    this.worker.postMessage({ type: 'stop' });
  }

  /**
   * Scores a question of `parseBenchmark` ({context, choices, gold, mutualInfo?, doc?,
   * docId?}) as lm-eval does. Resolves to {loglikelihoods, isGreedy, pred, predNorm, acc,
   * accNorm, sample}, and for `mutualInfo` questions also {unconditional, predMutualInfo,
   * accMutualInfo}. `sample` is the question's line of lm-eval's samples_<task>.jsonl as
   * `medphi eval` writes it (doc_id, doc, target, arguments, resps, filtered_resps, acc,
   * acc_norm, and acc_mutual_info for continuation tasks); give those lines to `report`.
   * `signal` aborts it.
   */
  score({ signal, ...question } = {}) {
    return this.request('score', { question }, {}, signal);
  }

  /**
   * Measures the model in use as `medphi bench` does: the prefill of a `promptLen`-token
   * clinical prompt, then greedy decoding of `gen` tokens (positive integers; the two must
   * fit the model's context). Resolves to the wasm Model's result, {prefillTokS, decodeTokS,
   * bytesPerToken, effectiveGbS} (bytesPerToken: what a decode token reads from GPU memory;
   * effectiveGbS: bytesPerToken × decodeTokS in GB/s; both null on the CPU backend), plus
   * what it ran on, from the model's info: {backend, device, kernels ("gpu" | "emulator" on
   * WebGPU, else null), adapter (the WebGPU adapter's name, else null)}. A model request
   * like `score`: queued, bound to the last load made before it. It forgets the cached
   * conversation. `signal` aborts it (the numbers being measured are dropped).
   */
  benchmark({ promptLen = 128, gen = 32, signal } = {}) {
    return this.request('benchmark', { promptLen, gen }, {}, signal);
  }

  /**
   * Parses a benchmark file's text in its original format (`task`: an lm-eval task name,
   * e.g. "medqa_4options", "medqa_4options_continuation", "pubmedqa", "mmlu_anatomy";
   * `file` names it in errors) into [{context, choices, gold, mutualInfo, doc, docId}]
   * with lm-eval's prompts (doc: the original record; docId: its index in the file).
   */
  parseBenchmark(task, text, file) {
    return this.request('parse', { task, text, file });
  }

  /**
   * lm-eval's results object for a run of `task` (its lm-eval name), built by the Rust code
   * that writes `medphi eval`'s results.json: `samples` are the `sample` lines `score`
   * resolved with, `original` the question count of the file, `config` an object
   * describing the run (e.g. {model, model_args, backend, device, label}), `seconds` its
   * duration. Resolves to {results: {[task]: {alias, 'acc,none', 'acc_stderr,none',
   * 'acc_norm,none', ..., 'acc_mutual_info,none', ...}}, 'n-samples': {[task]: {original,
   * effective}}, 'n-shot', higher_is_better, config, total_evaluation_time_seconds,
   * medphi_version, samples: {[task]: [lines]}}. A standard error is "N/A" for one sample.
   * Needs no model.
   */
  report({ task, samples, original, config = {}, seconds = 0 } = {}) {
    return this.request('report', { task, samples, original: original ?? samples?.length ?? 0, config, seconds });
  }

  /**
   * Fine-tunes the base model in use with LoRA on `data` ([{prompt, response}]: the loss is
   * on the responses), with the trainer `medphi train --stage sft --lora-rank …` runs, so
   * the same data, seed and settings give the same adapter: `loraRank` (8), `loraAlpha`
   * (16), `steps` (100), `batchSize` (8), `lr` (1e-3, warmup over the first 5% then cosine
   * to a tenth), `seed` (0), `seqLen` (128: longer examples are cut). The base weights are
   * read in f32 on the CPU (whatever backend the model runs on). `onProgress` hears every
   * step: {step, steps, loss, lr, tokensPerS, gradNorm, elapsedMs}, then the adapted
   * model's build as a load's ({tensor, index, total}). `stop()` ends it after
   * the step under way, keeping what it learnt; `signal` aborts it (nothing applied).
   * Resolves to {losses, adapterFiles: [{name, bytes}] (adapter_config.json and
   * adapter_model.safetensors, as PEFT saves them), stopped, steps, info}, and leaves the
   * adapter applied: the next `generate` or `score` uses it; `useBase()` switches back.
   */
  finetune({ onProgress, signal, ...options } = {}) {
    return this.request('finetune', { options }, { onProgress }, signal);
  }

  /**
   * Applies a PEFT LoRA adapter (`files`: adapter_config.json and adapter_model.safetensors,
   * as File objects or {name, bytes}) to the base model in use, which stays loaded beside
   * it. Resolves to the adapted model's info.
   */
  applyAdapter(files) {
    return this.request('applyAdapter', { files: [...files] });
  }

  /** Switches to the base model, without reloading it (the adapted model is kept for `useAdapter`). */
  useBase() {
    return this.request('useBase');
  }

  /** Switches back to the adapted model after `useBase`. */
  useAdapter() {
    return this.request('useAdapter');
  }

  /**
   * The [{prompt, response}] rows of a training file's `text` for `finetune`: CSV with a
   * header row when `file` ends in .csv, else JSON lines; a malformed row rejects with an
   * error naming its line (`medphi train --data` reads files the same way). Needs no model.
   */
  parseTrainingRows(text, file) {
    return this.request('parseRows', { text, file });
  }

  /** Forgets the cached conversation. */
  reset() {
    return this.request('reset');
  }

  /** Destroys the WebGPU device as a driver reset would (to try the CPU fall-back). */
  loseGpuDevice() {
    return this.request('loseGpuDevice');
  }

  /**
   * The downloaded models kept in Cache Storage for offline use: [{url, bytes, files: [{name,
   * bytes}]}], one per folder (a .gguf file by itself), with the sizes they were stored with.
   * Files from the page's own origin (the bundled model) are never kept there.
   */
  cachedModels() {
    return this.request('cachedModels');
  }

  /** Deletes one model of `cachedModels` (by its `url`) from Cache Storage; resolves to the files removed. */
  deleteCachedModel(url) {
    return this.request('deleteCachedModel', { url });
  }

  /** Deletes downloaded models from Cache Storage. */
  clearCache() {
    return this.request('clearCache');
  }
}
