// End-to-end tests of the checkpoint layouts, LoRA adapters and conversion on load in the
// page (window.medphi.load's `adapterUrl`, `adapterFiles` and `quantize`, the model panel's
// presets, "Convert on load" and adapter picker, and its list of downloaded models). Same
// harness as page.test.mjs (www/pkg built by scripts/build-web.sh, python's http.server
// serving the repository root, Debian's headless Chromium) plus a cross-origin server whose
// downloads the page keeps in Cache Storage. The q8_0 test compares with the native CLI:
// it needs the medphi binary ($MEDPHI_BIN, else the one `cargo test` builds,
// $CARGO_TARGET_DIR/debug/medphi, the target dir defaulting to ~/.cache/medphi-target as in
// scripts/test.sh).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { createServer } from 'node:http';
import { existsSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { homedir } from 'node:os';
import { resolve } from 'node:path';
import { launchChromium } from './harness.mjs';

const root = new URL('../../', import.meta.url).pathname;
const out = `${root}target/e2e`; // screenshots
const reference = JSON.parse(readFileSync(`${root}tests/fixtures/reference.json`, 'utf8'));
const PROMPT = reference.prompt;
const N = 16; // greedy tokens compared with the references
const BASE = '../tests/fixtures/tiny-phi/';
const MSFT = '../tests/fixtures/tiny-phi-msft/';
const LORA = '../tests/fixtures/tiny-phi-lora/';
const BUNDLED_VOCAB = JSON.parse(readFileSync(`${root}models/tiny-medphi/config.json`, 'utf8')).vocab_size;
const msftConfig = JSON.parse(readFileSync(`${root}tests/fixtures/tiny-phi-msft/config.json`, 'utf8'));
const loraConfig = JSON.parse(readFileSync(`${root}tests/fixtures/tiny-phi-lora/adapter_config.json`, 'utf8'));
const baseConfig = JSON.parse(readFileSync(`${root}tests/fixtures/tiny-phi/config.json`, 'utf8'));
// Every target module of every layer gets its LoRA update.
const ADAPTED = loraConfig.target_modules.length * baseConfig.num_hidden_layers;
const PHI2_URL = 'https://huggingface.co/microsoft/phi-2/resolve/main/';

/** The int64 tensors of a safetensors file (8-byte little-endian header length, JSON header, data). */
function int64Tensors(path) {
  const b = readFileSync(path);
  const n = Number(b.readBigUInt64LE(0));
  const header = JSON.parse(b.subarray(8, 8 + n).toString('utf8'));
  const data = b.subarray(8 + n);
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__' || t.dtype !== 'I64') continue;
    const [start, end] = t.data_offsets;
    out[name] = Array.from({ length: (end - start) / 8 }, (_, i) => Number(data.readBigInt64LE(start + 8 * i)));
  }
  return out;
}

// transformers' (and peft's) greedy ids for PROMPT: the phi-msft checkpoint, and the tiny-phi
// base with the LoRA adapter merged.
const layouts = int64Tensors(`${root}tests/fixtures/layouts_reference.safetensors`);

/** What `medphi generate --json` prints for the phi-msft fixture converted to q8_0 on load. */
function cliQ8() {
  const target = resolve(root, process.env.CARGO_TARGET_DIR || `${homedir()}/.cache/medphi-target`);
  const bin = process.env.MEDPHI_BIN || `${target}/debug/medphi`;
  if (!existsSync(bin)) {
    throw new Error(`${bin} is missing: build it with \`cargo build\` (or set MEDPHI_BIN) before the e2e tests`);
  }
  const out = execFileSync(
    bin,
    ['generate', '--model', `${root}tests/fixtures/tiny-phi-msft`, '--quantize', 'q8_0', '--backend', 'cpu', '--prompt-format', 'raw',
      '--temperature', '0', '--max-new-tokens', String(N), '--json', '--prompt', PROMPT],
    { encoding: 'utf8' },
  );
  return JSON.parse(out);
}

let server;
let base;
let browser;

// ---- the "remote" server: the repository's models and fixtures from another origin -----
let remote;
let remoteBase;

