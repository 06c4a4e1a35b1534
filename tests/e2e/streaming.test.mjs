// End-to-end tests of weights streamed into the page (www/fetch-model.js, www/worker.js): a
// safetensors checkpoint from another origin is read tensor by tensor with HTTP Range
// requests and kept in Cache Storage in parts; dropped connections resume, broken parts are
// evicted, a second visit works offline, an abort stops the reading, wasm memory stays far
// below the checkpoint's size, and a GGUF streams in the same way (header first). Same harness as layouts.test.mjs (www/pkg built by scripts/build-web.sh,
// python's http.server serving the repository root, Debian's headless Chromium) plus a
// cross-origin server that answers Range requests as Hugging Face does, logs every request
// and can cut or stall one. Measurements go to target/e2e/streaming.json.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { closeSync, copyFileSync, createReadStream, existsSync, mkdirSync, openSync, readFileSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { resolve } from 'node:path';
import { launchChromium } from './harness.mjs';

const root = new URL('../../', import.meta.url).pathname;
const out = `${root}target/e2e`;
const reference = JSON.parse(readFileSync(`${root}tests/fixtures/reference.json`, 'utf8'));
const PROMPT = reference.prompt;
const N = 16; // greedy tokens compared with the references
const CACHE = 'medphi-models-v1';
const MSFT_DIR = 'tests/fixtures/tiny-phi-msft/';
const SHARD1 = 'model-00001-of-00002.safetensors';
const SHARD2 = 'model-00002-of-00002.safetensors';
const FIXTURE = '../tests/fixtures/tiny-phi/'; // same origin: loaded whole, the model in use before
const BIG_DIR = 'target/e2e/big-phi/';
const metrics = {};

/** The int64 tensors of a safetensors file (8-byte little-endian header length, JSON header, data). */
function int64Tensors(path) {
  const b = readFileSync(path);
  const n = Number(b.readBigUInt64LE(0));
  const header = JSON.parse(b.subarray(8, 8 + n).toString('utf8'));
  const data = b.subarray(8 + n);
  const tensors = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__' || t.dtype !== 'I64') continue;
    const [start, end] = t.data_offsets;
    tensors[name] = Array.from({ length: (end - start) / 8 }, (_, i) => Number(data.readBigInt64LE(start + 8 * i)));
  }
  return tensors;
}

// transformers' greedy ids for PROMPT on the phi-msft checkpoint.
const layouts = int64Tensors(`${root}tests/fixtures/layouts_reference.safetensors`);
const MSFT_IDS = layouts.msft_greedy_ids.slice(0, N);

// ---- a big checkpoint, written here ---------------------------------------------------
// Phi-2's vocabulary and layout, narrow and deep enough to load in seconds on SwiftShader:
// 532 MB of f32 weights whose biggest tensors (the embedding and the output layer, 52 MB
// each) are a tenth of the file. (Model.load holds the tensor being uploaded about three
// times over, so a checkpoint of a few tensors would measure those copies, not streaming.)
const BIG = { vocab: 51200, hidden: 256, layers: 24, intermediate: 8192, heads: 4 };

