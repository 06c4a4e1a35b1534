#!/usr/bin/env node
// Loads a model into the page in headless Chromium as a user who picks its files does
// (read with Blob.slice, tensor by tensor) and measures the load: seconds, the wasm memory's
// size after it, and greedy prefill and decode speed (of a second generation, and of the first:
// `cold`). For checkpoints too big for the test suite, such as one of Phi-2's exact shape
// (scripts/measure/make_phi2_shaped.py) or its export-gguf.
//
// Usage: node scripts/measure/page-load.mjs OPTIONS_JSON FILE...
//   OPTIONS_JSON: what window.medphi.load gets besides the files, plus `backends` (a list)
//   and `isolated` (default true: served as scripts/serve.sh serves it, cross-origin isolated,
//   so the CPU runs the threaded build; false: the single-threaded build) and `gen` (tokens
//   decoded, default 8),
//   e.g. '{"backends": ["cpu", "webgpu"], "quantize": "q4_0", "context": 256}'.
// Needs www/pkg (scripts/build-web.sh). Prints one JSON object per backend.
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { resolve } from 'node:path';
import { launchChromium } from '../../tests/e2e/harness.mjs';

const [optionsJson, ...files] = process.argv.slice(2);
if (!optionsJson || files.length === 0) {
  console.error('usage: node scripts/measure/page-load.mjs OPTIONS_JSON FILE...');
  process.exit(2);
}
const { backends = ['cpu'], isolated = true, gen = 8, ...options } = JSON.parse(optionsJson);
const root = new URL('../../', import.meta.url).pathname;
// 64 tokens of prompt, as in issue #19's Phi-2-size measurements.
const PROMPT = 'Instruct: A 45-year-old man presents with crushing chest pain radiating to his left arm, sweating and nausea for the past hour. What is the most likely diagnosis and the first investigation?\nOutput:';

const serve = [`${root}scripts/serve-www.py`, '--port', '0', ...(isolated ? [] : ['--no-isolation']), root];
const server = spawn('python3', ['-u', ...serve], {
  stdio: ['ignore', 'pipe', 'ignore'],
});
const base = await new Promise((done, reject) => {
  server.stdout.on('data', (d) => {
    const m = String(d).match(/port (\d+)/);
    if (m) done(`http://127.0.0.1:${m[1]}/www/`);
  });
  server.on('exit', (code) => reject(new Error(`http.server exited with ${code}`)));
});
const browser = await launchChromium();
try {
  for (const backend of backends) {
    // A fresh page per backend: wasm memory never shrinks.
    const page = await browser.newPage();
    page.on('pageerror', (e) => console.error('page error:', String(e)));
    await page.goto(base);
    await page.waitForSelector('#status:has-text("Ready")', { timeout: 300_000 });
    await page.setInputFiles('#model-files', files.map((f) => resolve(f)));
    const r = await page.evaluate(
      async ([backend, options, prompt, gen]) => {
        const m = window.medphi;
        const picked = [...document.getElementById('model-files').files];
        let tensors = 0;
        const t0 = performance.now();
        try {
          const info = await m.load({ files: picked, backend, ...options, freeFirst: true, onProgress: (p) => (tensors += p.tensor !== undefined) });
          const loadSeconds = (performance.now() - t0) / 1000;
          // The first generation runs while the browser still compiles the hot wasm
          // functions with its optimizing tier (the baseline tier runs meanwhile); the
          // second is what a user waits for from then on (llama.cpp, and so wllama, also
          // runs a warm-up token as it loads). Both are reported. The first prompt shares no
          // prefix with the second, whose prefill would otherwise come from the KV cache.
          const cold = await m.generate({ prompt: `Question: ${prompt}`, format: 'raw', maxNewTokens: gen, temperature: 0 });
          const g = await m.generate({ prompt, format: 'raw', maxNewTokens: gen, temperature: 0 });
          return { backend: info.backend, threads: info.threads, threadsNote: info.threadsNote, format: info.format, quantize: info.quantize, context: info.context, parameters: info.parameters, tensors, loadSeconds, wasmMemoryBytes: info.wasmMemoryBytes, promptTokens: g.inputIds.length, newTokens: g.outputIds.length, prefillTokS: g.prefillTokS, decodeTokS: g.decodeTokS, coldPrefillTokS: cold.prefillTokS, coldDecodeTokS: cold.decodeTokS };
        } catch (e) {
          return { backend, error: `${e.name}: ${e.message}`, seconds: (performance.now() - t0) / 1000 };
        }
      },
      [backend, options, PROMPT, gen],
    );
    const fileBytes = files.reduce((a, f) => a + statSync(f).size, 0);
    console.log(JSON.stringify({ fileBytes, isolated, ...options, ...r, wasmMemoryOverFiles: r.wasmMemoryBytes ? +(r.wasmMemoryBytes / fileBytes).toFixed(3) : null }));
    await page.close();
  }
} finally {
  await browser.close();
  server.kill();
}
