// All model work runs here, off the page's thread. Messages in: {id, type, ...}; out:
// {id, type: "result" | "error" | "text" | "progress" | "warning"}, and {type: "model",
// info, source} whenever the model in use changes (info null: none is loaded).
//
// Requests run one at a time, in the order they came:
// - `load`, `generate`, `score`, `benchmark`, `finetune`, `applyAdapter`, `useBase`, `useAdapter`,
//   `reset` and `loseGpuDevice` wait in one queue. `probe`, `parse`, `parseRows`, `report`,
//   `cachedModels`, `deleteCachedModel` and `clearCache` need no model and answer at once
//   (`parse`, `parseRows` and `report` once the wasm module is initialised).
// - A load supersedes every earlier load still queued or running: those reject with a
//   SupersededError (a running download is aborted; a model built after being superseded
//   is freed, never installed).
// - A model request belongs to the most recent load issued before it. It runs on that
//   load's model once the load has finished; if the load was superseded, aborted or failed,
//   the request rejects saying so instead of running on another model. (A request issued
//   after a load failed belongs to the model still in use.)
// - A failed load leaves the previous model in use. Models small enough to hold two of are
//   built before the old one is freed; for bigger ones the files are checked first, and if
//   the new model still fails after the old one was freed, the old one is loaded again
//   from where it came from, and the error says so.
// - {type: "stop"} ends the running generation before its next token, or the running
//   fine-tune after its step under way (keeping the adapter trained so far); {type: "abort",
//   target: id} drops a queued request or ends a running one (download aborted,
//   generation stopped). Safetensors weights are downloaded while Model.load reads them,
//   tensor by tensor: an aborted or superseded load's reads reject with an AbortError, which
//   ends Model.load at the tensor it is on.
// - A load's `gpuKernels` ("auto" | "gpu" | "emulator": the WebGPU kernel family) and
//   `quantize` ("q8_0" | "q4_0": the blocks weights are converted to as they load) go to
//   Model.load as they are, so an unknown one is refused by the wasm's own InputError (before
//   anything is downloaded or freed). A load's source may name a LoRA adapter
//   (`source.adapter`: {url} or {files}), fetched with the model and merged by Model.load.
//   The reloads made here (the CPU fall-back, bringing a freed model back) keep all of these.
import { cachedModels, clearCachedModels, deleteCachedModel, loadFiles } from './fetch-model.js';

// Up to this many bytes (the old model's weights plus the new model's files), a new model
// is built while the old one is still loaded, so a failure costs nothing. Beyond it the old
// one is freed first: two models may not fit in wasm memory or on the GPU.
const TWO_MODELS_BYTES = 2 ** 30;
const MODEL_REQUESTS = new Set(['generate', 'score', 'benchmark', 'reset', 'loseGpuDevice', 'finetune', 'useBase', 'useAdapter', 'applyAdapter']);
/** The kernel families and quantizations Model.load knows; anything else is sent to it early for its error. */
const GPU_KERNELS = new Set(['auto', 'gpu', 'emulator']);
const QUANTIZATIONS = new Set(['q8_0', 'q4_0']);

/** The wasm package's exports, once it is initialised. */
let Model, FineTune, evalReport, parseBenchmark, parseTrainingRows;
/**
 * CPU threads the wasm runs its matrix products on: {count, note}. The threaded build needs
 * SharedArrayBuffer, which browsers give only to cross-origin isolated pages (COOP/COEP
 * headers from scripts/serve.sh, or isolation-sw.js's service worker on hosts that cannot send
 * them); anywhere else, and if its thread pool cannot start, the single-threaded build runs.
 */
let threads = { count: 1, note: null };

async function initWasm() {
  if (self.crossOriginIsolated && typeof SharedArrayBuffer === 'function') {
    try {
      const pkg = await import('./pkg-threads/medphi.js');
      await pkg.default();
      const count = Math.max(1, Math.min(self.navigator.hardwareConcurrency || 1, 16));
      await pkg.initThreadPool(count);
      ({ Model, FineTune, evalReport, parseBenchmark, parseTrainingRows } = pkg);
      threads = { count, note: null };
      return;
    } catch (e) {
      threads.note = `the threaded build did not start (${e?.message || e}), so one thread is used`;
    }
  } else {
    threads.note = 'this page is not cross-origin isolated, so the CPU uses one thread';
  }
  const pkg = await import('./pkg/medphi.js');
  await pkg.default();
  ({ Model, FineTune, evalReport, parseBenchmark, parseTrainingRows } = pkg);
}