/** Writes a random f32 `phi` checkpoint of shape `BIG` to BIG_DIR (kept while its size fits); returns the weight file's size. */
function writeBigCheckpoint() {
  const dir = `${root}${BIG_DIR}`;
  mkdirSync(dir, { recursive: true });
  const { vocab, hidden, layers, intermediate, heads } = BIG;
  const tensors = [
    ['model.embed_tokens.weight', [vocab, hidden]],
    ['model.final_layernorm.weight', [hidden]],
    ['model.final_layernorm.bias', [hidden]],
    ['lm_head.weight', [vocab, hidden]],
    ['lm_head.bias', [vocab]],
  ];
  for (let l = 0; l < layers; l++) {
    const p = `model.layers.${l}.`;
    tensors.push([`${p}input_layernorm.weight`, [hidden]], [`${p}input_layernorm.bias`, [hidden]]);
    for (const m of ['q_proj', 'k_proj', 'v_proj', 'dense']) tensors.push([`${p}self_attn.${m}.weight`, [hidden, hidden]], [`${p}self_attn.${m}.bias`, [hidden]]);
    tensors.push([`${p}mlp.fc1.weight`, [intermediate, hidden]], [`${p}mlp.fc1.bias`, [intermediate]]);
    tensors.push([`${p}mlp.fc2.weight`, [hidden, intermediate]], [`${p}mlp.fc2.bias`, [hidden]]);
  }
  const header = {};
  let offset = 0;
  for (const [name, shape] of tensors) {
    const bytes = 4 * shape.reduce((a, b) => a * b, 1);
    header[name] = { dtype: 'F32', shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8); // tensor data 8-byte aligned, as safetensors writes it
  const size = 8 + json.length + offset;
  const weights = `${dir}model.safetensors`;
  const base = JSON.parse(readFileSync(`${root}tests/fixtures/tiny-phi/config.json`, 'utf8'));
  const config = {
    ...base,
    _name_or_path: 'medphi/e2e-big-random-phi',
    vocab_size: vocab,
    hidden_size: hidden,
    intermediate_size: intermediate,
    num_hidden_layers: layers,
    num_attention_heads: heads,
    num_key_value_heads: heads,
  };
  writeFileSync(`${dir}config.json`, JSON.stringify(config, null, 2));
  copyFileSync(`${root}tests/fixtures/tiny-phi/tokenizer.json`, `${dir}tokenizer.json`);
  if (existsSync(weights) && statSync(weights).size === size) return size;
  const fd = openSync(weights, 'w');
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(json.length));
  writeSync(fd, len);
  writeSync(fd, json);
  let state = 0x9e3779b9; // xorshift32: the same weights on every run
  for (const [name, shape] of tensors) {
    const values = new Float32Array(shape.reduce((a, b) => a * b, 1));
    if (name.endsWith('layernorm.weight')) values.fill(1);
    else {
      for (let i = 0; i < values.length; i++) {
        state ^= state << 13;
        state ^= state >>> 17;
        state ^= state << 5;
        values[i] = ((state >>> 0) / 2 ** 32 - 0.5) * 0.1;
      }
    }
    writeSync(fd, new Uint8Array(values.buffer));
  }
  closeSync(fd);
  return size;
}

// ---- the "remote" server -------------------------------------------------------------
// Serves tests/fixtures/ and BIG_DIR from another origin the way Hugging Face's resolve/
// URLs do: HEAD, single `Range: bytes=a-b` requests answered 206 with Content-Range, an ETag,
// and CORS that lets a page send Range and read those headers. `log` records each request;
// a fault ({path, ranged?, start?, act(req, res, file, size, range)}) takes over the first GET
// it matches (of `path`; ranged or not; asking from byte `start`).
const log = [];
const faults = [];
const etags = {}; // path → ETag overriding the file's own
let remote;
let remoteBase;

function etagOf(path, file) {
  return etags[path] ?? `"${statSync(file).size}-${Math.floor(statSync(file).mtimeMs)}"`;
}

function parseRange(header) {
  const m = /^bytes=(\d+)-(\d*)$/.exec(header ?? '');
  return m ? { start: Number(m[1]), end: m[2] === '' ? null : Number(m[2]) } : null;
}

