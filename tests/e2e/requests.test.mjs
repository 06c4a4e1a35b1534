// End-to-end tests of how the page's worker orders, binds and cancels requests
// (www/worker.js, www/medphi-api.js, www/fetch-model.js): the API is called the moment the
// page opens, in parallel, and while loading or generating. Same harness as page.test.mjs
// (www/pkg built by scripts/build-web.sh, python's http.server for the repository, Debian's
// headless Chromium) plus a second, cross-origin server for "remote" models, whose
// downloads the page keeps in Cache Storage and which can cut, stall or count them.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { launchChromium } from './harness.mjs';

const root = new URL('../../', import.meta.url).pathname;
const reference = JSON.parse(readFileSync(`${root}tests/fixtures/reference.json`, 'utf8'));
const PROMPT = reference.prompt;
// The checkpoint tests/fixtures/reference.json was computed from by transformers.
const FIXTURE = '../tests/fixtures/tiny-phi/';
const BUNDLED = 'models/tiny-medphi/';
const BUNDLED_VOCAB = JSON.parse(readFileSync(`${root}models/tiny-medphi/config.json`, 'utf8')).vocab_size;
const FIXTURE_VOCAB = JSON.parse(readFileSync(`${root}tests/fixtures/tiny-phi/config.json`, 'utf8')).vocab_size;
const N = 16; // greedy tokens compared with the reference
const CACHE = 'medphi-models-v1';

const fixtureFiles = {
  'config.json': readFileSync(`${root}tests/fixtures/tiny-phi/config.json`),
  'tokenizer.json': readFileSync(`${root}tests/fixtures/tiny-phi/tokenizer.json`),
  'model.safetensors': readFileSync(`${root}tests/fixtures/tiny-phi/model.safetensors`),
};
const fixtureConfig = JSON.parse(fixtureFiles['config.json']);

let server;
let base;
let browser;

// ---- the "remote" server -------------------------------------------------------------
// GET /<model>/<file> serves models[model][file] with CORS and a content-length, ignoring
// Range (so weights streamed from here arrive as one body, cut into parts by the page); a
// hook for "<model>/<file>" takes a GET over. HEAD (the page asks a streamed file's size
// first) is answered from the file. hits counts GETs per path.
const models = {};
const hooks = {};
const hits = {};
let remote;
let remoteBase;

function startRemote() {
  remote = createServer(async (req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname).slice(1);
    res.setHeader('Access-Control-Allow-Origin', '*');
    const [model, file] = path.split('/');
    const body = models[model]?.[file];
    if (!body) {
      res.writeHead(404).end();
      return;
    }
    if (req.method === 'HEAD') {
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': body.length }).end();
      return;
    }
    hits[path] = (hits[path] || 0) + 1;
    if (hooks[path]) {
      await hooks[path](req, res, body);
      return;
    }
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': body.length });
    res.end(body);
  });
  return new Promise((resolve) => {
    remote.listen(0, '127.0.0.1', () => {
      // "localhost" is another origin than the page's 127.0.0.1: downloads from it are cached.
      remoteBase = `http://localhost:${remote.address().port}/`;
      resolve();
    });
  });
}