let initError = null;
let initialized = false;
const ready = initWasm().then(
  () => {
    initialized = true;
    pump();
  },
  (e) => {
    initError = e instanceof Error ? e : new Error(String(e));
    initialized = true;
    pump();
  },
);

/**
 * The model in use: {model, info, seq, source, backend, options, base, adapted}, or null.
 * `options` are what its load asked of Model.load besides the files: {context, gpuKernels,
 * quantize}. With an adapter applied in the page (a fine-tune, `applyAdapter`), `base` is
 * the base model kept loaded beside it ({model, info, source}), so `useBase` switches back
 * at once; after `useBase`, `adapted` keeps the adapted model for `useAdapter`.
 */
let current = null;
/** How to load the model in use again ({seq, source, backend, options}), kept while a new one is built. */
let remembered = null;
/** Loads by their sequence number: {state: 'pending'|'done'|'superseded'|'aborted'|'failed', source}. */
const loads = new Map();
let loadsIssued = 0;
/** The load that new model requests belong to (0: none; they use whatever model is loaded). */
let latestSeq = 0;
/** Jobs waiting their turn: {id, type, data, seq, settled, ...}. */
const queue = [];
let running = null;

// ---- messages ------------------------------------------------------------------------

self.onmessage = ({ data }) => {
  switch (data.type) {
    case 'stop':
      stopRunning();
      return;
    case 'abort':
      abort(data.target);
      return;
    case 'load':
      issueLoad(data);
      return;
    default:
      if (MODEL_REQUESTS.has(data.type)) {
        queue.push({ id: data.id, type: data.type, data, seq: latestSeq, settled: false });
        pump();
      } else {
        immediate(data);
      }
  }
};

function post(msg) {
  self.postMessage(msg);
}

function settle(job, value) {
  if (job.settled) return;
  job.settled = true;
  post({ id: job.id, type: 'result', value });
}

function fail(job, err) {
  if (job.settled) return;
  job.settled = true;
  post({ id: job.id, type: 'error', name: err?.name || 'Error', message: err?.message || String(err) });
}

function warn(message, id) {
  post({ id, type: 'warning', message });
}

/** A model's info, with the CPU threads the wasm uses. */
function describe(model) {
  return { ...model.info(), threads: threads.count, threadsNote: threads.note };
}

/** Tells the page the model in use, and which other one is kept to switch to ('base', 'adapter' or null). */
function announce() {
  const kept = current?.base ? 'base' : current?.adapted ? 'adapter' : null;
  post({ type: 'model', info: current ? current.info : null, source: current ? current.source : null, kept });
}

// ---- requests that need no model -----------------------------------------------------

const immediateHandlers = {
  async probe() {
    if (!self.navigator.gpu) return { webgpu: false, reason: 'this browser has no WebGPU' };
    const adapter = await self.navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    if (!adapter) return { webgpu: false, reason: 'WebGPU is present but offers no adapter' };
    return { webgpu: true, adapter: adapterName(adapter), shaderF16: adapter.features.has('shader-f16') };
  },

  async parse({ task, text, file }) {
    await ready;
    if (initError) throw initError;
    return parseBenchmark(task, text, file);
  },

  async parseRows({ text, file }) {
    await ready;
    if (initError) throw initError;
    return parseTrainingRows(text, file);
  },

  // lm-eval's results object for scored sample lines: the same Rust code as `medphi eval`.
  async report({ task, samples, original, config, seconds }) {
    await ready;
    if (initError) throw initError;
    return evalReport(task, samples, original, config, seconds);
  },

  cachedModels() {
    return cachedModels();
  },

  deleteCachedModel({ url }) {
    return deleteCachedModel(url);
  },

  clearCache() {
    return clearCachedModels();
  },
};

/** A WebGPU adapter's name for people, from what the browser tells of it. */
function adapterName(adapter) {
  const i = adapter?.info || {};
  return [i.vendor, i.architecture, i.description].filter(Boolean).join(' ') || 'WebGPU adapter';
}

async function immediate(data) {
  const job = { id: data.id, settled: false };
  try {
    const handler = immediateHandlers[data.type];
    if (!handler) throw new Error(`unknown request ${data.type}`);
    settle(job, await handler(data));
  } catch (err) {
    fail(job, err);
  }
}