function startRemote() {
  remote = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname).slice(1);
    log.push({ method: req.method, path, range: req.headers.range ?? null });
    res.setHeader('Access-Control-Allow-Origin', '*');
    res.setHeader('Access-Control-Expose-Headers', 'Content-Range, ETag, Accept-Ranges');
    if (req.method === 'OPTIONS') {
      res.writeHead(204, { 'Access-Control-Allow-Headers': 'Range', 'Access-Control-Allow-Methods': 'GET, HEAD' }).end();
      return;
    }
    const file = resolve(root, path);
    const range = parseRange(req.headers.range);
    const fault = faults.find(
      (f) => f.path === path && req.method === 'GET' && (f.ranged === undefined || f.ranged === Boolean(range)) && (f.start === undefined || f.start === range?.start),
    );
    if (fault) {
      faults.splice(faults.indexOf(fault), 1);
      await fault.act(req, res, file, existsSync(file) ? statSync(file).size : null, range);
      return;
    }
    const allowed = ['tests/fixtures/', BIG_DIR].some((dir) => file.startsWith(resolve(root, dir) + '/'));
    if (!allowed || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    const size = statSync(file).size;
    const headers = { 'Content-Type': 'application/octet-stream', 'Accept-Ranges': 'bytes', ETag: etagOf(path, file) };
    if (range && req.method === 'GET') {
      const end = Math.min(range.end ?? size - 1, size - 1);
      if (range.start > end) {
        res.writeHead(416, { 'Content-Range': `bytes */${size}` }).end();
        return;
      }
      res.writeHead(206, { ...headers, 'Content-Range': `bytes ${range.start}-${end}/${size}`, 'Content-Length': end - range.start + 1 });
      createReadStream(file, { start: range.start, end }).pipe(res);
      return;
    }
    res.writeHead(200, { ...headers, 'Content-Length': size });
    if (req.method === 'HEAD') res.end();
    else createReadStream(file).pipe(res);
  });
  return new Promise((done) => {
    remote.listen(0, '127.0.0.1', () => {
      // "localhost" is another origin than the page's 127.0.0.1: its weights stream in parts.
      remoteBase = `http://localhost:${remote.address().port}/`;
      done();
    });
  });
}

/** The ranged GETs of `path` logged since `from`, as [start, end] (end inclusive). */
function rangesOf(path, from = 0) {
  return log
    .slice(from)
    .filter((r) => r.path === path && r.method === 'GET' && r.range)
    .map((r) => {
      const { start, end } = parseRange(r.range);
      return [start, end];
    });
}

/** A fault: answers the asked range 206, sends `bytes` of it, then drops the connection. */
function cutAfter(path, bytes, cut) {
  return {
    path,
    ranged: true,
    act: (req, res, file, size, range) =>
      new Promise((done) => {
        const end = Math.min(range.end ?? size - 1, size - 1);
        res.writeHead(206, {
          'Content-Type': 'application/octet-stream',
          'Content-Range': `bytes ${range.start}-${end}/${size}`,
          'Content-Length': end - range.start + 1,
          ETag: etagOf(path, file),
        });
        const body = readFileSync(file).subarray(range.start, range.start + bytes);
        // Sent and given time to arrive, then the socket is destroyed mid-body.
        res.write(body, () =>
          setTimeout(() => {
            cut.at = range.start + bytes;
            res.destroy();
            done();
          }, 300),
        );
      }),
  };
}

let server;
let base;
let browser;
let bigSize;

before(async () => {
  mkdirSync(out, { recursive: true });
  bigSize = writeBigCheckpoint();
  server = spawn('python3', ['-u', '-m', 'http.server', '0', '--bind', '127.0.0.1', '--directory', root], {
    stdio: ['ignore', 'pipe', 'ignore'], // its request log would drown the test report
  });
  base = await new Promise((done, reject) => {
    server.stdout.on('data', (d) => {
      const m = String(d).match(/port (\d+)/);
      if (m) done(`http://127.0.0.1:${m[1]}/www/`);
    });
    server.on('exit', (code) => reject(new Error(`http.server exited with ${code}`)));
  });
  await startRemote();
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  server?.kill();
  remote?.closeAllConnections?.();
  remote?.close();
  writeFileSync(`${out}/streaming.json`, JSON.stringify(metrics, null, 2));
  console.log('streaming metrics:', JSON.stringify(metrics));
});

/** A fresh page (its own Cache Storage) that records console errors, once the bundled model is ready. */
async function openPage() {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(base);
  await page.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  return { page, errors, context };
}

/** Console errors other than the browser's own log of a failed request. */
function unexpected(errors) {
  return errors.filter((e) => !/Failed to load resource|ERR_/.test(e));
}

/** In the page: awaits `promise`, turning a rejection into {error: {name, message}}. */
const SETTLE = `async (p) => { try { return { value: await p }; } catch (e) { return { error: { name: e.name, message: e.message } }; } }`;

async function settle(page, fn, arg) {
  return page.evaluate(`(async () => { const settle = ${SETTLE}; return (${fn})(settle, ${JSON.stringify(arg)}); })()`);
}

const msftUrl = () => `${remoteBase}${MSFT_DIR}`;

