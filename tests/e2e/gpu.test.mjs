// End-to-end tests of the WebGPU kernel families and the speed benchmark in the page
// (window.medphi.load's `gpuKernels`, window.medphi.benchmark, the GPU kernels selector and the
// Benchmark button). Same harness as page.test.mjs: www/pkg built by scripts/build-web.sh,
// python's http.server serving the repository root, Debian's headless Chromium, whose WebGPU
// adapter is SwiftShader (a CPU-type adapter). Screenshots go to target/e2e/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { launchChromium } from './harness.mjs';

const root = new URL('../../', import.meta.url).pathname;
const out = `${root}target/e2e`;
const reference = JSON.parse(readFileSync(`${root}tests/fixtures/reference.json`, 'utf8'));
const PROMPT = reference.prompt;
// The checkpoint tests/fixtures/reference.json was computed from by transformers.
const FIXTURE = '../tests/fixtures/tiny-phi/';
const FIXTURE_VOCAB = JSON.parse(readFileSync(`${root}tests/fixtures/tiny-phi/config.json`, 'utf8')).vocab_size;
// Greedy tokens compared per family: SwiftShader emulates the gpu family's barriers and
// 16-byte loads slowly.
const TOKENS = { gpu: 4, emulator: 16 };
const metrics = {};

let server;
let base;
let browser;