// ---- the queue -----------------------------------------------------------------------

async function pump() {
  if (running || !initialized) return;
  while (queue.length) {
    const job = queue.shift();
    // Requests already answered (aborted, or their load superseded) are dropped; loads
    // still run their ending, which may bring the previous model back.
    if (job.settled && job.type !== 'load') continue;
    running = job;
    try {
      if (initError) throw initError;
      const value = job.type === 'load' ? await runLoad(job) : await runRequest(job);
      settle(job, value);
    } catch (err) {
      fail(job, err);
    } finally {
      running = null;
    }
  }
}

function named(name, message) {
  const e = new Error(message);
  e.name = name;
  return e;
}

function abortError(what) {
  return new DOMException(`${what} was aborted`, 'AbortError');
}

function describeSource(source) {
  if (!source) return 'no model';
  const where = (s) => (s.files ? s.files.map((f) => f.name).join(', ') : s.url);
  return source.adapter ? `${where(source)} with the adapter ${where(source.adapter)}` : where(source);
}

function liveLoads() {
  return [running, ...queue].filter((j) => j && j.type === 'load' && !j.settled);
}

/** Rejects the queued requests that belong to load `seq`. */
function rejectDependents(seq, error) {
  for (const job of queue) {
    if (job.type !== 'load' && job.seq === seq) fail(job, error(job));
  }
}

/** After load `seq` ended without a model: new requests belong to the model that stays. */
function fallBack(seq) {
  if (latestSeq === seq) latestSeq = (current ?? remembered)?.seq ?? 0;
}

// ---- loads ---------------------------------------------------------------------------

function issueLoad(data) {
  const seq = ++loadsIssued;
  for (const job of liveLoads()) {
    job.superseded = true;
    job.controller.abort();
    fail(
      job,
      named('SupersededError', `the load of ${describeSource(job.data.source)} was superseded by a later load before it finished`),
    );
    const entry = loads.get(job.seq);
    entry.state = 'superseded';
    rejectDependents(job.seq, (r) =>
      named(
        'SupersededError',
        `this ${r.type} request was waiting for the load of ${describeSource(entry.source)}, which a later load superseded; ` +
          'it did not run (issue it again to run it on the newer model)',
      ),
    );
  }
  loads.set(seq, { state: 'pending', source: data.source });
  latestSeq = seq;
  queue.push({ id: data.id, type: 'load', data, seq, settled: false, controller: new AbortController() });
  pump();
}

function endedEarly(job) {
  if (job.superseded) return named('SupersededError', `the load of ${describeSource(job.data.source)} was superseded`);
  if (job.aborted) return abortError(`the load of ${describeSource(job.data.source)}`);
  return null;
}

async function runLoad(job) {
  const { id, source, backend, context, freeFirst } = job.data;
  const options = { context, gpuKernels: choice(job.data.gpuKernels), quantize: choice(job.data.quantize) };
  const entry = loads.get(job.seq);
  try {
    let early = endedEarly(job);
    if (early) throw early;
    await checkOptions(options);
    const loaded = await loadFiles(source, {
      progress: (p) => post({ id, type: 'progress', ...p }),
      warn: (message) => warn(message, id),
      signal: job.controller.signal,
    });
    if ((early = endedEarly(job))) throw early;
    const all = [...loaded.files, ...(loaded.adapter ?? [])];
    // What the files take stored, whether they came whole or are read by ranges.
    const bytes = all.reduce((a, f) => a + (f.bytes ? f.bytes.length : f.size), 0);
    if (current && (freeFirst || current.info.weightBytes + bytes > TWO_MODELS_BYTES)) {
      // Only one model fits: refuse what cannot be a model before giving the old one up.
      await precheck(all);
      freeCurrent();
      announce();
    }
    const built = await build(loaded, backend, options, id);
    if ((early = endedEarly(job))) {
      built.free();
      throw early;
    }
    freeCurrent();
    const info = describe(built);
    current = { model: built, info, seq: job.seq, source, backend: info.backend, options };
    remembered = { seq: job.seq, source, backend: info.backend, options };
    entry.state = 'done';
    announce();
    return info;
  } catch (e) {
    let err = e;
    if (entry.state === 'pending') {
      entry.state = job.aborted ? 'aborted' : 'failed';
      rejectDependents(job.seq, (r) =>
        named(
          'LoadFailedError',
          `this ${r.type} request was waiting for the load of ${describeSource(source)}, which ${
            job.aborted ? 'was aborted' : `failed (${e?.message || e})`
          }; it did not run on another model`,
        ),
      );
    }
    if (!job.superseded) err = await recover(e);
    fallBack(job.seq);
    throw err;
  }
}

