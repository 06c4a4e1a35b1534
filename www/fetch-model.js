// Gathers a model's files as [{name, bytes: Uint8Array}] for Model.load: from a folder URL
// (a Hugging Face `resolve/main/` folder, or the bundled `models/…/`), from a .gguf URL, or
// from files the user picked; and those of a PEFT LoRA adapter to merge into it (a folder
// URL holding adapter_config.json and adapter_model.safetensors, or the two files picked).
// Downloads from other origins are kept in Cache Storage so the next visit works offline;
// the page's own files are not, so an updated bundled model is never shadowed by a stale
// copy. `cachedModels` lists what is kept, by folder, and `deleteCachedModel` forgets one.
//
// A file enters the cache only once it has arrived whole (as many bytes as its
// content-length said); a cached file whose body is not the size it was stored with is
// evicted and downloaded again, so an interrupted download can never be served forever.
// `signal` (an AbortSignal) ends a download: the promise rejects with an AbortError and
// nothing of the file is cached.

const CACHE = 'medphi-models-v1';
// WebAssembly (wasm32) memory ends at 4 GiB and the weights are copied into it whole, so
// refuse bigger models before downloading gigabytes: Phi-2 in f16 (5.6 GB) does not fit,
// its q4_0/q8_0 GGUF (1.6/3.0 GB) does. The cap is on the model: all its files together,
// its adapter's included. Converting on load (`quantize`) does not lift it: the stored
// weights are copied into wasm memory whole before they are converted.
export const MAX_MODEL_BYTES = 3.5 * 2 ** 30;

function tooBig(name, bytes) {
  const e = fileError(
    name,
    `the model is ${(bytes / 2 ** 30).toFixed(1)} GB, more than the ${MAX_MODEL_BYTES / 2 ** 30} GB a browser tab can hold ` +
      'in WebAssembly memory (converting on load needs the stored weights there first); use a quantized GGUF (q4_0 or q8_0) of it',
  );
  e.tooBig = true;
  return e;
}

/**
 * The files of `source` — {url} or {files}, with an optional `adapter` ({url} of an adapter
 * folder, or {files}) — as {files, adapter}: each [{name, bytes}], `adapter` null without one.
 */
export async function loadFiles(source, { progress, warn, signal } = {}) {
  progress ??= () => {};
  warn ??= () => {};
  throwIfAborted(signal);
  // Bytes of the model's files (and its adapter's) read so far: the size cap is on their sum.
  const budget = { total: 0 };
  const fetcher = (url) => new Fetcher(url.origin !== self.location.origin, budget, progress, warn, signal);
  const files = await modelFiles(source, budget, fetcher, progress, signal);
  const adapter = source.adapter ? await adapterFiles(source.adapter, budget, fetcher, progress, signal) : null;
  return { files, adapter };
}

async function modelFiles(source, budget, fetcher, progress, signal) {
  if (source.files) return readLocal(source.files, budget, progress, signal);
  if (!source.url) throw inputError('give a model URL or files');
  const url = new URL(source.url, self.location.href);
  const get = fetcher(url);
  if (url.pathname.endsWith('.gguf')) {
    return [await get.file(url.href, url.pathname.split('/').pop())];
  }
  const base = folder(url);
  const files = [await get.file(base + 'config.json', 'config.json'), await get.file(base + 'tokenizer.json', 'tokenizer.json')];
  const single = await get.file(base + 'model.safetensors', 'model.safetensors', { optional: true });
  if (single) return [...files, single];
  const index = await get.file(base + 'model.safetensors.index.json', 'model.safetensors.index.json', {
    optional: true,
  });
  if (!index) throw fileError(base, 'no model.safetensors or model.safetensors.index.json in this folder');
  let shards;
  try {
    shards = [...new Set(Object.values(JSON.parse(new TextDecoder().decode(index.bytes)).weight_map))];
  } catch (e) {
    throw fileError('model.safetensors.index.json', `not a valid index: ${e.message}`);
  }
  for (const shard of shards) {
    if (typeof shard !== 'string' || shard.includes('/') || shard.includes('..')) {
      throw fileError('model.safetensors.index.json', `bad shard name ${shard}`);
    }
    files.push(await get.file(base + shard, shard));
  }
  return [...files, index];
}