/**
 * Plants the cache bookkeeping of the two phi-msft shards with small parts (64 KiB and
 * 16 KiB), as a page that used those part sizes would have left it: a file keeps the part
 * size it was first stored with, so the 6.4 MB shard is read from 102 parts, its tensors
 * straddling their edges, without a test-only switch in the page.
 */
async function plantSmallParts(page) {
  const books = {};
  for (const [shard, partBytes] of [
    [SHARD1, 64 * 1024],
    [SHARD2, 16 * 1024],
  ]) {
    const file = `${root}${MSFT_DIR}${shard}`;
    books[`${msftUrl()}${shard}?medphi=parts`] = { size: statSync(file).size, partBytes, etag: etagOf(`${MSFT_DIR}${shard}`, file) };
  }
  await page.evaluate(
    async ([name, books]) => {
      const cache = await caches.open(name);
      for (const [key, book] of Object.entries(books)) await cache.put(key, new Response(JSON.stringify(book)));
    },
    [CACHE, books],
  );
}

/** {key (path and query): body bytes} of what the page's Cache Storage holds for `dir`. */
async function cached(page, dir) {
  return page.evaluate(
    async ([name, prefix]) => {
      const cache = await caches.open(name);
      const found = {};
      for (const req of await cache.keys()) {
        const u = new URL(req.url);
        if (u.href.startsWith(prefix)) found[u.pathname.slice(1) + u.search] = (await (await cache.match(req)).arrayBuffer()).byteLength;
      }
      return found;
    },
    [CACHE, `${remoteBase}${dir}`],
  );
}

// ---- streaming -----------------------------------------------------------------------