/** Frees every model the worker holds (the one in use, and a base or adapted one kept beside it). */
function freeCurrent() {
  if (!current) return;
  current.model.free();
  current.base?.model.free();
  current.adapted?.model.free();
  current = null;
}

/** After a failed load: the previous model stays, or is loaded again if it was freed. */
async function recover(e) {
  const amend = (suffix) => {
    const a = e instanceof DOMException ? new DOMException(`${e.message}${suffix}`, e.name) : new Error(`${e?.message || e}${suffix}`);
    if (!(a instanceof DOMException)) a.name = e?.name || 'Error';
    return a;
  };
  if (current) return amend(` (the model loaded before, ${describeSource(current.source)}, is still in use)`);
  // A later load is on its way: it, not the model before, decides what is loaded next.
  if (!remembered || queue.some((j) => j.type === 'load' && !j.settled)) return e;
  const r = remembered;
  try {
    const loaded = await loadFiles(r.source, { warn: (message) => warn(message) });
    const model = await build(loaded, r.backend, r.options);
    const info = describe(model);
    current = { model, info, seq: r.seq, source: r.source, backend: info.backend, options: r.options };
    remembered = { ...r, backend: info.backend };
    announce();
    return amend(
      `; the model loaded before it (${describeSource(r.source)}) had been freed to make room and was loaded again` +
        `${info.backend !== r.backend ? ` on the ${info.backend === 'cpu' ? 'CPU' : info.backend}` : ''}, so it is still in use`,
    );
  } catch (e2) {
    remembered = null;
    return amend(
      `; the model loaded before it (${describeSource(r.source)}) had been freed to make room and could not be loaded again ` +
        `(${e2?.message || e2}), so no model is loaded`,
    );
  }
}

/**
 * Builds the model of `loaded` ({files, adapter}: loadFiles' answer) on `backend` with
 * `options` ({context, gpuKernels, quantize}); "auto" is WebGPU when it can take the model,
 * else the CPU.
 */
async function build(loaded, backend, options, id) {
  // Weights read by ranges are downloaded and converted tensor by tensor inside Model.load:
  // the page hears which one is under way.
  const onTensor = id === undefined ? undefined : (tensor, index, total) => post({ id, type: 'progress', tensor, index, total });
  const on = (b) =>
    Model.load(loaded.files, b, options.context ?? undefined, options.gpuKernels, options.quantize, loaded.adapter ?? undefined, onTensor);
  if (backend !== 'auto') {
    try {
      return await on(backend);
    } catch (e) {
      // A restore on WebGPU that the GPU cannot take any more still brings the model back.
      if (id !== undefined || backend !== 'webgpu' || e?.name !== 'GpuError') throw e;
      return on('cpu');
    }
  }
  if (await webgpuAvailable()) {
    try {
      return await on('webgpu');
    } catch (e) {
      if (e?.name !== 'GpuError') throw e;
      warn(`WebGPU could not take the model (${e.message}); using the CPU.`, id);
    }
  }
  return on('cpu');
}

/** A load's `gpuKernels` or `quantize` as Model.load takes it: undefined (its default) or a string. */
function choice(value) {
  return value === undefined || value === null ? undefined : String(value);
}

/**
 * Refuses a kernel family or quantization Model.load does not know with its own error,
 * before the files are downloaded or the model in use is freed. Model.load reads both
 * choices before its files, so with no files an unknown one is the error it gives.
 */
async function checkOptions({ gpuKernels, quantize }) {
  const known = (value, set) => value === undefined || set.has(value);
  if (known(gpuKernels, GPU_KERNELS) && known(quantize, QUANTIZATIONS)) return;
  try {
    (await Model.load([], 'cpu', undefined, gpuKernels, quantize)).free();
  } catch (e) {
    // Its error about the missing files instead: this wasm knows the choices after all.
    if (/kernel|quantization/i.test(e?.message || '')) throw e;
  }
}

async function webgpuAvailable() {
  try {
    return Boolean(self.navigator.gpu && (await self.navigator.gpu.requestAdapter({ powerPreference: 'high-performance' })));
  } catch {
    return false;
  }
}