/** A PEFT adapter's two files, from its folder URL or as picked (Model.load checks the names). */
async function adapterFiles(adapter, budget, fetcher, progress, signal) {
  if (adapter.files) return readLocal(adapter.files, budget, progress, signal);
  if (!adapter.url) throw inputError('give an adapter folder URL or the adapter files');
  const url = new URL(adapter.url, self.location.href);
  const get = fetcher(url);
  const base = folder(url);
  const files = [];
  for (const name of ['adapter_config.json', 'adapter_model.safetensors']) {
    const file = await get.file(base + name, name, { optional: true });
    if (!file) {
      throw fileError(base, `no ${name} in this folder: a PEFT LoRA adapter folder holds adapter_config.json and adapter_model.safetensors`);
    }
    files.push(file);
  }
  return files;
}

function folder(url) {
  return url.href.endsWith('/') ? url.href : `${url.href}/`;
}

/** Cache entries belong to their folder's model; a .gguf is a model by itself. */
function modelOf(fileUrl) {
  return fileUrl.endsWith('.gguf') ? fileUrl : fileUrl.slice(0, fileUrl.lastIndexOf('/') + 1);
}

/**
 * The models kept in Cache Storage: [{url, bytes, files: [{name, bytes}]}], one per folder
 * (or .gguf file), sorted by URL; sizes are those the files were stored with.
 */
export async function cachedModels() {
  if (!('caches' in self) || !(await self.caches.has(CACHE))) return [];
  const cache = await self.caches.open(CACHE);
  const models = new Map();
  for (const request of await cache.keys()) {
    const response = await cache.match(request);
    if (!response) continue; // deleted meanwhile (another tab)
    const bytes = contentLength(response) ?? (await response.arrayBuffer()).byteLength;
    const url = modelOf(request.url);
    if (!models.has(url)) models.set(url, { url, bytes: 0, files: [] });
    const model = models.get(url);
    model.bytes += bytes;
    model.files.push({ name: request.url.slice(url.length) || request.url.split('/').pop(), bytes });
  }
  return [...models.values()].sort((a, b) => a.url.localeCompare(b.url));
}

/** Forgets the cached files of the model at `url` (as `cachedModels` names it); resolves to how many. */
export async function deleteCachedModel(url) {
  if (!('caches' in self) || !(await self.caches.has(CACHE))) return 0;
  const cache = await self.caches.open(CACHE);
  let removed = 0;
  for (const request of await cache.keys()) {
    if (modelOf(request.url) === url && (await cache.delete(request))) removed += 1;
  }
  return removed;
}

/** Forgets every cached model; resolves to whether there was any. */
export async function clearCachedModels() {
  return 'caches' in self ? self.caches.delete(CACHE) : false;
}

class Fetcher {
  constructor(useCache, budget, progress, warn, signal) {
    this.useCache = useCache && 'caches' in self;
    this.budget = budget;
    this.progress = progress;
    this.warn = warn;
    this.signal = signal;
  }

  async file(url, name, { optional = false } = {}) {
    throwIfAborted(this.signal);
    const cache = this.useCache ? await self.caches.open(CACHE) : null;
    if (cache) {
      const hit = await cache.match(url);
      if (hit) {
        const bytes = await this.readCached(cache, url, hit, name);
        if (bytes) return { name, bytes };
      }
    }
    let response;
    try {
      response = await fetch(url, { signal: this.signal });
    } catch (e) {
      if (isAbort(e, this.signal)) throw abortError(name);
      throw fileError(name, `cannot download ${url} (${e.message}); offline and not cached?`);
    }
    if (response.status === 404 && optional) return null;
    if (!response.ok) throw fileError(name, `HTTP ${response.status} for ${url}`);
    const declared = contentLength(response);
    if (declared !== null && this.budget.total + declared > MAX_MODEL_BYTES) throw tooBig(name, this.budget.total + declared);
    const bytes = await this.read(response, name, false, declared);
    // A body shorter than its content-length is a download cut short (compressed bodies
    // are longer than their content-length, which counts the compressed bytes).
    if (declared !== null && bytes.length < declared) {
      throw fileError(name, `the download ended early (${bytes.length} of ${declared} bytes); try again`);
    }
    if (cache) await this.keep(cache, url, name, bytes);
    return { name, bytes };
  }

