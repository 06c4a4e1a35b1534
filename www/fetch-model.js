// Gathers a model's files as [{name, bytes: Uint8Array}] for Model.load: from a folder URL
// (a Hugging Face `resolve/main/` folder, or the bundled `models/…/`), from a .gguf URL, or
// from files the user picked. Downloads from other origins are kept in Cache Storage so
// the next visit works offline; the page's own files are not, so an updated bundled model
// is never shadowed by a stale copy.

const CACHE = 'medphi-models-v1';
// WebAssembly (wasm32) memory ends at 4 GiB and the weights are copied into it whole, so
// refuse bigger models before downloading gigabytes: Phi-2 in f16 (5.6 GB) does not fit,
// its q4_0/q8_0 GGUF (1.6/3.0 GB) does.
const MAX_MODEL_BYTES = 3.5 * 2 ** 30;

function tooBig(name, bytes) {
  return fileError(
    name,
    `the model is ${(bytes / 2 ** 30).toFixed(1)} GB, more than the ${MAX_MODEL_BYTES / 2 ** 30} GB a browser tab can hold ` +
      'in WebAssembly memory; use a quantized GGUF (q4_0 or q8_0) of it',
  );
}

export async function loadFiles(source, { progress, warn }) {
  if (source.files) return readLocal(source.files, progress);
  if (!source.url) throw inputError('give a model URL or files');
  const url = new URL(source.url, self.location.href);
  const fetcher = new Fetcher(url.origin !== self.location.origin, progress, warn);
  if (url.pathname.endsWith('.gguf')) {
    return [await fetcher.file(url.href, url.pathname.split('/').pop())];
  }
  const base = url.href.endsWith('/') ? url.href : `${url.href}/`;
  const files = [
    await fetcher.file(base + 'config.json', 'config.json'),
    await fetcher.file(base + 'tokenizer.json', 'tokenizer.json'),
  ];
  const single = await fetcher.file(base + 'model.safetensors', 'model.safetensors', { optional: true });
  if (single) return [...files, single];
  const index = await fetcher.file(base + 'model.safetensors.index.json', 'model.safetensors.index.json', {
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
    if (shard.includes('/') || shard.includes('..')) throw fileError('model.safetensors.index.json', `bad shard name ${shard}`);
    files.push(await fetcher.file(base + shard, shard));
  }
  return [...files, index];
}

class Fetcher {
  constructor(useCache, progress, warn) {
    this.useCache = useCache && 'caches' in self;
    this.progress = progress;
    this.warn = warn;
    this.declared = 0;
  }

  async file(url, name, { optional = false } = {}) {
    const cache = this.useCache ? await self.caches.open(CACHE) : null;
    const hit = cache ? await cache.match(url) : undefined;
    let response;
    try {
      response = hit || (await fetch(url));
    } catch (e) {
      throw fileError(name, `cannot download ${url} (${e.message}); offline and not cached?`);
    }
    if (response.status === 404 && optional) return null;
    if (!response.ok) throw fileError(name, `HTTP ${response.status} for ${url}`);
    this.declared += Number(response.headers.get('content-length')) || 0;
    if (this.declared > MAX_MODEL_BYTES) throw tooBig(name, this.declared);
    const bytes = await this.read(response, name, Boolean(hit));
    if (cache && !hit) {
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
    return { name, bytes };
  }

  async read(response, name, cached) {
    const total = Number(response.headers.get('content-length')) || 0;
    const reader = response.body.getReader();
    const chunks = [];
    let loaded = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      chunks.push(value);
      loaded += value.length;
      if (loaded > MAX_MODEL_BYTES) throw tooBig(name, loaded);
      this.progress({ file: name, loaded, total, cached });
    }
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

async function readLocal(files, progress) {
  const total = files.reduce((a, f) => a + f.size, 0);
  if (total > MAX_MODEL_BYTES) throw tooBig(files.map((f) => f.name).join(', '), total);
  const out = [];
  for (const f of files) {
    progress({ file: f.name, loaded: 0, total: f.size, cached: false });
    out.push({ name: f.name, bytes: new Uint8Array(await f.arrayBuffer()) });
    progress({ file: f.name, loaded: f.size, total: f.size, cached: false });
  }
  return out;
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