// A safetensors header longer than this is refused unread (Model.load's own cap is 100 MB).
const MAX_HEADER_BYTES = 100_000_000;

/**
 * Refuses files that cannot be a model, without building it: config.json and
 * tokenizer.json must be JSON objects, a safetensors header must lie inside its file and
 * its tensors' data inside the data, a .gguf must start with GGUF's magic. The full
 * validation is Model.load's; this catches the files that would fail there early, while
 * the old model is still loaded. Of a file read by ranges only the header is read.
 */
async function precheck(files) {
  const bad = (name, why) => named('FileError', `${name}: ${why}`);
  for (const file of files) {
    const { name } = file;
    const base = name.split('/').pop();
    if (file.read && base.endsWith('.safetensors')) {
      if (file.size < 8) throw bad(name, 'too short to be a safetensors file');
      const first = await file.read(0, 8);
      const n = Number(new DataView(first.buffer, first.byteOffset, 8).getBigUint64(0, true));
      if (n > file.size - 8) throw bad(name, 'not a safetensors file (its header runs past the end of the file)');
      if (n > MAX_HEADER_BYTES) throw bad(name, `not a safetensors file (its header claims ${n} bytes, more than a header may take)`);
      safetensorsHeader(name, await file.read(8, 8 + n), file.size - 8 - n);
      continue;
    }
    if (file.read && base.endsWith('.gguf')) {
      if (file.size < 4 || !isGguf(await file.read(0, 4))) throw bad(name, NOT_GGUF);
      continue;
    }
    const { bytes } = file;
    if (base.endsWith('.json')) {
      let value;
      try {
        value = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(bytes));
      } catch (e) {
        throw bad(name, `not valid JSON (${e.message})`);
      }
      if (typeof value !== 'object' || value === null || Array.isArray(value)) throw bad(name, 'not a JSON object');
    } else if (base.endsWith('.safetensors')) {
      if (bytes.length < 8) throw bad(name, 'too short to be a safetensors file');
      const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      const n = Number(view.getBigUint64(0, true));
      if (n > bytes.length - 8) throw bad(name, 'not a safetensors file (its header runs past the end of the file)');
      safetensorsHeader(name, bytes.subarray(8, 8 + n), bytes.length - 8 - n);
    } else if (base.endsWith('.gguf')) {
      if (bytes.length < 4 || !isGguf(bytes.subarray(0, 4))) throw bad(name, NOT_GGUF);
    }
  }
}

/** The parser's own words (src/weights/gguf_file.rs) for a file without GGUF magic. */
const NOT_GGUF = 'not a valid GGUF file: it does not start with the GGUF magic number';

function isGguf(first4) {
  return new TextDecoder().decode(first4) === 'GGUF';
}

/** Checks a safetensors JSON header: every tensor's data must lie within the `data` bytes after it. */
function safetensorsHeader(name, json, data) {
  const bad = (why) => named('FileError', `${name}: ${why}`);
  let header;
  try {
    header = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(json));
  } catch (e) {
    throw bad(`not a safetensors file (its header is not JSON: ${e.message})`);
  }
  for (const [tensor, t] of Object.entries(header ?? {})) {
    if (tensor === '__metadata__') continue;
    const [a, b] = t?.data_offsets ?? [];
    if (!(Number.isSafeInteger(a) && Number.isSafeInteger(b) && a >= 0 && a <= b && b <= data)) {
      throw bad(`tensor ${tensor} lies outside the file (truncated download?)`);
    }
  }
}

// ---- model requests ------------------------------------------------------------------

/** The model `job` belongs to, or an error saying why it cannot run. */
function modelFor(job) {
  if (job.seq) {
    const entry = loads.get(job.seq);
    if (entry.state === 'superseded') {
      throw named('SupersededError', `this ${job.type} request was waiting for the load of ${describeSource(entry.source)}, which a later load superseded`);
    }
    if (entry.state !== 'done') {
      throw named('LoadFailedError', `this ${job.type} request was waiting for the load of ${describeSource(entry.source)}, which ${entry.state === 'aborted' ? 'was aborted' : 'failed'}`);
    }
    if (!current || current.seq !== job.seq) {
      throw named('InputError', `the model this ${job.type} request was made for (${describeSource(entry.source)}) is no longer loaded`);
    }
  }
  if (!current) {
    if (job.type === 'reset') return null;
    throw named('InputError', 'no model is loaded');
  }
  return current.model;
}