before(async () => {
  mkdirSync(out, { recursive: true });
  server = spawn('python3', ['-u', '-m', 'http.server', '0', '--bind', '127.0.0.1', '--directory', root], {
    stdio: ['ignore', 'pipe', 'ignore'], // its request log would drown the test report
  });
  base = await new Promise((resolve, reject) => {
    server.stdout.on('data', (d) => {
      const m = String(d).match(/port (\d+)/);
      if (m) resolve(`http://127.0.0.1:${m[1]}/www/`);
    });
    server.on('exit', (code) => reject(new Error(`http.server exited with ${code}`)));
  });
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  server?.kill();
  writeFileSync(`${out}/gpu-metrics.json`, JSON.stringify(metrics, null, 2));
  console.log('gpu metrics:', JSON.stringify(metrics));
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

/** In the page: awaits `promise`, turning a rejection into {error: {name, message}}. */
const SETTLE = `async (p) => { try { return { value: await p }; } catch (e) { return { error: { name: e.name, message: e.message } }; } }`;

async function settle(page, fn, arg) {
  return page.evaluate(`(async () => { const settle = ${SETTLE}; return (${fn})(settle, ${JSON.stringify(arg)}); })()`);
}

test('gpuKernels "gpu" and "emulator" each run on WebGPU and give transformers\' greedy ids', async () => {
  const { page, errors, context } = await openPage();
  for (const family of ['gpu', 'emulator']) {
    const n = TOKENS[family];
    const r = await page.evaluate(
      async ([url, gpuKernels, prompt, n]) => {
        const info = await window.medphi.load({ url, backend: 'webgpu', gpuKernels });
        const g = await window.medphi.generate({ prompt, maxNewTokens: n, temperature: 0 });
        return { info, g, now: window.medphi.info };
      },
      [FIXTURE, family, PROMPT, n],
    );
    assert.equal(r.info.backend, 'webgpu', family);
    assert.equal(r.info.kernels, family, `${family}: the family in use`);
    assert.equal(r.now.kernels, family, `${family}: medphi.info`);
    assert.equal(r.info.vocab, FIXTURE_VOCAB);
    assert.deepEqual(r.g.inputIds, reference.input_ids, family);
    assert.deepEqual(r.g.outputIds, reference.greedy_ids.slice(0, n), `${family}: greedy ids`);
    metrics[`decode_tok_s_webgpu_${family}`] = Number(r.g.decodeTokS.toFixed(1));
    // The page says which family runs.
    await page.waitForSelector(`#status:has-text("${family} kernels")`, { timeout: 10_000 });
    assert.equal(await page.textContent('#kernels-in-use'), `in use: ${family}`);
  }
  assert.deepEqual(errors, []);
  await context.close();
});

test('gpuKernels "auto" (and no gpuKernels) picks the emulator family on SwiftShader, a CPU adapter', async () => {
  const { page, errors, context } = await openPage();
  // The page's own startup load is "auto" on WebGPU.
  assert.equal(await page.evaluate(() => window.medphi.info.kernels), 'emulator');
  const r = await page.evaluate(async (url) => {
    const auto = await window.medphi.load({ url, backend: 'webgpu', gpuKernels: 'auto' });
    const unset = await window.medphi.load({ url, backend: 'webgpu' });
    const cpu = await window.medphi.load({ url, backend: 'cpu', gpuKernels: 'gpu' });
    return { auto, unset, cpu };
  }, FIXTURE);
  assert.equal(r.auto.kernels, 'emulator');
  assert.match(r.auto.gpu.device_type, /cpu/i, `SwiftShader's type: ${r.auto.gpu.device_type}`);
  assert.equal(r.unset.kernels, 'emulator');
  assert.equal(r.cpu.backend, 'cpu');
  assert.equal(r.cpu.kernels, null, 'no GPU kernels on the CPU backend');
  assert.deepEqual(errors, []);
  await context.close();
});

test('an unknown gpuKernels rejects with the wasm\'s InputError and leaves the model in use', async () => {
  const { page, errors, context } = await openPage();
  await page.evaluate((url) => window.medphi.load({ url, backend: 'webgpu', gpuKernels: 'gpu' }), FIXTURE);
  const r = await settle(
    page,
    async (settle, [url, prompt]) => {
      const m = window.medphi;
      const out = {};
      out.webgpu = await settle(m.load({ url, backend: 'webgpu', gpuKernels: 'fast' }));
      out.cpu = await settle(m.load({ url: 'models/tiny-medphi/', backend: 'cpu', gpuKernels: 'GPU' }));
      out.auto = await settle(m.load({ url, backend: 'auto', gpuKernels: 42 }));
      out.info = m.info;
      out.g = await m.generate({ prompt, maxNewTokens: 4, temperature: 0 });
      return out;
    },
    [FIXTURE, PROMPT],
  );
  for (const [what, bad] of [['webgpu', 'fast'], ['cpu', 'GPU'], ['auto', '42']]) {
    assert.equal(r[what].error?.name, 'InputError', `${what}: ${JSON.stringify(r[what])}`);
    assert.match(r[what].error.message, new RegExp(`unknown GPU kernel family "${bad}" \\(expected auto, gpu or emulator\\)`), what);
    assert.match(r[what].error.message, /still in use/, what);
  }
  assert.equal(r.info.kernels, 'gpu', 'the model loaded before is still in use');
  assert.equal(r.info.vocab, FIXTURE_VOCAB);
  assert.deepEqual(r.g.outputIds, reference.greedy_ids.slice(0, 4));
  assert.deepEqual(errors, []);
  await context.close();
});

test('a model freed for a failed load comes back with the kernel family it was loaded with', async () => {
  const { page, errors, context } = await openPage();
  const r = await settle(
    page,
    async (settle, [url, prompt]) => {
      const m = window.medphi;
      await m.load({ url, backend: 'webgpu', gpuKernels: 'gpu' });
      // Files that pass the worker's check but do not build: a config whose shapes are not the weights'.
      const bytes = async (f) => new Uint8Array(await (await fetch(`${url}${f}`)).arrayBuffer());
      const config = JSON.parse(new TextDecoder().decode(await bytes('config.json')));
      const files = [
        new File([JSON.stringify({ ...config, hidden_size: 64 })], 'config.json'),
        new File([await bytes('tokenizer.json')], 'tokenizer.json'),
        new File([await bytes('model.safetensors')], 'model.safetensors'),
      ];
      const failed = await settle(m.load({ files, backend: 'webgpu', gpuKernels: 'emulator', freeFirst: true }));
      const g = await m.generate({ prompt, maxNewTokens: 4, temperature: 0 });
      return { failed, info: m.info, g };
    },
    [FIXTURE, PROMPT],
  );
  assert.ok(r.failed.error, 'a config that does not match the weights must not load');
  assert.match(r.failed.error.message, /was loaded again/, r.failed.error.message);
  assert.equal(r.info.backend, 'webgpu');
  assert.equal(r.info.kernels, 'gpu', 'reloaded with its own family, not the failed load\'s');
  assert.deepEqual(r.g.outputIds, reference.greedy_ids.slice(0, 4));
  assert.deepEqual(errors, []);
  await context.close();
});

/** The benchmark panel's figures, as shown: {kernels, adapter, prefill, decode, bytes, bandwidth}. */
async function shownBenchmark(page) {
  return page.evaluate(() => {
    const el = document.getElementById('benchmark-result');
    // "Decode 19.4 tok/s": the label, then the figure.
    const value = (key) => {
      const f = el.querySelector(`.figure[data-key=${key}]`);
      return f && [...f.children].map((c) => c.textContent.replace(/\s+/g, ' ').trim()).join(' ');
    };
    return {
      adapter: el.querySelector('.adapter')?.textContent,
      kernels: el.querySelector('.kernels')?.textContent,
      prefill: value('prefill'),
      decode: value('decode'),
      bytes: value('bytes'),
      bandwidth: value('bandwidth'),
      bar: Boolean(el.querySelector('.gbs-bar')),
      text: el.textContent,
    };
  });
}

/** A shown figure's number ("Decode 1,234 tok/s" -> 1234). */
function numberIn(text) {
  const m = text.match(/(\d[\d,]*(?:\.\d+)?(?:e-?\d+)?)/);
  return m ? Number(m[1].replace(/,/g, '')) : NaN;
}

test('the Benchmark button shows the kernel family, tok/s, bytes per token and GB/s next to the adapter', async () => {
  const { page, errors, context } = await openPage();
  await page.click('#model-panel summary');
  assert.equal(await page.isDisabled('#benchmark-button'), false);
  await page.click('#benchmark-button');
  // Busy while it runs: the button and the other model controls wait.
  assert.equal(await page.isDisabled('#benchmark-button'), true);
  assert.equal(await page.isDisabled('#send'), true);
  await page.waitForSelector('#benchmark-state:has-text("Running")');
  await page.waitForSelector('#benchmark-result .figure[data-key=bandwidth]', { timeout: 120_000 });
  await page.waitForFunction(() => !document.getElementById('benchmark-button').disabled);
  const shown = await shownBenchmark(page);
  const info = await page.evaluate(() => window.medphi.info);
  // wgpu's adapter name (empty in Chromium), else the browser's, as the page's probe gives it.
  const adapter = info.gpu.adapter || (await page.evaluate(() => window.medphi.probe())).adapter;
  assert.ok(adapter);
  assert.equal(shown.adapter, adapter, 'next to the adapter\'s name');
  assert.equal(shown.kernels, `${info.kernels} kernels`);
  assert.match(shown.decode, /^Decode [\d.,e-]+ tok\/s$/, shown.decode);
  assert.ok(numberIn(shown.decode) > 0, shown.decode);
  assert.match(shown.prefill, /^Prefill [\d.,e-]+ tok\/s$/, shown.prefill);
  assert.match(shown.bytes, /^Read per token [\d.,e-]+ MB$/, shown.bytes);
  assert.match(shown.bandwidth, /^Effective bandwidth [\d.,e-]+ GB\/s$/, shown.bandwidth);
  assert.ok(numberIn(shown.bandwidth) > 0, shown.bandwidth);
  assert.ok(shown.bar, 'the bandwidth bar');
  assert.match(shown.text, /reference for scale, not a measurement/);
  const { text, ...figures } = shown;
  metrics.benchmark_panel = figures;
  await page.locator('#benchmark-panel').screenshot({ path: `${out}/benchmark.png` });
  await page.screenshot({ path: `${out}/benchmark-page.png`, fullPage: true });

  // The selector's family is used by the next WebGPU load from the panel.
  await page.selectOption('#gpu-kernels', 'gpu');
  await page.check('input[name=source][value=url]');
  await page.fill('#model-url', FIXTURE);
  await page.check('input[name=backend][value=webgpu]');
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("Ready: tiny-phi")', { timeout: 120_000 });
  assert.equal(await page.evaluate(() => window.medphi.info.kernels), 'gpu');
  assert.match(await page.textContent('#status'), /gpu kernels/);

  // On the CPU backend: speeds and bandwidth, no GPU kernels and no bar against a GPU's bandwidth.
  await page.check('input[name=backend][value=cpu]');
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("on CPU")', { timeout: 120_000 });
  await page.click('#benchmark-button');
  await page.waitForSelector('#benchmark-result:has-text("CPU (WebAssembly)")', { timeout: 120_000 });
  const cpu = await shownBenchmark(page);
  assert.equal(cpu.kernels, 'no GPU kernels');
  assert.ok(numberIn(cpu.decode) > 0, cpu.decode);
  assert.match(cpu.bytes, /^Read per token [\d.,e-]+ MB$/, cpu.bytes);
  assert.ok(numberIn(cpu.bandwidth) > 0, cpu.bandwidth);
  assert.equal(cpu.bar, false);
  await page.locator('#benchmark-panel').screenshot({ path: `${out}/benchmark-cpu.png` });
  assert.deepEqual(errors, []);
  await context.close();
});

test('medphi.benchmark() measures decode, bytes per token and bandwidth on WebGPU and on the CPU', async () => {
  const { page, errors, context } = await openPage();
  const r = await settle(
    page,
    async (settle, [url, prompt]) => {
      const m = window.medphi;
      const out = {};
      await m.load({ url, backend: 'webgpu', gpuKernels: 'emulator' });
      out.webgpu = await m.benchmark({ promptLen: 32, gen: 8 });
      out.info = m.info;
      out.probe = await m.probe();
      // The cached conversation was reset: generation gives the reference again.
      out.g = await m.generate({ prompt, maxNewTokens: 8, temperature: 0 });
      out.defaults = await m.benchmark();
      out.tooLong = await settle(m.benchmark({ promptLen: 250, gen: 32 }));
      out.zero = await settle(m.benchmark({ promptLen: 16, gen: 0 }));
      out.notNumber = await settle(m.benchmark({ promptLen: '16', gen: 4 }));
      const c = new AbortController();
      c.abort();
      out.preAborted = await settle(m.benchmark({ signal: c.signal }));
      await m.load({ url, backend: 'cpu' });
      out.cpu = await m.benchmark({ promptLen: 32, gen: 8 });
      return out;
    },
    [FIXTURE, PROMPT],
  );
  const w = r.webgpu;
  assert.equal(w.backend, 'webgpu');
  assert.equal(w.kernels, 'emulator');
  assert.ok(w.adapter, 'the adapter is named');
  assert.equal(w.adapter, r.info.gpu.adapter || r.probe.adapter);
  assert.equal(w.device, r.info.device);
  assert.ok(w.prefillTokS > 0, `prefill ${w.prefillTokS}`);
  assert.ok(w.decodeTokS > 0, `decode ${w.decodeTokS}`);
  assert.ok(w.bytesPerToken > 0, `bytes ${w.bytesPerToken}`);
  assert.ok(w.effectiveGbS > 0, `GB/s ${w.effectiveGbS}`);
  assert.ok(Math.abs(w.effectiveGbS - (w.bytesPerToken * w.decodeTokS) / 1e9) < 1e-9 * Math.max(1, w.effectiveGbS), 'bytes × tok/s');
  assert.deepEqual(r.g.outputIds, reference.greedy_ids.slice(0, 8), 'generation after a benchmark');
  assert.ok(r.defaults.decodeTokS > 0 && r.defaults.effectiveGbS > 0, JSON.stringify(r.defaults));
  assert.equal(r.tooLong.error?.name, 'InputError', JSON.stringify(r.tooLong));
  assert.match(r.tooLong.error.message, /do not fit the context/);
  assert.equal(r.zero.error?.name, 'InputError', JSON.stringify(r.zero));
  assert.equal(r.notNumber.error?.name, 'InputError', JSON.stringify(r.notNumber));
  assert.equal(r.preAborted.error?.name, 'AbortError');
  const c = r.cpu;
  assert.equal(c.backend, 'cpu');
  assert.equal(c.kernels, null);
  assert.equal(c.adapter, null);
  assert.ok(c.prefillTokS > 0 && c.decodeTokS > 0, JSON.stringify(c));
  // The CPU reads every weight as held (the bundled model's f32 matrices) once per token.
  assert.ok(c.bytesPerToken > 0 && c.bytesPerToken === w.bytesPerToken, `cpu ${c.bytesPerToken}, webgpu ${w.bytesPerToken}`);
  assert.ok(Math.abs(c.effectiveGbS - (c.bytesPerToken * c.decodeTokS) / 1e9) < 1e-9 * Math.max(1, c.effectiveGbS), 'bytes × tok/s');
  metrics.benchmark_webgpu_emulator = w;
  metrics.benchmark_cpu = c;
  assert.deepEqual(errors, []);
  await context.close();
});