  /** The cached file's bytes, or null (and the entry evicted) when it is not whole. */
  async readCached(cache, url, hit, name) {
    const recorded = contentLength(hit);
    let bytes = null;
    try {
      bytes = await this.read(hit, name, true, recorded);
    } catch (e) {
      if (e.name === 'AbortError' || e.tooBig) throw e;
      bytes = null; // unreadable storage: fetch it again
    }
    if (bytes && recorded !== null && bytes.length === recorded) {
      return bytes;
    }
    // Not the size it was stored with (or no size at all): a truncated or damaged
    // entry. Forget it and download the file again.
    this.budget.total -= bytes ? bytes.length : 0;
    await cache.delete(url).catch(() => {});
    this.warn(`The offline copy of ${name} was incomplete; downloading it again.`);
    return null;
  }

  async keep(cache, url, name, bytes) {
    try {
      await cache.put(url, new Response(bytes, { headers: { 'content-length': String(bytes.length) } }));
    } catch (e) {
      this.warn(
        e.name === 'QuotaExceededError'
          ? `Browser storage is full: ${name} works now but will be downloaded again next visit.`
          : `Could not keep ${name} for offline use: ${e.message}`,
      );
    }
  }

  /** Reads a body whole, counting it against the model's size cap. */
  async read(response, name, cached, declared) {
    const total = declared ?? 0;
    const reader = response.body.getReader();
    const chunks = [];
    let loaded = 0;
    const start = this.budget.total;
    try {
      for (;;) {
        throwIfAborted(this.signal, name);
        let step;
        try {
          step = await reader.read();
        } catch (e) {
          if (isAbort(e, this.signal)) throw abortError(name);
          throw fileError(name, `the download failed (${e.message}); try again`);
        }
        if (step.done) break;
        chunks.push(step.value);
        loaded += step.value.length;
        this.budget.total = start + loaded;
        if (this.budget.total > MAX_MODEL_BYTES) throw tooBig(name, this.budget.total);
        this.progress({ file: name, loaded, total, cached });
      }
    } catch (e) {
      reader.cancel().catch(() => {});
      this.budget.total = start;
      throw e;
    }
    throwIfAborted(this.signal, name);
    const bytes = new Uint8Array(loaded);
    let at = 0;
    for (const c of chunks) {
      bytes.set(c, at);
      at += c.length;
    }
    this.progress({ file: name, loaded, total: loaded, cached });
    return bytes;
  }
}

function contentLength(response) {
  const v = response.headers.get('content-length');
  if (v === null || v.trim() === '') return null;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : null;
}

async function readLocal(files, budget, progress, signal) {
  budget.total += files.reduce((a, f) => a + f.size, 0);
  if (budget.total > MAX_MODEL_BYTES) throw tooBig(files.map((f) => f.name).join(', '), budget.total);
  const out = [];
  for (const f of files) {
    throwIfAborted(signal, f.name);
    progress({ file: f.name, loaded: 0, total: f.size, cached: false });
    out.push({ name: f.name, bytes: new Uint8Array(await f.arrayBuffer()) });
    progress({ file: f.name, loaded: f.size, total: f.size, cached: false });
  }
  throwIfAborted(signal);
  return out;
}

function isAbort(e, signal) {
  return e?.name === 'AbortError' || Boolean(signal?.aborted);
}

function throwIfAborted(signal, name) {
  if (signal?.aborted) throw abortError(name);
}

function abortError(name) {
  return new DOMException(name ? `the download of ${name} was aborted` : 'the load was aborted', 'AbortError');
}

function fileError(file, message) {
  const e = new Error(`${file}: ${message}`);
  e.name = 'FileError';
  return e;
}

function inputError(message) {
  const e = new Error(message);
  e.name = 'InputError';
  return e;
}