test("a cross-origin safetensors folder streams in by Range requests, in parts, and gives transformers' greedy ids on both backends", async () => {
  const { page, errors, context } = await openPage();
  await plantSmallParts(page);
  const from = log.length;
  // Through the model panel, so that its progress line is seen.
  await page.click('#model-panel summary');
  await page.check('input[name=source][value=url]');
  await page.fill('#model-url', msftUrl());
  await page.selectOption('#gpu-kernels', 'emulator');
  await page.check('input[name=backend][value=webgpu]');
  await page.evaluate(() => {
    window.details = [];
    new MutationObserver(() => window.details.push(document.getElementById('load-detail').textContent)).observe(
      document.getElementById('load-detail'),
      { childList: true, characterData: true, subtree: true },
    );
  });
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("Ready: tiny-phi-msft")', { timeout: 120_000 });
  const r = await page.evaluate(
    async ([url, prompt, n]) => {
      const m = window.medphi;
      const generate = () => m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      const out = { webgpuInfo: m.info, webgpu: await generate(), details: window.details };
      const events = [];
      out.cpuInfo = await m.load({ url, backend: 'cpu', onProgress: (p) => events.push(p) });
      out.cpu = await generate();
      out.events = events;
      out.listed = await m.cachedModels();
      return out;
    },
    [msftUrl(), PROMPT, N],
  );
  assert.equal(r.webgpuInfo.backend, 'webgpu');
  assert.equal(r.cpuInfo.backend, 'cpu');
  assert.deepEqual(r.webgpu.inputIds, layouts.input_ids);
  assert.deepEqual(r.webgpu.outputIds, MSFT_IDS, 'webgpu: greedy ids of the streamed shards');
  assert.deepEqual(r.cpu.outputIds, MSFT_IDS, 'cpu: greedy ids of the shards read back from their cached parts');

  // Every part of both shards was asked for once, by its byte range, and nothing else of them
  // was downloaded: the second load read them from the cache.
  for (const [shard, partBytes] of [
    [SHARD1, 64 * 1024],
    [SHARD2, 16 * 1024],
  ]) {
    const size = statSync(`${root}${MSFT_DIR}${shard}`).size;
    const want = Array.from({ length: Math.ceil(size / partBytes) }, (_, i) => [i * partBytes, Math.min(size, (i + 1) * partBytes) - 1]);
    assert.deepEqual(rangesOf(`${MSFT_DIR}${shard}`, from).sort((a, b) => a[0] - b[0]), want, `${shard}: one Range request per part`);
    assert.equal(log.slice(from).filter((q) => q.path === `${MSFT_DIR}${shard}` && q.method === 'GET' && !q.range).length, 0, `${shard}: never downloaded whole`);
  }
  // The progress line named tensors and gave the download's speed.
  console.log(r.details.slice(0,5).join('\n'));
  assert.ok(r.details.some((d) => /converting model\.embed_tokens\.weight \(1\/\d+\)/.test(d)), r.details.slice(-3).join('\n'));
  assert.ok(r.details.some((d) => /model-00001-of-00002\.safetensors: [\d.]+ MB of 6\.\d MB, [\d.]+ MB\/s/.test(d)), r.details.slice(-3).join('\n'));
  // The cached load reported its tensors in order and its parts as from the cache.
  const tensors = r.events.filter((p) => p.tensor !== undefined);
  assert.ok(tensors.length > 10, `${tensors.length} tensor events`);
  assert.deepEqual(tensors.map((p) => p.index), tensors.map((_, i) => i));
  assert.ok(tensors.every((p) => p.total === tensors.length), 'every tensor event gives the same total');
  assert.ok(r.events.some((p) => p.file === SHARD1 && p.cached && p.loaded === p.total), 'the shard came from the offline cache');
  // The cached-models list sums the parts to the files' sizes.
  const listed = r.listed.find((m) => m.url === msftUrl());
  for (const shard of [SHARD1, SHARD2]) {
    assert.equal(listed.files.find((f) => f.name === shard)?.bytes, statSync(`${root}${MSFT_DIR}${shard}`).size, shard);
  }
  // Delete removes every part and the bookkeeping.
  await page.evaluate((url) => window.medphi.deleteCachedModel(url), msftUrl());
  assert.deepEqual(await cached(page, MSFT_DIR), {});
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('a connection cut mid-part is resumed with a Range request from the byte it stopped at', async () => {
  const { page, errors, context } = await openPage();
  const path = `${MSFT_DIR}${SHARD1}`;
  const size = statSync(`${root}${path}`).size;
  const cut = {};
  faults.push(cutAfter(path, 1 << 20, cut));
  const from = log.length;
  const r = await page.evaluate(
    async ([url, prompt, n]) => {
      const m = window.medphi;
      const info = await m.load({ url, backend: 'cpu' });
      return { info, g: await m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 }) };
    },
    [msftUrl(), PROMPT, N],
  );
  assert.deepEqual(r.g.outputIds, MSFT_IDS, 'greedy ids after the resumed download');
  assert.equal(cut.at, 1 << 20, 'the server cut the first download after 1 MiB');
  const ranges = rangesOf(path, from);
  // The whole file is one part (64 MiB parts): asked for whole, then from where it was cut.
  assert.deepEqual(ranges, [
    [0, size - 1],
    [1 << 20, size - 1],
  ]);
  assert.deepEqual(Object.keys(await cached(page, path)).sort(), [`${path}?medphi=part-0`, `${path}?medphi=parts`]);
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('a broken cached part is evicted and downloaded again, and parts of a file that changed on the server are dropped', async () => {
  const { page, errors, context } = await openPage();
  await plantSmallParts(page);
  const path = `${MSFT_DIR}${SHARD1}`;
  const load = () =>
    settle(
      page,
      async (settle, [url, prompt, n]) => {
        const m = window.medphi;
        const warnings = [];
        const onWarning = (e) => warnings.push(e.detail);
        m.addEventListener('warning', onWarning);
        const info = await settle(m.load({ url, backend: 'cpu' }));
        m.removeEventListener('warning', onWarning);
        if (info.error) return { info, warnings };
        return { info, warnings, g: await m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 }) };
      },
      [msftUrl(), PROMPT, N],
    );
  assert.deepEqual((await load()).g?.outputIds, MSFT_IDS, 'the first load');
  // Part 3 (bytes 196608..262143) as an interrupted write would leave it: 1 KB of it,
  // recorded with the part's full length.
  const key = `${msftUrl()}${SHARD1}?medphi=part-3`;
  const planted = await page.evaluate(
    async ([name, key]) => {
      const cache = await caches.open(name);
      await cache.put(key, new Response(new Uint8Array(1024), { headers: { 'content-length': String(65536) } }));
      return (await (await cache.match(key)).arrayBuffer()).byteLength;
    },
    [CACHE, key],
  );
  assert.equal(planted, 1024, 'the test could not plant a truncated part');
  let from = log.length;
  const again = await load();
  assert.deepEqual(again.g?.outputIds, MSFT_IDS, JSON.stringify(again.info));
  assert.deepEqual(rangesOf(path, from), [[196608, 262143]], 'only the broken part was downloaded again');
  assert.ok(again.warnings.some((w) => /part 4 of 102 of model-00001-of-00002\.safetensors was incomplete/.test(w)), again.warnings.join('\n'));
  assert.equal((await cached(page, path))[`${path}?medphi=part-3`], 65536, 'the part is whole in the cache now');

  // The file changes on the server (a new commit on resolve/main) while one part is missing:
  // a part of the new file must never be mixed with the old ones.
  etags[path] = '"a-new-version"';
  await page.evaluate(async ([name, key]) => (await caches.open(name)).delete(key), [CACHE, key]);
  from = log.length;
  const changed = await load();
  assert.equal(changed.info.error?.name, 'FileError', JSON.stringify(changed.info));
  assert.match(changed.info.error.message, /changed on the server since its first parts were downloaded/);
  assert.deepEqual(Object.keys(await cached(page, path)), [], 'the old parts and bookkeeping were deleted');
  const fresh = await load();
  assert.deepEqual(fresh.g?.outputIds, MSFT_IDS, 'the file downloaded anew');
  delete etags[path];
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('a second visit loads from the cache with the server unreachable', async () => {
  const { page, errors, context } = await openPage();
  const load = () =>
    page.evaluate(
      async ([url, prompt, n]) => {
        const m = window.medphi;
        await m.load({ url, backend: 'webgpu', gpuKernels: 'emulator' });
        return m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      },
      [msftUrl(), PROMPT, N],
    );
  assert.deepEqual((await load()).outputIds, MSFT_IDS);
  const asked = [];
  await context.route(`${remoteBase}**`, (route) => {
    asked.push(route.request().url());
    return route.abort('internetdisconnected');
  });
  const from = log.length;
  assert.deepEqual((await load()).outputIds, MSFT_IDS, 'offline');
  assert.deepEqual(asked, [], 'nothing was asked of the network');
  assert.equal(log.length, from);
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('an abort while the weights stream in stops the reading, and the model in use keeps working', async () => {
  const { page, errors, context } = await openPage();
  await page.evaluate((url) => window.medphi.load({ url, backend: 'cpu' }), FIXTURE);
  await plantSmallParts(page);
  const path = `${MSFT_DIR}${SHARD1}`;
  const STALLED = 60 * 65536;
  // One part stalls: the server sends its headers and waits until the page goes away.
  const stalled = { asked: false, closed: false };
  faults.push({
    path,
    start: STALLED,
    act: (req, res, file, size, range) =>
      new Promise((done) => {
        stalled.asked = true;
        res.on('close', () => {
          stalled.closed = true;
          done();
        });
        res.writeHead(206, { 'Content-Range': `bytes ${range.start}-${range.end}/${size}`, 'Content-Length': range.end - range.start + 1 });
        res.flushHeaders();
      }),
  });
  await page.evaluate((url) => {
    window.abortLoad = new AbortController();
    window.tensors = [];
    window.loading = window.medphi
      .load({
        url,
        backend: 'cpu',
        signal: window.abortLoad.signal,
        onProgress: (p) => p.tensor !== undefined && window.tensors.push(p.tensor),
      })
      .then(
        (info) => ({ value: info }),
        (e) => ({ error: { name: e.name, message: e.message } }),
      );
  }, msftUrl());
  for (let i = 0; i < 600 && !stalled.asked; i++) await new Promise((res) => setTimeout(res, 50));
  assert.ok(stalled.asked, 'the load never reached the stalled part');
  const r = await page.evaluate(
    async ([prompt, n]) => {
      const t0 = performance.now();
      window.abortLoad.abort();
      const out = { aborted: await window.loading, abortMs: performance.now() - t0, tensors: [...window.tensors] };
      out.source = window.medphi.source;
      out.g = await window.medphi.generate({ prompt, maxNewTokens: n, temperature: 0 });
      return out;
    },
    [PROMPT, N],
  );
  assert.equal(r.aborted.error?.name, 'AbortError', JSON.stringify(r.aborted));
  assert.ok(r.abortMs < 1000, `abort took ${r.abortMs} ms`);
  assert.ok(r.tensors.length > 0, 'Model.load was reading tensors when it was aborted');
  for (let i = 0; i < 50 && !stalled.closed; i++) await new Promise((res) => setTimeout(res, 100));
  assert.ok(stalled.closed, 'the stalled download was dropped');
  // Nothing more is read after the abort: no further request for the file's parts.
  const after = log.length;
  await new Promise((res) => setTimeout(res, 1000));
  assert.equal(log.slice(after).filter((q) => q.path.startsWith(MSFT_DIR)).length, 0, 'requests after the abort');
  assert.equal(r.source.url, FIXTURE, 'the model loaded before is still in use');
  assert.deepEqual(r.g.inputIds, reference.input_ids, 'the model in use before answers');
  assert.deepEqual(r.g.outputIds, reference.greedy_ids.slice(0, N), 'the model in use before answers');
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

// ---- memory --------------------------------------------------------------------------

test('a big f32 checkpoint streams onto WebGPU with wasm memory under half its size, and onto the CPU converted to q4_0', async () => {
  const { page, errors, context } = await openPage();
  const url = `${remoteBase}${BIG_DIR}`;
  const measure = (page, options) =>
    page.evaluate(
      async ([url, options, prompt]) => {
        const m = window.medphi;
        let fastest = 0;
        const t0 = performance.now();
        const info = await m.load({ url, ...options, onProgress: (p) => (fastest = Math.max(fastest, p.bytesPerSecond ?? 0)) });
        const seconds = (performance.now() - t0) / 1000;
        const g = await m.generate({ prompt, format: 'raw', maxNewTokens: 4, temperature: 0 });
        return { info, seconds, fastest, g };
      },
      [url, options, PROMPT],
    );
  const r = { webgpu: await measure(page, { backend: 'webgpu', gpuKernels: 'emulator' }) };
  // Another page (its own worker and wasm memory, which never shrinks) of the same browser
  // profile: the CPU load reads the parts the first one kept.
  const second = await context.newPage();
  second.on('pageerror', (e) => errors.push(String(e)));
  await second.goto(base);
  await second.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  r.cpuQ4 = await measure(second, { backend: 'cpu', quantize: 'q4_0' });
  for (const [name, { info, seconds, fastest, g }] of Object.entries(r)) {
    metrics[name] = {
      weightFileBytes: bigSize,
      wasmMemoryBytes: info.wasmMemoryBytes,
      wasmMemoryOverFile: +(info.wasmMemoryBytes / bigSize).toFixed(3),
      loadSeconds: +seconds.toFixed(2),
      downloadMBps: fastest ? +(fastest / 1e6).toFixed(1) : null,
      decodeTokS: +g.decodeTokS.toFixed(2),
    };
    assert.equal(info.hidden, BIG.hidden, name);
    assert.equal(info.layers, BIG.layers, name);
    assert.ok(g.outputIds.length > 0, `${name}: generated nothing`);
    assert.ok(info.wasmMemoryBytes < bigSize / 2, `${name}: wasm memory ${info.wasmMemoryBytes} bytes for a ${bigSize}-byte file`);
  }
  assert.equal(r.webgpu.info.backend, 'webgpu');
  assert.ok(r.webgpu.fastest > 0, 'the download reported its speed');
  assert.equal(r.cpuQ4.info.backend, 'cpu');
  assert.equal(r.cpuQ4.info.quantize, 'q4_0');
  assert.equal(r.cpuQ4.fastest, 0, 'the CPU load downloaded nothing: it read the parts the first one kept');
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

// ---- GGUF ----------------------------------------------------------------------------

const GGUF = 'tests/fixtures/tiny-phi-q8_0.gguf';

test('a cross-origin GGUF streams in by Range requests, header first, and gives the whole file\'s ids on both backends; a picked one too', async () => {
  const { page, errors, context } = await openPage();
  const url = `${remoteBase}${GGUF}`;
  const size = statSync(`${root}${GGUF}`).size;
  const partBytes = 64 * 1024;
  // Small parts (a file keeps the part size it was first stored with), so that the header
  // and each tensor are read from parts of their own.
  await page.evaluate(
    async ([name, key, book]) => (await caches.open(name)).put(key, new Response(JSON.stringify(book))),
    [CACHE, `${url}?medphi=parts`, { size, partBytes, etag: etagOf(GGUF, `${root}${GGUF}`) }],
  );
  const notGguf = `${BIG_DIR}not-a-model.gguf`;
  writeFileSync(`${root}${notGguf}`, 'this is text, not GGUF'.repeat(10));
  const from = log.length;
  const r = await page.evaluate(
    async ([url, sameOrigin, bad, prompt, n]) => {
      const m = window.medphi;
      const generate = () => m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      const out = {};
      for (const backend of ['webgpu', 'cpu']) {
        const kernels = backend === 'webgpu' ? { gpuKernels: 'emulator' } : {};
        const events = [];
        out[backend] = { info: await m.load({ url, backend, ...kernels, onProgress: (p) => events.push(p) }), g: await generate(), events };
        out[`${backend}Whole`] = { info: await m.load({ url: sameOrigin, backend, ...kernels }), g: await generate() };
      }
      try {
        await m.load({ url: bad, backend: 'cpu' });
      } catch (e) {
        out.bad = { name: e.name, message: e.message };
      }
      out.after = await generate();
      return out;
    },
    [url, `../${GGUF}`, `${remoteBase}${notGguf}`, PROMPT, N],
  );
  for (const backend of ['webgpu', 'cpu']) {
    assert.equal(r[backend].info.backend, backend);
    assert.equal(r[backend].info.format, 'gguf');
    assert.ok(r[backend].g.outputIds.length === N, `${backend}: ${r[backend].g.outputIds.length} ids`);
    assert.deepEqual(r[backend].g.outputIds, r[`${backend}Whole`].g.outputIds, `${backend}: the streamed GGUF gives the ids of the same file read whole`);
    const tensors = r[backend].events.filter((p) => p.tensor !== undefined);
    assert.ok(tensors.length > 10 && tensors.every((p, i) => p.index === i), `${backend}: ${tensors.length} tensor events in order`);
  }
  // The first load asked for the header's parts first, then every part of the file once, by
  // its byte range; nothing downloaded it whole; the second load read the cache.
  const ranges = rangesOf(GGUF, from);
  assert.deepEqual(ranges[0], [0, partBytes - 1], 'the header comes first');
  const want = Array.from({ length: Math.ceil(size / partBytes) }, (_, i) => [i * partBytes, Math.min(size, (i + 1) * partBytes) - 1]);
  assert.deepEqual([...ranges].sort((a, b) => a[0] - b[0]), want, 'one Range request per part');
  assert.equal(log.slice(from).filter((q) => q.path === GGUF && q.method === 'GET' && !q.range).length, 0, 'never downloaded whole');
  // A file that is not GGUF is refused by name, and the model in use keeps working.
  assert.equal(r.bad?.name, 'FileError', JSON.stringify(r.bad));
  assert.match(r.bad.message, /not-a-model\.gguf: not a valid GGUF file: it does not start with the GGUF magic number/, r.bad.message);
  assert.deepEqual(r.after.outputIds, r.cpuWhole.g.outputIds);

  // Picked through the model panel: read with Blob.slice, the same ids.
  await page.click('#model-panel summary');
  await page.check('input[name=source][value=files]');
  await page.check('input[name=backend][value=cpu]');
  await page.setInputFiles('#model-files', `${root}${GGUF}`);
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("Ready: tiny-phi-q8_0")', { timeout: 120_000 });
  const picked = await page.evaluate(([prompt, n]) => window.medphi.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 }), [PROMPT, N]);
  assert.deepEqual(picked.outputIds, r.cpuWhole.g.outputIds, 'picked GGUF');
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});