before(async () => {
  server = spawn('python3', ['-u', '-m', 'http.server', '0', '--bind', '127.0.0.1', '--directory', root], {
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  base = await new Promise((resolve, reject) => {
    server.stdout.on('data', (d) => {
      const m = String(d).match(/port (\d+)/);
      if (m) resolve(`http://127.0.0.1:${m[1]}/www/`);
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
});

/**
 * A fresh page that records console errors. `early`: returns as soon as `window.medphi`
 * exists (the bundled model is still loading); otherwise waits for "Ready".
 */
async function openPage({ early = false } = {}) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(String(e)));
  if (early) {
    await page.goto(base, { waitUntil: 'commit' });
    await page.waitForFunction(() => window.medphi, null, { polling: 5 });
  } else {
    await page.goto(base);
    await page.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  }
  return { page, errors, context };
}

/** In the page: awaits `promise`, turning a rejection into {error: {name, message}}. */
const SETTLE = `async (p) => { try { return { value: await p }; } catch (e) { return { error: { name: e.name, message: e.message } }; } }`;

function assertReference(g, what) {
  assert.deepEqual(g.inputIds, reference.input_ids, `${what}: input ids`);
  assert.deepEqual(g.outputIds, reference.greedy_ids.slice(0, N), `${what}: greedy ids`);
}

async function settle(page, fn, arg) {
  return page.evaluate(`(async () => { const settle = ${SETTLE}; return (${fn})(settle, ${JSON.stringify(arg)}); })()`);
}

// ---- ordering and binding ------------------------------------------------------------

for (const backend of ['webgpu', 'cpu']) {
  test(`load during the startup load, then generate, gives the requested model's ids (${backend})`, async () => {
    const { page, errors, context } = await openPage({ early: true });
    const r = await page.evaluate(
      async ([url, b, prompt, n]) => {
        // Nothing has loaded yet: the page's own load of the bundled model is under way.
        const early = window.medphi.info;
        const info = await window.medphi.load({ url, backend: b });
        const g = await window.medphi.generate({ prompt, maxNewTokens: n, temperature: 0 });
        return { early, info, g, now: window.medphi.info };
      },
      [FIXTURE, backend, PROMPT, N],
    );
    assert.equal(r.early, null, 'the startup load had already finished: this test would test nothing');
    assert.equal(r.info.backend, backend);
    assert.equal(r.info.vocab, FIXTURE_VOCAB);
    assertReference(r.g, backend);
    assert.equal(r.now.vocab, FIXTURE_VOCAB, 'medphi.info is the model in use');
    // The page names the model in use, not the bundled one it started loading.
    await page.waitForSelector('#status:has-text("Ready: tiny-phi")', { timeout: 30_000 });
    assert.doesNotMatch(await page.textContent('#status'), /tiny-medphi/);
    assert.deepEqual(errors, []);
    await context.close();
  });
}

test('two loads in parallel: the first rejects with SupersededError, the second wins and generate uses it', async () => {
  const { page, errors, context } = await openPage({ early: true });
  const r = await settle(
    page,
    async (settle, [bundled, fixture, prompt, n]) => {
      const m = window.medphi;
      const first = m.load({ url: bundled, backend: 'cpu' });
      // Made while the first load is under way: it belongs to it, and must not run on the second.
      const orphan = m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      const second = m.load({ url: fixture, backend: 'cpu' });
      const g = m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      // (Each promise gets its handler now: one rejected while another is awaited would be unhandled.)
      const [a, b, c, d] = await Promise.all([first, orphan, second, g].map(settle));
      return { first: a, orphan: b, second: c, g: d, info: m.info };
    },
    [BUNDLED, FIXTURE, PROMPT, N],
  );
  assert.equal(r.first.error?.name, 'SupersededError', JSON.stringify(r.first));
  assert.match(r.first.error.message, /superseded by a later load/);
  assert.equal(r.orphan.error?.name, 'SupersededError', JSON.stringify(r.orphan));
  assert.match(r.orphan.error.message, /generate request .* superseded/);
  assert.equal(r.second.value?.vocab, FIXTURE_VOCAB, JSON.stringify(r.second));
  assertReference(r.g.value, 'after the second load');
  assert.equal(r.info.vocab, FIXTURE_VOCAB);
  assert.deepEqual(errors, []);
  await context.close();
});

test('a generate made while a load is in flight runs on the new model; one made before it on the old', async () => {
  const { page, errors, context } = await openPage();
  const r = await page.evaluate(
    async ([fixture, prompt, n]) => {
      const m = window.medphi;
      await m.load({ url: 'models/tiny-medphi/', backend: 'cpu' });
      const before = m.generate({ prompt, maxNewTokens: 4, temperature: 0 });
      const loading = m.load({ url: fixture, backend: 'cpu' });
      const during = m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      const score = m.score({ context: 'Question: What is macrocephaly?\nAnswer:', choices: [' a big head', ' a small head'], gold: 0 });
      return { before: await before, info: await loading, during: await during, score: await score };
    },
    [FIXTURE, PROMPT, N],
  );
  // The bundled model's own tokenizer (4,096 ids) encodes the prompt differently.
  assert.notDeepEqual(r.before.inputIds, reference.input_ids);
  assert.ok(r.before.inputIds.every((id) => id < BUNDLED_VOCAB), `${r.before.inputIds}`);
  assert.equal(r.info.vocab, FIXTURE_VOCAB);
  assertReference(r.during, 'generate made during the load');
  assert.equal(r.score.loglikelihoods.length, 2);
  assert.deepEqual(errors, []);
  await context.close();
});

// ---- cancellation --------------------------------------------------------------------

for (const backend of ['webgpu', 'cpu']) {
  test(`stop() and an AbortSignal end a running generation quickly and the model still works (${backend})`, async () => {
    const { page, errors, context } = await openPage();
    await page.evaluate(([url, b]) => window.medphi.load({ url, backend: b }), [FIXTURE, backend]);
    const r = await settle(
      page,
      async (settle, prompt) => {
        const m = window.medphi;
        const out = {};
        // stop(), from outside the callback, once text flows: resolves with what it has.
        let t0 = 0;
        out.stopped = await m.generate({
          prompt,
          maxNewTokens: 240,
          temperature: 0,
          onText: () => {
            if (!t0) {
              t0 = performance.now();
              setTimeout(() => m.stop(), 0);
            }
          },
        });
        out.stopMs = performance.now() - t0;
        // An AbortSignal while it runs: rejects with an AbortError.
        const c = new AbortController();
        let t1 = 0;
        const aborted = m.generate({
          prompt,
          maxNewTokens: 240,
          temperature: 0,
          signal: c.signal,
          onText: () => {
            if (!t1) {
              t1 = performance.now();
              setTimeout(() => c.abort(), 0);
            }
          },
        });
        out.aborted = await settle(aborted);
        out.abortMs = performance.now() - t1;
        // A queued generate and a queued score, aborted before their turn, never run.
        let queuedText = 0;
        let flowing;
        const firstText = new Promise((resolve) => (flowing = resolve));
        const running = m.generate({ prompt, maxNewTokens: 240, onText: () => flowing() });
        const c2 = new AbortController();
        const queued = m.generate({ prompt, maxNewTokens: 8, signal: c2.signal, onText: () => (queuedText += 1) });
        const c3 = new AbortController();
        const queuedScore = m.score({ context: 'Q:', choices: [' a', ' b'], gold: 0, signal: c3.signal });
        c2.abort();
        c3.abort();
        out.queued = await settle(queued);
        out.queuedScore = await settle(queuedScore);
        const pre = new AbortController();
        pre.abort();
        out.preAborted = await settle(m.generate({ prompt, signal: pre.signal }));
        await firstText; // stop() ends the generation that is running, not one still queued
        m.stop();
        out.running = await running;
        out.queuedText = queuedText;
        // The model still answers, with the reference's ids.
        out.again = await m.generate({ prompt, maxNewTokens: 16, temperature: 0 });
        return out;
      },
      PROMPT,
    );
    assert.equal(r.stopped.stopReason, 'cancelled', backend);
    assert.ok(r.stopped.outputIds.length < 240, `${backend}: ${r.stopped.outputIds.length} tokens after stop()`);
    const k = Math.min(r.stopped.outputIds.length, reference.greedy_ids.length);
    assert.deepEqual(r.stopped.outputIds.slice(0, k), reference.greedy_ids.slice(0, k), 'greedy up to the stop');
    assert.ok(r.stopMs < 5000, `${backend}: stop() took ${r.stopMs} ms`);
    assert.equal(r.aborted.error?.name, 'AbortError', JSON.stringify(r.aborted));
    assert.ok(r.abortMs < 1000, `${backend}: abort took ${r.abortMs} ms`);
    assert.equal(r.queued.error?.name, 'AbortError');
    assert.equal(r.queuedScore.error?.name, 'AbortError');
    assert.equal(r.preAborted.error?.name, 'AbortError');
    assert.equal(r.queuedText, 0, 'an aborted queued generate never ran');
    assert.equal(r.running.stopReason, 'cancelled');
    assertReference(r.again, `${backend}, after stop and abort`);
    assert.deepEqual(errors, []);
    await context.close();
  });
}

// ---- failed loads ------------------------------------------------------------------------

test('a failed load leaves the previous model generating correctly (kept, checked first, or loaded again)', async () => {
  models['bad-json'] = { ...fixtureFiles, 'config.json': Buffer.from('{"hidden_size": 32,') };
  // Valid JSON whose shapes do not match the weights: only building the model finds out.
  models['bad-shapes'] = { ...fixtureFiles, 'config.json': Buffer.from(JSON.stringify({ ...fixtureConfig, hidden_size: 64 })) };
  const { page, errors, context } = await openPage();
  await page.evaluate((url) => window.medphi.load({ url, backend: 'cpu' }), FIXTURE);
  const r = await settle(
    page,
    async (settle, [remote, prompt, n]) => {
      const m = window.medphi;
      const out = {};
      const events = [];
      m.addEventListener('model', (e) => events.push(e.detail.info?.vocab ?? null));
      // 1. Built beside the old model, which is never touched.
      const bad = m.load({ url: `${remote}bad-json/`, backend: 'cpu' });
      const waiting = m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      [out.kept, out.waiting] = await Promise.all([settle(bad), settle(waiting)]);
      out.keptInfo = m.info;
      out.keptGen = await m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      // 2. A model too big for two (forced): the files are checked before the old one goes.
      out.checked = await settle(m.load({ url: `${remote}bad-json/`, backend: 'cpu', freeFirst: true }));
      out.checkedGen = await m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      out.eventsBefore = [...events];
      // 3. Files that pass the check but fail to build after the old model was freed:
      // the old one is loaded again.
      out.restored = await settle(m.load({ url: `${remote}bad-shapes/`, backend: 'cpu', freeFirst: true }));
      out.restoredInfo = m.info;
      out.restoredGen = await m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      out.events = events;
      return out;
    },
    [remoteBase, PROMPT, N],
  );
  assert.ok(r.kept.error, 'a broken config.json must not load');
  assert.match(r.kept.error.message, /config\.json/);
  assert.match(r.kept.error.message, /still in use/);
  assert.equal(r.waiting.error?.name, 'LoadFailedError', JSON.stringify(r.waiting));
  assert.match(r.waiting.error.message, /failed/);
  assert.equal(r.keptInfo.vocab, FIXTURE_VOCAB);
  assertReference(r.keptGen, 'after a failed load');

  assert.equal(r.checked.error?.name, 'FileError', JSON.stringify(r.checked));
  assert.match(r.checked.error.message, /config\.json: not valid JSON/);
  assertReference(r.checkedGen, 'after a load refused by the check');
  assert.deepEqual(r.eventsBefore, [], 'the model in use never changed');

  assert.ok(r.restored.error, 'a config that does not match the weights must not load');
  assert.match(r.restored.error.message, /was loaded again/, r.restored.error.message);
  assert.equal(r.restoredInfo.vocab, FIXTURE_VOCAB);
  assertReference(r.restoredGen, 'after the previous model was loaded again');
  assert.deepEqual(r.events, [null, FIXTURE_VOCAB], 'freed, then loaded again');
  assert.match(await page.textContent('#status'), /Ready: tiny-phi/);
  assert.deepEqual(errors, []);
  await context.close();
});

// ---- downloads and the cache ---------------------------------------------------------------

/**
 * {entry: body length} of what the page's Cache Storage holds: files kept whole by their
 * path, a streamed file's bookkeeping and parts with their `?medphi=` search.
 */
async function cached(page) {
  return page.evaluate(async (name) => {
    const cache = await caches.open(name);
    const out = {};
    for (const req of await cache.keys()) {
      const res = await cache.match(req);
      const u = new URL(req.url);
      out[u.pathname.slice(1) + u.search] = (await res.arrayBuffer()).byteLength;
    }
    return out;
  }, CACHE);
}

/** The entries of `file`'s bytes in `entries` (from `cached`): kept whole or as parts. */
function parts(entries, file) {
  return Object.keys(entries).filter((k) => k === file || k.startsWith(`${file}?medphi=part-`));
}

test('a truncated file in the cache is evicted and downloaded again', async () => {
  models.cached = fixtureFiles;
  // A file kept whole (weights are kept in parts: streaming.test.mjs evicts a broken part).
  const file = 'cached/tokenizer.json';
  const full = fixtureFiles['tokenizer.json'].length;
  const { page, errors, context } = await openPage();
  const url = `${remoteBase}${file}`;
  // What an interrupted download kept by an older page would look like: 4 KB of the file,
  // recorded with the whole file's length.
  const stored = await page.evaluate(
    async ([name, url, full]) => {
      const cache = await caches.open(name);
      await cache.put(url, new Response(new Uint8Array(4096), { headers: { 'content-length': String(full) } }));
      const res = await cache.match(url);
      return { header: res.headers.get('content-length'), body: (await res.arrayBuffer()).byteLength };
    },
    [CACHE, url, full],
  );
  assert.deepEqual(stored, { header: String(full), body: 4096 }, 'the test could not plant a truncated entry');
  const before = hits[file] || 0;
  const r = await settle(
    page,
    async (settle, [remote, prompt, n]) => {
      const info = await settle(window.medphi.load({ url: `${remote}cached/`, backend: 'cpu' }));
      if (info.error) return { info };
      return { info, g: await window.medphi.generate({ prompt, maxNewTokens: n, temperature: 0 }) };
    },
    [remoteBase, PROMPT, N],
  );
  assert.equal(r.info.value?.vocab, FIXTURE_VOCAB, JSON.stringify(r.info));
  assertReference(r.g, 'from the re-downloaded file');
  assert.equal(hits[file] - before, 1, 'downloaded again');
  assert.equal((await cached(page))[file], full, 'the whole file is cached now');
  // And the next load is served from the cache.
  await page.evaluate((url) => window.medphi.load({ url, backend: 'cpu' }), `${remoteBase}cached/`);
  assert.equal(hits[file] - before, 1, 'the whole cached file is used');
  assert.deepEqual(errors.filter((e) => !/Failed to load resource/.test(e)), []);
  await context.close();
});

test('a download cut short is refused and never cached; an aborted or superseded download stops', async () => {
  const body = fixtureFiles['model.safetensors'];
  models.cut = fixtureFiles;
  models.stall = fixtureFiles;
  // The server promises the whole file and sends a third of it.
  hooks['cut/model.safetensors'] = (req, res, b) => {
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': b.length });
    res.write(b.subarray(0, Math.floor(b.length / 3)), () => setTimeout(() => res.destroy(), 100));
  };
  // The server sends 1 MB, then stalls until the client goes away.
  const stalled = [];
  hooks['stall/model.safetensors'] = (req, res, b) =>
    new Promise((resolve) => {
      const record = { closed: false };
      stalled.push(record);
      res.on('close', () => {
        record.closed = true;
        resolve();
      });
      res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': b.length });
      res.write(b.subarray(0, 1 << 20));
    });
  const { page, errors, context } = await openPage();
  await page.evaluate((url) => window.medphi.load({ url, backend: 'cpu' }), FIXTURE);

  const cut = await settle(page, async (settle, remote) => settle(window.medphi.load({ url: `${remote}cut/`, backend: 'cpu' })), remoteBase);
  assert.equal(cut.error?.name, 'FileError', JSON.stringify(cut));
  assert.match(cut.error.message, /model\.safetensors/);
  assert.deepEqual(parts(await cached(page), 'cut/model.safetensors'), [], 'a partial file entered the cache');

  const r = await settle(
    page,
    async (settle, [remote, prompt, n]) => {
      const m = window.medphi;
      const waitFor = (what) =>
        new Promise((resolve) => {
          const onProgress = (p) => {
            if (p.file === 'model.safetensors' && p.loaded > 0) resolve();
          };
          what.onProgress = onProgress;
        });
      // Aborted by its signal mid-download.
      const c = new AbortController();
      const opts = { url: `${remote}stall/`, backend: 'cpu', signal: c.signal };
      const started = waitFor(opts);
      const aborted = m.load(opts);
      await started;
      const t0 = performance.now();
      c.abort();
      const out = { aborted: await settle(aborted), abortMs: performance.now() - t0 };
      // Superseded mid-download by a later load.
      const opts2 = { url: `${remote}stall/`, backend: 'cpu' };
      const started2 = waitFor(opts2);
      const superseded = m.load(opts2);
      await started2;
      const winner = m.load({ url: 'models/tiny-medphi/', backend: 'cpu' });
      out.superseded = await settle(superseded);
      out.winner = await settle(winner);
      out.g = await m.generate({ prompt, maxNewTokens: n, temperature: 0 });
      return out;
    },
    [remoteBase, PROMPT, N],
  );
  assert.equal(r.aborted.error?.name, 'AbortError', JSON.stringify(r.aborted));
  assert.ok(r.abortMs < 1000, `abort took ${r.abortMs} ms`);
  assert.equal(r.superseded.error?.name, 'SupersededError', JSON.stringify(r.superseded));
  assert.equal(r.winner.value?.vocab, BUNDLED_VOCAB);
  assert.ok(r.g.inputIds.every((id) => id < BUNDLED_VOCAB), 'generate ran on the winning load (the bundled model)');
  // Both stalled downloads were dropped by the page, not left running.
  for (let i = 0; i < 50 && !stalled.every((s) => s.closed); i++) await new Promise((res) => setTimeout(res, 100));
  assert.equal(stalled.length, 2);
  assert.deepEqual(stalled.map((s) => s.closed), [true, true], 'the downloads were aborted');
  assert.deepEqual(parts(await cached(page), 'stall/model.safetensors'), [], 'an aborted download entered the cache');
  assert.ok(body.length > 1 << 20);
  assert.deepEqual(errors.filter((e) => !/Failed to load resource|ERR_/.test(e)), []);
  await context.close();
});
