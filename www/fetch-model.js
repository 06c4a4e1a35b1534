// Gathers a model's files for Model.load: from a folder URL (a Hugging Face `resolve/main/`
// folder, or the bundled `models/…/`), from a .gguf URL, or from files the user picked; and
// those of a PEFT LoRA adapter to merge into it (a folder URL holding adapter_config.json and
// adapter_model.safetensors, or the two files picked).
//
// Weights (safetensors shards or a GGUF file) are handed over as files read by byte ranges,
// {name, size, read(start, end) → Promise<Uint8Array>}: Model.load reads the header, then
// one tensor at a time, converts and uploads it, and drops its bytes before reading the
// next, so neither wasm memory nor this worker ever holds a whole multi-GB checkpoint.
// Picked weights are read with Blob.slice. Weights from other origins are kept in Cache
// Storage in parts of PART_BYTES (each its own entry), each downloaded with an HTTP Range
// request the first time a tensor needs it; a server that ignores Range still works (its
// whole body is cut into parts as it arrives). Every other file — config, tokenizer, index,
// adapter — is handed over whole, {name, bytes}, and kept whole. The page's
// own files (the bundled model) are read whole and never cached, so an updated bundled
// model is never shadowed by a stale copy. `cachedModels` lists what is kept, by folder, and
// `deleteCachedModel` forgets one.
//
// Nothing enters the cache before it is complete: a whole file once as many bytes arrived as
// its content-length said, a part once it holds exactly its extent of the file. A cached
// file or part whose body is not the size it was stored with is evicted and downloaded
// again, so an interrupted download can never be served forever. A dropped connection is
// resumed with a Range request from the byte where the part stands, a few times with
// backoff; the parts already kept stay, so a later load continues where a failed one
// stopped. `signal` (an AbortSignal) ends a download and every later read: they reject with
// an AbortError, and nothing incomplete is cached.

const CACHE = 'medphi-models-v1';
// Streamed weight files are kept in parts of this size: each is one Range request and one
// cache entry, held in memory only while it downloads, and all that is downloaded again
// when a part is cut off for good. A file keeps the part size it was first stored with.
const PART_BYTES = 64 * 2 ** 20;
// Tries of one part's download, in a row without a new byte, before the load fails.
const ATTEMPTS = 5;
const RETRY_MS = 250; // the first pause between tries; it doubles with each fruitless try
// The search parameter that names a streamed file's bookkeeping and parts in the cache.
const ENTRY = 'medphi';

/**
 * The files of `source` — {url} or {files}, with an optional `adapter` ({url} of an adapter
 * folder, or {files}) — as {files, adapter}: each an array of {name, bytes} or {name, size,
 * read}, `adapter` null without one. `progress` hears downloads ({file, loaded, total,
 * cached, bytesPerSecond}), also those made later by the weights' `read`.
 */
export async function loadFiles(source, { progress, warn, signal } = {}) {
  progress ??= () => {};
  warn ??= () => {};
  throwIfAborted(signal);
  const fetcher = (url) => new Fetcher(url.origin !== self.location.origin, progress, warn, signal);
  const files = await modelFiles(source, fetcher, signal);
  const adapter = source.adapter ? await adapterFiles(source.adapter, fetcher, signal) : null;
  return { files, adapter };
}

async function modelFiles(source, fetcher, signal) {
  if (source.files) return Promise.all(source.files.map((f) => picked(f, signal)));
  if (!source.url) throw inputError('give a model URL or files');
  const url = new URL(source.url, self.location.href);
  const get = fetcher(url);
  if (url.pathname.endsWith('.gguf')) {
    const name = url.pathname.split('/').pop();
    const file = await get.weights(url.href, name, { optional: true });
    if (!file) throw fileError(name, `HTTP 404 for ${url.href}`);
    return [file];
  }
  const base = folder(url);
  const files = [await get.file(base + 'config.json', 'config.json'), await get.file(base + 'tokenizer.json', 'tokenizer.json')];
  const indexName = 'model.safetensors.index.json';
  // A folder whose index is kept is sharded: the server is not asked for a single
  // model.safetensors it does not have (offline it could not even answer).
  let index = await get.kept(base + indexName, indexName);
  if (!index) {
    const single = await get.weights(base + 'model.safetensors', 'model.safetensors', { optional: true });
    if (single) return [...files, single];
    index = await get.file(base + indexName, indexName, { optional: true });
  }
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
    files.push(await get.weights(base + shard, shard));
  }
  return [...files, index];
}