function startRemote() {
  remote = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname).slice(1);
    res.setHeader('Access-Control-Allow-Origin', '*');
    const file = resolve(root, path);
    const allowed = ['models/', 'tests/fixtures/'].some((dir) => file.startsWith(resolve(root, dir) + '/'));
    if (!allowed || !existsSync(file) || !statSync(file).isFile()) {
      res.writeHead(404).end();
      return;
    }
    const body = readFileSync(file);
    res.writeHead(200, { 'Content-Type': 'application/octet-stream', 'Content-Length': body.length });
    res.end(body);
  });
  return new Promise((done) => {
    remote.listen(0, '127.0.0.1', () => {
      // "localhost" is another origin than the page's 127.0.0.1: downloads from it are cached.
      remoteBase = `http://localhost:${remote.address().port}/`;
      done();
    });
  });
}

before(async () => {
  mkdirSync(out, { recursive: true });
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
});

/** A fresh page that records console errors, once the bundled model is ready. */
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

/** Console errors other than the browser's own log of a failed or 404 request. */
function unexpected(errors) {
  return errors.filter((e) => !/Failed to load resource|ERR_/.test(e));
}

/** In the page: awaits `promise`, turning a rejection into {error: {name, message}}. */
const SETTLE = `async (p) => { try { return { value: await p }; } catch (e) { return { error: { name: e.name, message: e.message } }; } }`;

async function settle(page, fn, arg) {
  return page.evaluate(`(async () => { const settle = ${SETTLE}; return (${fn})(settle, ${JSON.stringify(arg)}); })()`);
}

// ---- layouts and adapters ------------------------------------------------------------

for (const backend of ['webgpu', 'cpu']) {
  test(`phi-msft f16 shards and a PEFT adapter (folder URL or picked files) give transformers' greedy ids (${backend})`, async () => {
    const { page, errors, context } = await openPage();
    const r = await page.evaluate(
      async ([msft, base, lora, prompt, n, backend]) => {
        const m = window.medphi;
        // The emulator kernels: SwiftShader emulates the gpu family's barriers slowly.
        const gpuKernels = 'emulator';
        const generate = () => m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
        const out = {};
        out.msftInfo = await m.load({ url: msft, backend, gpuKernels });
        out.msft = await generate();
        out.urlInfo = await m.load({ url: base, adapterUrl: lora, backend, gpuKernels });
        out.urlSource = m.source;
        out.url = await generate();
        const file = async (name) => new File([await (await fetch(`${lora}${name}`)).arrayBuffer()], name);
        const adapterFiles = [await file('adapter_config.json'), await file('adapter_model.safetensors')];
        out.filesInfo = await m.load({ url: base, adapterFiles, backend, gpuKernels });
        out.filesSource = { adapter: { files: m.source.adapter?.files.map((f) => f.name) } };
        out.files = await generate();
        return out;
      },
      [MSFT, BASE, LORA, PROMPT, N, backend],
    );
    assert.equal(r.msftInfo.backend, backend);
    assert.equal(r.msftInfo.layers, msftConfig.n_layer);
    assert.equal(r.msftInfo.hidden, msftConfig.n_embd);
    assert.equal(r.msftInfo.quantize, null);
    assert.equal(r.msftInfo.adaptedMatrices, 0);
    assert.ok(Number.isSafeInteger(r.msftInfo.wasmMemoryBytes) && r.msftInfo.wasmMemoryBytes > 0, `wasmMemoryBytes ${r.msftInfo.wasmMemoryBytes}`);
    assert.deepEqual(r.msft.inputIds, layouts.input_ids, 'input ids');
    assert.deepEqual(r.msft.outputIds, layouts.msft_greedy_ids.slice(0, N), 'phi-msft greedy ids');

    for (const [how, info, g, source] of [
      ['adapterUrl', r.urlInfo, r.url, r.urlSource],
      ['adapterFiles', r.filesInfo, r.files, r.filesSource],
    ]) {
      assert.equal(info.backend, backend, how);
      assert.equal(info.adaptedMatrices, ADAPTED, `${how}: matrices the adapter changed`);
      assert.equal(info.quantize, null, how);
      assert.ok(info.wasmMemoryBytes > 0, how);
      assert.deepEqual(g.inputIds, layouts.input_ids, how);
      assert.deepEqual(g.outputIds, layouts.lora_greedy_ids.slice(0, N), `${how}: greedy ids of base + adapter`);
      assert.ok(source.adapter, `${how}: medphi.source names the adapter`);
    }
    assert.equal(r.urlSource.adapter.url, LORA);
    assert.deepEqual(r.filesSource.adapter.files, ['adapter_config.json', 'adapter_model.safetensors']);
    // The status line names the adapter.
    await page.waitForSelector('#status:has-text("LoRA adapter")', { timeout: 10_000 });
    assert.match(await page.textContent('#status'), new RegExp(`Ready: tiny-phi \\+ LoRA adapter .*\\(${ADAPTED} matrices merged\\)`));
    assert.deepEqual(unexpected(errors), []);
    await context.close();
  });
}