async function runRequest(job) {
  const model = modelFor(job);
  switch (job.type) {
    case 'generate':
      return runGenerate(job, model);
    case 'score': {
      const value = await model.score(job.data.question);
      if (job.aborted) throw abortError('the score request');
      return value;
    }
    case 'benchmark':
      return runBenchmark(job, model);
    case 'reset':
      model?.reset();
      return undefined;
    case 'loseGpuDevice':
      // Testing: the path a real device loss takes (see Model.loseGpuDevice).
      model.loseGpuDevice();
      return undefined;
    case 'finetune':
      return runFinetune(job);
    case 'applyAdapter':
      return runApplyAdapter(job);
    case 'useBase':
      return useBase();
    case 'useAdapter':
      return useAdapter();
    default:
      throw new Error(`unknown request ${job.type}`);
  }
}

async function runGenerate(job, model) {
  job.model = model;
  const result = model.generate(job.data.request, (piece) => {
    post({ id: job.id, type: 'text', piece });
    return !job.stopped;
  });
  const value = await result;
  if (job.aborted) throw abortError('the generate request');
  return value;
}

/**
 * `medphi bench`'s measurement on `model` (the one in use), labelled with what it ran on:
 * {prefillTokS, decodeTokS, bytesPerToken, effectiveGbS, backend, device, kernels, adapter}.
 */
async function runBenchmark(job, model) {
  const { promptLen, gen } = job.data;
  for (const [name, v] of [['promptLen', promptLen], ['gen', gen]]) {
    if (!Number.isSafeInteger(v) || v < 1 || v > 0xffffffff) {
      throw named('InputError', `benchmark: ${name} must be a positive whole number of tokens (got ${JSON.stringify(v) ?? String(v)})`);
    }
  }
  const { info } = current;
  const value = await model.benchmark(promptLen, gen);
  if (job.aborted) throw abortError('the benchmark request');
  // Browsers may hide the adapter's name from wgpu (it is empty in Chromium): then the
  // name the browser gives the page's own adapter request, as `probe` reports it.
  let adapter = null;
  if (info.backend === 'webgpu') {
    adapter = info.gpu?.adapter || null;
    if (!adapter) {
      try {
        adapter = adapterName(await self.navigator.gpu?.requestAdapter({ powerPreference: 'high-performance' }));
      } catch {
        adapter = info.device;
      }
    }
  }
  return {
    ...value,
    backend: info.backend,
    device: info.device,
    kernels: info.kernels ?? null,
    threads: info.threads,
    adapter,
  };
}

// ---- fine-tuning and adapters ------------------------------------------------------------

/** The base model's source: the model in use without its adapter. */
function baseSource() {
  if (current.base) return current.base.source;
  const { adapter, ...source } = current.source ?? {};
  return adapter ? null : source;
}

/** Files handed over as {name, bytes}, as File objects (what a load's source holds). */
function asFiles(files) {
  return files.map((f) => new File([f.bytes], f.name));
}

/**
 * LoRA SFT of the base model in use (see FineTune in src/web/finetune.rs), a step at a
 * time, yielding between steps so Stop and abort are heard; Stop keeps the adapter trained
 * so far. The adapter is then applied (the base kept loaded beside it).
 */
async function runFinetune(job) {
  const source = baseSource();
  if (!source) {
    throw named('InputError', 'the model in use was loaded with an adapter merged in; load its base model without the adapter to fine-tune it');
  }
  const loaded = await loadFiles(source, { warn: (message) => warn(message, job.id) });
  const tune = await FineTune.start(loaded.files, job.data.options ?? {});
  const losses = [];
  let adapterFiles;
  try {
    const t0 = performance.now();
    for (;;) {
      if (job.aborted) throw abortError('the finetune request');
      if (job.stopped) break;
      const m = tune.step();
      losses.push(m.loss);
      post({ id: job.id, type: 'progress', ...m, elapsedMs: performance.now() - t0 });
      if (m.step >= m.steps) break;
      // A macrotask between steps: the worker hears `stop` and `abort` messages here.
      await new Promise((resolve) => setTimeout(resolve, 0));
    }
    adapterFiles = tune.adapterFiles();
  } finally {
    tune.free();
  }
  const info = await applyAdapter(loaded, adapterFiles, job.id);
  return { losses, adapterFiles, stopped: Boolean(job.stopped), steps: losses.length, info };
}