/** A PEFT adapter's two files, from its folder URL or as picked (Model.load checks the names). */
async function adapterFiles(adapter, fetcher, signal) {
  if (adapter.files) return Promise.all(adapter.files.map((f) => whole(f, signal)));
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

/** A picked model file as Model.load takes it: weights read by ranges, the rest whole. */
async function picked(file, signal) {
  if (file.name.endsWith('.safetensors') || file.name.endsWith('.gguf')) {
    return {
      name: file.name,
      size: file.size,
      read: async (start, end) => {
        throwIfAborted(signal, file.name);
        const bytes = new Uint8Array(await file.slice(start, end).arrayBuffer());
        throwIfAborted(signal, file.name);
        return bytes;
      },
    };
  }
  return whole(file, signal);
}

async function whole(file, signal) {
  throwIfAborted(signal, file.name);
  const bytes = new Uint8Array(await file.arrayBuffer());
  throwIfAborted(signal, file.name);
  return { name: file.name, bytes };
}

function folder(url) {
  return url.href.endsWith('/') ? url.href : `${url.href}/`;
}

// ---- the cache -----------------------------------------------------------------------

/** A streamed file's cache key: its bookkeeping (`part` null) or its part `part`. */
function entryKey(url, part) {
  const u = new URL(url);
  u.searchParams.set(ENTRY, part === null ? 'parts' : `part-${part}`);
  return u.href;
}

/** The file a cache entry belongs to, and whether it is a streamed file's bookkeeping. */
function entryOf(key) {
  const u = new URL(key);
  const kind = u.searchParams.get(ENTRY);
  u.searchParams.delete(ENTRY);
  return { file: u.href, bookkeeping: kind === 'parts' };
}

/** Cache entries belong to their folder's model; a .gguf is a model by itself. */
function modelOf(fileUrl) {
  return fileUrl.endsWith('.gguf') ? fileUrl : fileUrl.slice(0, fileUrl.lastIndexOf('/') + 1);
}

/**
 * The models kept in Cache Storage: [{url, bytes, files: [{name, bytes}]}], one per folder
 * (or .gguf file), sorted by URL; sizes are those the files (and the parts kept of streamed
 * ones) were stored with.
 */
export async function cachedModels() {
  if (!('caches' in self) || !(await self.caches.has(CACHE))) return [];
  const cache = await self.caches.open(CACHE);
  const models = new Map();
  for (const request of await cache.keys()) {
    const { file, bookkeeping } = entryOf(request.url);
    if (bookkeeping) continue;
    const response = await cache.match(request);
    if (!response) continue; // deleted meanwhile (another tab)
    const bytes = contentLength(response) ?? (await response.arrayBuffer()).byteLength;
    const url = modelOf(file);
    if (!models.has(url)) models.set(url, { url, bytes: 0, files: new Map() });
    const model = models.get(url);
    model.bytes += bytes;
    const name = file.slice(url.length) || file.split('/').pop();
    model.files.set(name, (model.files.get(name) ?? 0) + bytes);
  }
  return [...models.values()]
    .map((m) => ({ ...m, files: [...m.files].map(([name, bytes]) => ({ name, bytes })) }))
    .sort((a, b) => a.url.localeCompare(b.url));
}

/** Forgets the cached files of the model at `url` (as `cachedModels` names it); resolves to how many entries. */
export async function deleteCachedModel(url) {
  if (!('caches' in self) || !(await self.caches.has(CACHE))) return 0;
  const cache = await self.caches.open(CACHE);
  let removed = 0;
  for (const request of await cache.keys()) {
    if (modelOf(entryOf(request.url).file) === url && (await cache.delete(request))) removed += 1;
  }
  return removed;
}

/** Forgets every cached model; resolves to whether there was any. */
export async function clearCachedModels() {
  return 'caches' in self ? self.caches.delete(CACHE) : false;
}

// ---- downloads -----------------------------------------------------------------------

class Fetcher {
  constructor(crossOrigin, progress, warn, signal) {
    this.crossOrigin = crossOrigin;
    this.useCache = crossOrigin && 'caches' in self;
    this.progress = progress;
    this.warn = warn;
    this.signal = signal;
  }

  /** A weight file: read by ranges from another origin, whole from the page's own. */
  async weights(url, name, { optional = false } = {}) {
    if (!this.crossOrigin) return this.file(url, name, { optional });
    throwIfAborted(this.signal, name);
    const cache = this.useCache ? await self.caches.open(CACHE) : null;
    return StreamedFile.open(this, cache, url, name, optional);
  }

  /** The file kept whole in the cache, {name, bytes}, or null. */
  async kept(url, name) {
    throwIfAborted(this.signal, name);
    if (!this.useCache) return null;
    const cache = await self.caches.open(CACHE);
    const hit = await cache.match(url);
    if (!hit) return null;
    const recorded = contentLength(hit);
    const bytes = await this.readCached(cache, url, hit, name, recorded);
    return bytes ? { name, bytes } : null;
  }

  /** A file read whole, {name, bytes}, or null when `optional` and the server has none. */
  async file(url, name, { optional = false } = {}) {
    const kept = await this.kept(url, name);
    if (kept) return kept;
    const cache = this.useCache ? await self.caches.open(CACHE) : null;
    let response;
    try {
      response = await fetch(url, { signal: this.signal });
    } catch (e) {
      if (isAbort(e, this.signal)) throw abortError(name);
      throw unreachable(name, url, e);
    }
    if (response.status === 404 && optional) return null;
    if (!response.ok) throw fileError(name, `HTTP ${response.status} for ${url}`);
    const declared = contentLength(response);
    const bytes = await this.read(response, name, false, declared);
    // A body shorter than its content-length is a download cut short (compressed bodies
    // are longer than their content-length, which counts the compressed bytes).
    if (declared !== null && bytes.length < declared) {
      throw fileError(name, `the download ended early (${bytes.length} of ${declared} bytes); try again`);
    }
    if (cache) await this.keep(cache, url, name, new Response(bytes, { headers: { 'content-length': String(bytes.length) } }));
    return { name, bytes };
  }

  /** The cached file's bytes, or null (and the entry evicted) when it is not whole. */
  async readCached(cache, url, hit, name, recorded) {
    let bytes = null;
    try {
      bytes = await this.read(hit, name, true, recorded);
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      bytes = null; // unreadable storage: fetch it again
    }
    if (bytes && recorded !== null && bytes.length === recorded) {
      return bytes;
    }
    // Not the size it was stored with (or no size at all): a truncated or damaged
    // entry. Forget it and download the file again.
    await cache.delete(url).catch(() => {});
    this.warn(`The offline copy of ${name} was incomplete; downloading it again.`);
    return null;
  }

  /** Puts `response` into the cache; a full storage only costs the offline copy. */
  async keep(cache, key, name, response) {
    try {
      await cache.put(key, response);
      return true;
    } catch (e) {
      this.warn(
        e.name === 'QuotaExceededError'
          ? `Browser storage is full: ${name} works now but will be downloaded again next visit.`
          : `Could not keep ${name} for offline use: ${e.message}`,
      );
      return false;
    }
  }

  /** Reads a body whole. */
  async read(response, name, cached, declared) {
    const total = declared ?? 0;
    const reader = response.body.getReader();
    const chunks = [];
    let loaded = 0;
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
        this.progress({ file: name, loaded, total, cached });
      }
    } catch (e) {
      reader.cancel().catch(() => {});
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

/**
 * A weight file from another origin, read by ranges from its parts in Cache Storage
 * (`cache` null: kept in memory for this load only), each part downloaded when first
 * needed. What Model.load gets is `{name, size, read}`.
 */
class StreamedFile {
  /** The file at `url` (its size from the cache's bookkeeping, else a HEAD request), or null when `optional` and the server has none. */
  static async open(fetcher, cache, url, name, optional) {
    const book = cache ? await readBookkeeping(cache, url) : null;
    let layout = book;
    if (!layout) {
      let response;
      try {
        response = await fetch(url, { method: 'HEAD', cache: 'no-store', signal: fetcher.signal });
      } catch (e) {
        if (isAbort(e, fetcher.signal)) throw abortError(name);
        throw unreachable(name, url, e);
      }
      if (response.status === 404 && optional) return null;
      if (!response.ok) throw fileError(name, `HTTP ${response.status} for ${url}`);
      const size = contentLength(response);
      if (size === null) throw fileError(name, `${url} does not say its size (no content-length), so it cannot be read in parts`);
      layout = { size, partBytes: PART_BYTES, etag: response.headers.get('etag') };
      // Parts an earlier page kept under other bookkeeping (or the file kept whole by a
      // version of the page that did not stream) are of no use now.
      if (cache) await forget(cache, url);
    }
    const file = new StreamedFile(fetcher, cache, url, name, layout);
    if (cache && !book) await fetcher.keep(cache, entryKey(url, null), name, new Response(JSON.stringify(layout)));
    return { name, size: layout.size, read: (start, end) => file.read(start, end) };
  }

  constructor(fetcher, cache, url, name, { size, partBytes, etag }) {
    Object.assign(this, { fetcher, cache, url, name, size, partBytes, etag });
    this.signal = fetcher.signal;
    this.parts = Math.ceil(size / partBytes);
    /** Checked parts: index → Blob (disk-backed when it came from the cache). */
    this.blobs = new Map();
    /** Downloads under way: index → promise. */
    this.pending = new Map();
    /** Bytes of the parts in `blobs`. */
    this.available = 0;
    /** Server that ignores Range: known after its first answer. */
    this.wholeOnly = false;
  }

  /** Progress: the parts at hand plus `partial` bytes of one on its way. */
  report(partial, cached, bytesPerSecond) {
    this.fetcher.progress({ file: this.name, loaded: this.available + partial, total: this.size, cached, bytesPerSecond });
  }

  hold(i, blob) {
    this.blobs.set(i, blob);
    this.available += blob.size;
  }

  extent(i) {
    return [i * this.partBytes, Math.min(this.size, (i + 1) * this.partBytes)];
  }

  /** Bytes [start, end) of the file, exactly. */
  async read(start, end) {
    throwIfAborted(this.signal, this.name);
    if (!(Number.isSafeInteger(start) && Number.isSafeInteger(end) && start >= 0 && start <= end && end <= this.size)) {
      throw fileError(this.name, `bytes ${start}..${end} lie outside the file (${this.size} bytes)`);
    }
    if (start === end) return new Uint8Array(0);
    const first = Math.floor(start / this.partBytes);
    const last = Math.floor((end - 1) / this.partBytes);
    for (let attempt = 0; ; attempt++) {
      const pieces = [];
      for (let i = first; i <= last; i++) {
        const [a] = this.extent(i);
        const blob = await this.part(i);
        pieces.push(blob.slice(Math.max(start, a) - a, Math.min(end, a + blob.size) - a));
      }
      try {
        const bytes = new Uint8Array(await new Blob(pieces).arrayBuffer());
        throwIfAborted(this.signal, this.name);
        if (bytes.length === end - start) return bytes;
        throw new Error(`${bytes.length} bytes came back for ${end - start}`);
      } catch (e) {
        if (isAbort(e, this.signal)) throw abortError(this.name);
        if (attempt > 0) throw fileError(this.name, `could not read bytes ${start}..${end} of the offline copy (${e.message})`);
        // Storage that no longer reads back (cleared by the browser, damaged on disk):
        // those parts are downloaded again.
        for (let i = first; i <= last; i++) await this.evict(i);
      }
    }
  }

  /** Part `i` as a checked Blob: from the cache, else downloaded. */
  part(i) {
    if (this.blobs.has(i)) return Promise.resolve(this.blobs.get(i));
    if (!this.pending.has(i)) {
      const p = (async () => (await this.cached(i)) ?? (await this.download(i)))();
      this.pending.set(i, p);
      p.finally(() => this.pending.delete(i)).catch(() => {});
    }
    return this.pending.get(i);
  }

  /** Part `i` from the cache if it is there whole; a part of another size is evicted. */
  async cached(i) {
    if (!this.cache) return null;
    const key = entryKey(this.url, i);
    const hit = await this.cache.match(key);
    if (!hit) return null;
    const [a, b] = this.extent(i);
    let blob = null;
    try {
      blob = await hit.blob();
    } catch {
      blob = null; // unreadable storage: fetch it again
    }
    if (blob && blob.size === b - a && contentLength(hit) === b - a) {
      this.hold(i, blob);
      this.report(0, true);
      return blob;
    }
    await this.cache.delete(key).catch(() => {});
    this.fetcher.warn(`The offline copy of part ${i + 1} of ${this.parts} of ${this.name} was incomplete; downloading it again.`);
    return null;
  }

  /** Whether part `i` is neither at hand nor whole in the cache. */
  async missing(i) {
    return !this.blobs.has(i) && !(await this.cached(i));
  }

  async evict(i) {
    if (this.blobs.has(i)) this.available -= this.blobs.get(i).size;
    this.blobs.delete(i);
    if (this.cache) await this.cache.delete(entryKey(this.url, i)).catch(() => {});
  }

  /** Keeps part `i` (exactly its extent) in the cache and in `blobs`; resolves to its Blob. */
  async store(i, blob) {
    const [a, b] = this.extent(i);
    if (blob.size !== b - a) throw fileError(this.name, `part ${i + 1} came to ${blob.size} bytes instead of ${b - a}`);
    let kept = blob;
    const key = entryKey(this.url, i);
    const response = new Response(blob, { headers: { 'content-length': String(blob.size) } });
    if (this.cache && (await this.fetcher.keep(this.cache, key, this.name, response))) {
      // The cache's copy lives on disk: the downloaded bytes can go.
      kept = (await (await this.cache.match(key))?.blob()) ?? blob;
    }
    this.hold(i, kept);
    return kept;
  }

  /**
   * Downloads part `i` with Range requests, resuming from the byte it stands at when a
   * connection drops; gives up after ATTEMPTS tries in a row that bring no new byte.
   */
  async download(i) {
    const [a, b] = this.extent(i);
    const chunks = [];
    let have = 0;
    let fruitless = 0;
    for (;;) {
      const before = this.available + have;
      try {
        if (this.wholeOnly) {
          await this.streamWhole(await this.request(null));
        } else {
          const response = await this.request([a + have, b]);
          if (response.status === 200) {
            this.wholeOnly = true;
            await this.streamWhole(response);
          } else {
            await this.checkVersion(response, a + have);
            have = await this.receive(response, chunks, have, a, b);
            if (have === b - a) return this.store(i, new Blob(chunks));
            throw retry(`the connection closed after ${have} of the ${b - a} bytes of part ${i + 1} of ${this.parts}`);
          }
        }
        if (this.blobs.has(i)) return this.blobs.get(i);
        throw retry(`the connection closed before part ${i + 1} of ${this.parts} arrived`);
      } catch (e) {
        if (isAbort(e, this.signal)) throw abortError(this.name);
        if (!e.retry) throw e;
        fruitless = this.available + have > before ? 1 : fruitless + 1;
        if (fruitless >= ATTEMPTS) {
          throw fileError(
            this.name,
            `the download failed ${ATTEMPTS} times in a row (${e.message}); the parts already downloaded are kept, so loading again continues from there`,
          );
        }
        await sleep(RETRY_MS * 2 ** (fruitless - 1), this.signal, this.name);
      }
    }
  }

  /** GET of bytes [start, end) (`range` null: the whole file); network failures and 5xx are worth retrying. */
  async request(range) {
    let response;
    try {
      const headers = range ? { Range: `bytes=${range[0]}-${range[1] - 1}` } : {};
      // no-store: the parts are kept in Cache Storage, so the HTTP cache would hold them twice.
      response = await fetch(this.url, { headers, cache: 'no-store', signal: this.signal });
    } catch (e) {
      if (isAbort(e, this.signal)) throw e;
      throw retry(`cannot download ${this.url}: ${e.message}`);
    }
    if (response.status >= 500) throw retry(`HTTP ${response.status} for ${this.url}`);
    if (range ? response.status !== 206 && response.status !== 200 : response.status !== 200) {
      throw fileError(this.name, `HTTP ${response.status} for ${this.url}`);
    }
    return response;
  }

  /** Refuses a ranged answer from another version of the file, or for other bytes than asked. */
  async checkVersion(response, start) {
    const etag = response.headers.get('etag');
    const range = /^bytes (\d+)-\d+\/(\d+|\*)$/.exec(response.headers.get('content-range') ?? '');
    if (range && Number(range[1]) !== start) {
      response.body?.cancel().catch(() => {});
      throw fileError(this.name, `asked for bytes from ${start}, the server sent them from ${range[1]}`);
    }
    const changed = (this.etag && etag && etag !== this.etag) || (range && range[2] !== '*' && Number(range[2]) !== this.size);
    if (changed) {
      response.body?.cancel().catch(() => {});
      throw await this.changed();
    }
  }

  /**
   * The file on the server is not the one whose parts are kept: they are all forgotten
   * before the load fails, so nothing of the old version outlives the error.
   */
  async changed() {
    if (this.cache) await forget(this.cache, this.url).catch(() => {});
    return fileError(
      this.name,
      `the file at ${this.url} changed on the server since its first parts were downloaded; they were deleted, so loading again downloads it anew`,
    );
  }

  /** Reads a ranged body into `chunks`, part `[a, b)` standing at `have` bytes; resolves to where it stands after. */
  async receive(response, chunks, have, a, b) {
    const reader = response.body.getReader();
    const t0 = performance.now();
    let got = 0;
    try {
      for (;;) {
        throwIfAborted(this.signal, this.name);
        let step;
        try {
          step = await reader.read();
        } catch (e) {
          if (isAbort(e, this.signal)) throw e;
          return have; // cut off: the caller resumes from here
        }
        if (step.done) return have;
        if (have + step.value.length > b - a) throw fileError(this.name, `the server sent more than the ${b - a} bytes asked for`);
        chunks.push(step.value);
        have += step.value.length;
        got += step.value.length;
        this.report(have, false, got / Math.max(1e-3, (performance.now() - t0) / 1000));
      }
    } catch (e) {
      reader.cancel().catch(() => {});
      throw e;
    }
  }

  /**
   * A server that ignores Range sends the whole file: it is cut into parts as it arrives,
   * keeping every part not kept yet (the body must be read through either way, and
   * stopping early would make each later part download the file from its start again).
   */
  async streamWhole(response) {
    const declared = contentLength(response);
    if (declared !== null && declared !== this.size) {
      response.body?.cancel().catch(() => {});
      throw await this.changed();
    }
    if (this.etag && response.headers.get('etag') && response.headers.get('etag') !== this.etag) {
      response.body?.cancel().catch(() => {});
      throw await this.changed();
    }
    const reader = response.body.getReader();
    const t0 = performance.now();
    let at = 0; // bytes of the body read
    let i = 0;
    let chunks = [];
    let keep = await this.missing(i);
    try {
      for (;;) {
        throwIfAborted(this.signal, this.name);
        let step;
        try {
          step = await reader.read();
        } catch (e) {
          if (isAbort(e, this.signal)) throw e;
          return; // cut off: the caller tries again
        }
        if (step.done) return;
        let chunk = step.value;
        if (at + chunk.length > this.size) throw fileError(this.name, `the server sent more than the file's ${this.size} bytes`);
        while (chunk.length) {
          const [, b] = this.extent(i);
          const take = Math.min(chunk.length, b - at);
          if (keep) chunks.push(chunk.subarray(0, take));
          at += take;
          chunk = chunk.subarray(take);
          if (at === b) {
            if (keep) await this.store(i, new Blob(chunks));
            chunks = [];
            i += 1;
            keep = i < this.parts && (await this.missing(i));
          }
        }
        this.report(keep ? at - this.extent(i)[0] : 0, false, at / Math.max(1e-3, (performance.now() - t0) / 1000));
      }
    } catch (e) {
      reader.cancel().catch(() => {});
      throw e;
    }
  }
}

/** A streamed file's bookkeeping {size, partBytes, etag} from the cache; malformed bookkeeping is forgotten with the file's parts. */
async function readBookkeeping(cache, url) {
  const hit = await cache.match(entryKey(url, null));
  if (!hit) return null;
  let book = null;
  try {
    book = await hit.json();
  } catch {
    book = null;
  }
  const count = (n) => Number.isSafeInteger(n) && n > 0;
  if (book && count(book.size) && count(book.partBytes) && (book.etag === null || typeof book.etag === 'string')) return book;
  await forget(cache, url);
  return null;
}

/** Deletes every entry of the file at `url`: its bookkeeping, its parts, a whole copy. */
async function forget(cache, url) {
  for (const request of await cache.keys()) {
    if (entryOf(request.url).file === url) await cache.delete(request);
  }
}

function contentLength(response) {
  const v = response.headers.get('content-length');
  if (v === null || v.trim() === '') return null;
  const n = Number(v);
  return Number.isSafeInteger(n) && n >= 0 ? n : null;
}

function sleep(ms, signal, name) {
  return new Promise((resolve, reject) => {
    const done = () => {
      clearTimeout(timer);
      reject(abortError(name));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener('abort', done);
      resolve();
    }, ms);
    if (signal?.aborted) done();
    else signal?.addEventListener('abort', done, { once: true });
  });
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

/** A failure worth another try (a dropped connection, a server error). */
function retry(message) {
  const e = new Error(message);
  e.retry = true;
  return e;
}

function unreachable(name, url, e) {
  return fileError(name, `cannot download ${url} (${e.message}); offline and not cached?`);
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