test("quantize 'q8_0' in the page gives the native CLI's --quantize q8_0 ids, on both backends", async () => {
  const cli = cliQ8();
  assert.deepEqual(cli.input_ids, layouts.input_ids, 'the CLI tokenized the prompt as transformers does');
  assert.equal(cli.output_ids.length, N);
  // q8_0 changes this fixture's greedy ids, so matching them shows the page converted.
  assert.notDeepEqual(cli.output_ids, layouts.msft_greedy_ids.slice(0, N), 'the CLI converted to q8_0');
  const { page, errors, context } = await openPage();
  const r = await page.evaluate(
    async ([msft, prompt, n]) => {
      const m = window.medphi;
      const generate = () => m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      const out = {};
      for (const backend of ['cpu', 'webgpu']) {
        const info = await m.load({ url: msft, backend, quantize: 'q8_0', gpuKernels: 'emulator' });
        out[backend] = { info, g: await generate() };
      }
      return out;
    },
    [MSFT, PROMPT, N],
  );
  for (const backend of ['cpu', 'webgpu']) {
    const { info, g } = r[backend];
    assert.equal(info.backend, backend);
    assert.equal(info.quantize, 'q8_0', backend);
    assert.ok(info.wasmMemoryBytes > 0, backend);
    assert.deepEqual(g.inputIds, cli.input_ids, backend);
    assert.deepEqual(g.outputIds, cli.output_ids, `${backend}: the CLI's q8_0 ids`);
  }
  await page.waitForSelector('#status:has-text("converted to q8_0 on load")', { timeout: 10_000 });
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('a bad quantize or adapter is refused with a named error and the model in use keeps working', async () => {
  const { page, errors, context } = await openPage();
  await page.evaluate((url) => window.medphi.load({ url, backend: 'cpu' }), BASE);
  const r = await settle(
    page,
    async (settle, [base, msft, lora, prompt, n]) => {
      const m = window.medphi;
      const events = [];
      m.addEventListener('model', (e) => events.push(e.detail.info?.vocab ?? null));
      const out = {};
      out.unknown = await settle(m.load({ url: msft, backend: 'cpu', quantize: 'q5_k' }));
      // Refused before anything is freed, even for a model too big to hold two of.
      out.freeFirst = await settle(m.load({ url: msft, backend: 'webgpu', quantize: 'Q8_0', freeFirst: true }));
      // A folder without adapter files, and an adapter for another model's shapes.
      out.noAdapter = await settle(m.load({ url: msft, adapterUrl: base, backend: 'cpu' }));
      out.wrongModel = await settle(m.load({ url: 'models/tiny-medphi/', adapterUrl: lora, backend: 'cpu' }));
      out.events = events;
      out.info = m.info;
      out.g = await m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      return out;
    },
    [BASE, MSFT, LORA, PROMPT, N],
  );
  for (const [what, bad] of [['unknown', 'q5_k'], ['freeFirst', 'Q8_0']]) {
    assert.equal(r[what].error?.name, 'InputError', `${what}: ${JSON.stringify(r[what])}`);
    assert.match(r[what].error.message, new RegExp(`unknown quantization "${bad}" \\(expected q8_0 or q4_0\\)`), what);
    assert.match(r[what].error.message, /still in use/, what);
  }
  assert.equal(r.noAdapter.error?.name, 'FileError', JSON.stringify(r.noAdapter));
  assert.match(r.noAdapter.error.message, /no adapter_config\.json in this folder/);
  assert.ok(r.wrongModel.error, 'an adapter for other shapes must not load');
  assert.match(r.wrongModel.error.message, /adapter/i, r.wrongModel.error.message);
  assert.match(r.wrongModel.error.message, /still in use/);
  assert.deepEqual(r.events, [], 'the model in use was never freed or replaced');
  assert.equal(r.info.vocab, baseConfig.vocab_size);
  assert.equal(r.info.adaptedMatrices, 0);
  assert.deepEqual(r.g.outputIds, reference.greedy_ids.slice(0, N), 'the model loaded before still answers');
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('a model freed for a failed load comes back with its own adapter and quantization', async () => {
  const { page, errors, context } = await openPage();
  const r = await settle(
    page,
    async (settle, [base, lora, prompt, n]) => {
      const m = window.medphi;
      const generate = () => m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      const out = {};
      out.before = await m.load({ url: base, adapterUrl: lora, quantize: 'q8_0', backend: 'cpu' });
      out.g1 = await generate();
      // Files that pass the worker's check but do not build: a config whose shapes are not the weights'.
      const bytes = async (f) => new Uint8Array(await (await fetch(`${base}${f}`)).arrayBuffer());
      const config = JSON.parse(new TextDecoder().decode(await bytes('config.json')));
      const files = [
        new File([JSON.stringify({ ...config, hidden_size: 64 })], 'config.json'),
        new File([await bytes('tokenizer.json')], 'tokenizer.json'),
        new File([await bytes('model.safetensors')], 'model.safetensors'),
      ];
      out.failed = await settle(m.load({ files, backend: 'cpu', freeFirst: true }));
      out.info = m.info;
      out.source = m.source;
      out.g2 = await generate();
      return out;
    },
    [BASE, LORA, PROMPT, N],
  );
  assert.equal(r.before.quantize, 'q8_0');
  assert.equal(r.before.adaptedMatrices, ADAPTED);
  assert.ok(r.failed.error, 'a config that does not match the weights must not load');
  assert.match(r.failed.error.message, /was loaded again/, r.failed.error.message);
  assert.match(r.failed.error.message, /with the adapter/, 'the error names the model brought back with its adapter');
  assert.equal(r.info.quantize, 'q8_0', 'reloaded with its own conversion');
  assert.equal(r.info.adaptedMatrices, ADAPTED, 'reloaded with its own adapter');
  assert.equal(r.source.adapter?.url, LORA);
  assert.deepEqual(r.g2.outputIds, r.g1.outputIds, 'the same model as before the failed load');
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('after a lost GPU the page reloads the model on the CPU with its adapter and conversion', async () => {
  const { page, errors, context } = await openPage();
  const before = await page.evaluate(
    ([url, adapterUrl]) => window.medphi.load({ url, adapterUrl, quantize: 'q8_0', backend: 'webgpu', gpuKernels: 'emulator' }),
    [BASE, LORA],
  );
  assert.equal(before.backend, 'webgpu');
  await page.evaluate(() => window.medphi.loseGpuDevice());
  await page.fill('#prompt', 'What is macrocephaly?');
  await page.press('#prompt', 'Enter');
  await page.waitForSelector('#speed:has-text("tok/s")', { timeout: 120_000 });
  assert.match(await page.textContent('#status'), /GPU failed .*now running on the CPU/);
  const r = await page.evaluate(() => ({ info: window.medphi.info, source: window.medphi.source }));
  assert.equal(r.info.backend, 'cpu');
  assert.equal(r.info.quantize, 'q8_0', 'the same conversion');
  assert.equal(r.info.adaptedMatrices, ADAPTED, 'the same adapter');
  assert.equal(r.source.adapter?.url, LORA);
  assert.ok((await page.textContent('.msg.model')).length > 0);
  assert.deepEqual(unexpected(errors).filter((e) => !/device|GPU|lost|destroy/i.test(e)), []);
  await context.close();
});

// ---- the model panel -----------------------------------------------------------------

test('the model panel loads with "Convert on load" and picked adapter files, and the status line says so', async () => {
  const { page, errors, context } = await openPage();
  await page.click('#model-panel summary');
  await page.check('input[name=source][value=url]');
  await page.fill('#model-url', BASE);
  await page.selectOption('#quantize', 'q8_0');
  await page.setInputFiles(
    '#adapter-files',
    ['adapter_config.json', 'adapter_model.safetensors'].map((f) => `${root}tests/fixtures/tiny-phi-lora/${f}`),
  );
  assert.match(await page.textContent('#picked-adapter'), /adapter_config\.json .*adapter_model\.safetensors/);
  await page.check('input[name=backend][value=cpu]');
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("Ready: tiny-phi + LoRA adapter")', { timeout: 120_000 });
  const status = await page.textContent('#status');
  assert.match(status, new RegExp(`\\(${ADAPTED} matrices merged\\)`), status);
  assert.match(status, /converted to q8_0 on load/, status);
  assert.match(await page.textContent('#load-detail'), /WebAssembly memory \d+\.\d MB/);
  const r = await page.evaluate(
    async ([base, lora, prompt, n]) => {
      const m = window.medphi;
      const generate = () => m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
      const panel = { info: m.info, g: await generate() };
      // The same choices through the API, with the adapter from its folder URL.
      await m.load({ url: base, adapterUrl: lora, quantize: 'q8_0', backend: 'cpu' });
      return { panel, api: await generate() };
    },
    [BASE, LORA, PROMPT, N],
  );
  assert.equal(r.panel.info.quantize, 'q8_0');
  assert.equal(r.panel.info.adaptedMatrices, ADAPTED);
  assert.deepEqual(r.panel.g.outputIds, r.api.outputIds, 'the panel loaded what the API loads for the same choices');
  // "No adapter" drops the picked files: the next load is the base model alone.
  await page.click('#adapter-clear');
  assert.equal(await page.textContent('#picked-adapter'), '');
  await page.selectOption('#quantize', '');
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("Ready: tiny-phi,")', { timeout: 120_000 });
  assert.equal(await page.evaluate(() => window.medphi.info.adaptedMatrices), 0);
  assert.equal(await page.evaluate(() => window.medphi.info.quantize), null);
  await page.locator('#model-panel').screenshot({ path: `${out}/model-panel.png` });
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('the Phi-2 preset without a network fails with a clear error and the model in use keeps working', async () => {
  const context = await browser.newContext({ viewport: { width: 1100, height: 900 } });
  // No internet here either way; the route makes the failure immediate and proves the page asked Hugging Face.
  const asked = [];
  await context.route('https://huggingface.co/**', (route) => {
    asked.push(route.request().url());
    return route.abort('internetdisconnected');
  });
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(base);
  await page.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  const before = await page.evaluate(() => window.medphi.info);

  await page.click('#model-panel summary');
  await page.selectOption('#model-preset', 'phi-2');
  assert.equal(await page.inputValue('#model-url'), PHI2_URL);
  assert.equal(await page.inputValue('#quantize'), 'q4_0');
  assert.equal(await page.isChecked('input[name=source][value=url]'), true);
  assert.match(await page.textContent('#preset-note'), /q4_0/);
  await page.click('#load-button');
  await page.waitForSelector('#status.error', { timeout: 60_000 });
  const status = await page.textContent('#status');
  assert.match(status, /^Could not load the model: config\.json: cannot download https:\/\/huggingface\.co\/microsoft\/phi-2\/resolve\/main\/config\.json/, status);
  assert.match(status, /offline and not cached\?/, status);
  assert.match(status, /still in use/, status);
  assert.deepEqual(asked, [`${PHI2_URL}config.json`]);

  // The MedPhi-2 entry asks for its folder URL instead of loading a guess.
  await page.selectOption('#model-preset', 'medphi-2');
  assert.equal(await page.inputValue('#model-url'), '');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'model-url');
  assert.equal(await page.inputValue('#quantize'), 'q4_0');
  assert.match(await page.textContent('#preset-note'), /paste the Hugging Face folder URL/);
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("enter a model URL first")');

  const after = await page.evaluate(async (prompt) => ({
    info: window.medphi.info,
    g: await window.medphi.generate({ prompt, maxNewTokens: 4 }),
  }), PROMPT);
  assert.equal(after.info.vocab, BUNDLED_VOCAB, 'the bundled model is still in use');
  assert.equal(after.info.loadMs, before.loadMs, 'not even reloaded');
  assert.ok(after.g.outputIds.length >= 1 && after.g.inputIds.every((id) => id < BUNDLED_VOCAB), JSON.stringify(after.g));
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});

test('downloaded models are listed with their sizes, and Delete removes one and updates the list', async () => {
  const { page, errors, context } = await openPage();
  const bundled = `${remoteBase}models/tiny-medphi/`;
  const adapter = `${remoteBase}tests/fixtures/tiny-phi-lora/`;
  const bytes = (dir, files) => files.reduce((a, f) => a + statSync(`${root}${dir}${f}`).size, 0);
  const bundledBytes = bytes('models/tiny-medphi/', ['config.json', 'tokenizer.json', 'model.safetensors']);
  const adapterBytes = bytes('tests/fixtures/tiny-phi-lora/', ['adapter_config.json', 'adapter_model.safetensors']);
  await page.click('#model-panel summary');
  // Nothing downloaded yet: the bundled model comes from the page's own origin, never cached.
  await page.waitForSelector('#cached-models li:has-text("None yet")');
  const r = await page.evaluate(
    async ([bundled, base, adapter]) => {
      const m = window.medphi;
      await m.load({ url: bundled, backend: 'cpu' });
      // A same-origin model with a cross-origin adapter: only the adapter is kept.
      await m.load({ url: base, adapterUrl: adapter, backend: 'cpu' });
      return m.cachedModels();
    },
    [bundled, BASE, adapter],
  );
  assert.deepEqual(
    r.map(({ url, bytes }) => ({ url, bytes })),
    [
      { url: bundled, bytes: bundledBytes },
      { url: adapter, bytes: adapterBytes },
    ].sort((a, b) => a.url.localeCompare(b.url)),
  );
  const item = (url) => page.locator(`#cached-models li[data-url="${url}"]`);
  await item(bundled).waitFor();
  await item(adapter).waitFor();
  assert.equal(await item(bundled).getAttribute('data-bytes'), String(bundledBytes));
  assert.ok(bundledBytes > 2 ** 20 && adapterBytes < 2 ** 20, 'the two sizes are shown in MB and KB');
  assert.equal(await item(bundled).locator('.cached-size').textContent(), `${(bundledBytes / 2 ** 20).toFixed(1)} MB`);
  assert.equal(await item(adapter).locator('.cached-size').textContent(), `${(adapterBytes / 1024).toFixed(1)} KB`);
  await page.locator('#model-panel').screenshot({ path: `${out}/cached-models.png` });

  await item(bundled).getByRole('button', { name: /Delete/ }).click();
  await item(bundled).waitFor({ state: 'detached' });
  assert.equal(await page.locator('#cached-models li').count(), 1);
  await item(adapter).waitFor();
  assert.match(await page.textContent('#status'), /Deleted the downloaded copy of .*tiny-medphi/);
  const left = await page.evaluate(async () => (await caches.open('medphi-models-v1')).keys().then((ks) => ks.map((k) => k.url)));
  assert.deepEqual(left.sort(), [`${adapter}adapter_config.json`, `${adapter}adapter_model.safetensors`]);

  await page.click('#clear-cache');
  await page.waitForSelector('#cached-models li:has-text("None yet")');
  assert.deepEqual(await page.evaluate(() => window.medphi.cachedModels()), []);
  assert.deepEqual(unexpected(errors), []);
  await context.close();
});
