// The page's JavaScript API, `window.medphi`: a promise per request to the model worker.
// The page's own UI uses it, its tests use it, and educators can use it from the console:
//
//   await medphi.load({ url: 'models/tiny-medphi/', backend: 'webgpu' })   // -> {backend, ...}
//   await medphi.generate({ prompt: 'Instruct: What is macrocephaly?\nOutput:', maxNewTokens: 32 })
//     // -> {inputIds, outputIds, text, stopReason, prefillTokS, decodeTokS}

export class MedphiApi extends EventTarget {
  constructor() {
    super();
    this.worker = new Worker(new URL('./worker.js', import.meta.url), { type: 'module' });
    this.pending = new Map();
    this.nextId = 1;
    this.info = null;
    this.source = null;
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
    const p = this.pending.get(msg.id);
    if (msg.type === 'warning') {
      this.dispatchEvent(new CustomEvent('warning', { detail: msg.message }));
      return;
    }
    if (!p) return;
    if (msg.type === 'text') p.onText?.(msg.piece);
    else if (msg.type === 'progress') p.onProgress?.(msg);
    else {
      this.pending.delete(msg.id);
      if (msg.type === 'result') p.resolve(msg.value);
      else {
        const e = new Error(msg.message);
        e.name = msg.name;
        p.reject(e);
      }
    }
  }

  request(type, payload = {}, hooks = {}) {
    if (this.failed) return Promise.reject(this.failed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject, ...hooks });
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
   * ("webgpu" or "cpu"). Resolves to the model's info: {backend, device, parameters, ...}.
   */
  async load({ url, files, backend = 'webgpu', context, onProgress } = {}) {
    const source = files ? { files: [...files] } : { url };
    const info = await this.request('load', { source, backend, context }, { onProgress });
    this.info = info;
    this.source = source;
    return info;
  }

  /**
   * Generates from `prompt` (with `format` "raw" | "instruct" | "chat" and earlier
   * `history` turns [{user, assistant}]). `onText(piece)` receives text as it streams.
   */
  async generate({ onText, ...request } = {}) {
    const g = await this.request('generate', { request }, { onText });
    return {
      inputIds: g.input_ids,
      outputIds: g.output_ids,
      text: g.text,
      stopReason: g.stop_reason,
      prefillTokS: g.prefill_tok_s,
      decodeTokS: g.decode_tok_s,
      reusedTokens: g.reused_tokens,
    };
  }

  /** Ends the running generation after its current token. */
  stop() {
    this.worker.postMessage({ type: 'stop' });
  }

  /** Scores {context, choices, gold} as lm-eval does: {loglikelihoods, pred, acc, ...}. */
  score(question) {
    return this.request('score', { question });
  }

  /** Parses a benchmark file's text in its original format into [{context, choices, gold}]. */
  parseBenchmark(task, text, file) {
    return this.request('parse', { task, text, file });
  }

  /** Forgets the cached conversation. */
  reset() {
    return this.request('reset');
  }

  /** Destroys the WebGPU device as a driver reset would (to try the CPU fall-back). */
  loseGpuDevice() {
    return this.request('loseGpuDevice');
  }

  /** Deletes downloaded models from Cache Storage. */
  clearCache() {
    return this.request('clearCache');
  }
}