/** Applies the adapter `files` ([{name, bytes}] or File objects) to the base model in use. */
async function runApplyAdapter(job) {
  const source = baseSource();
  if (!source) throw named('InputError', 'the model in use already has an adapter merged in at load; load its base model to apply another');
  const loaded = await loadFiles(source, { warn: (message) => warn(message, job.id) });
  const files = job.data.files ?? [];
  const bytes = await Promise.all(files.map(async (f) => ({ name: f.name, bytes: f.bytes ?? new Uint8Array(await f.arrayBuffer()) })));
  return applyAdapter(loaded, bytes, job.id);
}

/**
 * Builds base + adapter from the base's `loaded` files and makes it the model in use. The
 * base stays loaded beside it when two fit (TWO_MODELS_BYTES); otherwise it is freed and
 * `useBase` loads it again.
 */
async function applyAdapter(loaded, adapterFiles, id) {
  const base = current.base ?? { model: current.model, info: current.info, source: current.source };
  const keepBase = 2 * base.info.weightBytes <= TWO_MODELS_BYTES;
  const { backend, options, seq } = current;
  const previous = current.base ? current.model : null;
  if (!keepBase) {
    freeCurrent();
    announce();
  }
  let model;
  try {
    model = await build({ files: loaded.files, adapter: adapterFiles }, backend, options, id);
  } catch (e) {
    if (keepBase) throw e;
    // The base was freed to make room: bring it back, as a failed load does.
    throw await recover(e);
  }
  previous?.free();
  current?.adapted?.model.free();
  const info = describe(model);
  const source = { ...base.source, adapter: { files: asFiles(adapterFiles) } };
  current = { model, info, seq, source, backend: info.backend, options, base: keepBase ? base : null, adapted: null };
  remembered = { seq, source, backend: info.backend, options };
  announce();
  return info;
}

/** Switches to the base model (the adapter's model kept for `useAdapter`). */
async function useBase() {
  if (!current.source?.adapter) return current.info;
  const { seq, backend, options } = current;
  if (!current.base) {
    // Too big to keep both: the base is loaded again from where it came from.
    const { adapter, ...source } = current.source;
    freeCurrent();
    announce();
    let model;
    try {
      model = await build(await loadFiles(source), backend, options);
    } catch (e) {
      throw await recover(e);
    }
    current = { model, info: describe(model), seq, source, backend, options, base: null, adapted: null };
  } else {
    const adapted = { model: current.model, info: current.info, source: current.source };
    current = { ...current.base, seq, backend, options, base: null, adapted };
  }
  remembered = { seq, source: current.source, backend, options };
  announce();
  return current.info;
}

/** Switches back to the adapted model `useBase` kept. */
async function useAdapter() {
  if (current.source?.adapter) return current.info;
  if (!current.adapted) throw named('InputError', 'no adapter has been applied to this model in this page');
  const { seq, backend, options } = current;
  const base = { model: current.model, info: current.info, source: current.source };
  current = { ...current.adapted, seq, backend, options, base, adapted: null };
  remembered = { seq, source: current.source, backend, options };
  announce();
  return current.info;
}

function stopRunning() {
  const job = running;
  if (job?.type === 'finetune') {
    job.stopped = true;
    return;
  }
  if (job?.type === 'generate' && job.model) {
    job.stopped = true;
    job.model.stop();
  }
}

function abort(target) {
  const job = running?.id === target ? running : queue.find((j) => j.id === target);
  if (!job || job.aborted) return;
  job.aborted = true;
  if (job.type === 'load') {
    job.controller.abort();
    const wasLive = !job.settled;
    fail(job, abortError(`the load of ${describeSource(job.data.source)}`));
    const entry = loads.get(job.seq);
    if (wasLive && entry.state === 'pending') {
      entry.state = 'aborted';
      rejectDependents(job.seq, (r) =>
        named('LoadFailedError', `this ${r.type} request was waiting for the load of ${describeSource(entry.source)}, which was aborted; it did not run`),
      );
      fallBack(job.seq);
    }
    return;
  }
  fail(job, abortError(`the ${job.type} request`));
  if (job === running && job.type === 'finetune') job.stopped = true;
  if (job === running && job.type === 'generate' && job.model) {
    job.stopped = true;
    job.model.stop();
  }
}
