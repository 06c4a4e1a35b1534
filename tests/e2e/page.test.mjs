// End-to-end tests of the page (www/, served as static files like scripts/serve.sh does, from
// the repository root so that tests/fixtures is reachable too) in
// Debian's headless Chromium, driven by playwright-core. Needs www/pkg built
// (scripts/build-web.sh). Screenshots and measurements go to target/e2e/.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { chromium } from 'playwright-core';

const root = new URL('../../', import.meta.url).pathname;
const out = `${root}target/e2e`;
const reference = JSON.parse(readFileSync(`${root}tests/fixtures/reference.json`, 'utf8'));
const PROMPT = reference.prompt;
// The checkpoint tests/fixtures/reference.json was computed from by transformers.
const FIXTURE = '../tests/fixtures/tiny-phi/';
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
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: [
      '--no-sandbox',
      '--enable-unsafe-webgpu',
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-quic',
      '--disable-dev-shm-usage',
    ],
  });
});

after(async () => {
  await browser?.close();
  server?.kill();
  writeFileSync(`${out}/metrics.json`, JSON.stringify(metrics, null, 2));
  console.log('page metrics:', JSON.stringify(metrics));
});

/** A fresh page that records console errors; `ready` waits for the bundled model. */
async function openPage({ viewport = { width: 1100, height: 900 }, ready = true } = {}) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  const errors = [];
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(String(e)));
  const t0 = Date.now();
  await page.goto(base);
  if (ready) await page.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  return { page, errors, context, loadMs: Date.now() - t0 };
}

test('the bundled model loads on WebGPU by default and chat streams an answer', async () => {
  const { page, errors, context, loadMs } = await openPage();
  const status = await page.textContent('#status');
  assert.match(status, /on WebGPU/, status);
  metrics.page_load_to_ready_ms = loadMs;
  const t0 = Date.now();
  await page.fill('#prompt', 'What is macrocephaly?');
  await page.press('#prompt', 'Enter');
  await page.waitForFunction(() => document.querySelector('.msg.model')?.textContent.length > 0);
  metrics.prompt_to_first_token_ms_webgpu = Date.now() - t0;
  metrics.page_load_to_first_token_ms = loadMs + metrics.prompt_to_first_token_ms_webgpu;
  await page.waitForSelector('#speed:has-text("tok/s")', { timeout: 120_000 });
  const reply = await page.textContent('.msg.model');
  assert.ok(reply.trim().length > 0, 'the model wrote something');
  await page.screenshot({ path: `${out}/chat.png`, fullPage: true });
  assert.deepEqual(errors, []);
  await context.close();
});

test('window.medphi gives transformers\' greedy ids on both backends (the parity fixture)', async () => {
  const { page, errors, context } = await openPage();
  for (const backend of ['webgpu', 'cpu']) {
    const info = await page.evaluate(([url, b]) => window.medphi.load({ url, backend: b }), [FIXTURE, backend]);
    assert.equal(info.backend, backend);
    const g = await page.evaluate(
      (prompt) => window.medphi.generate({ prompt, maxNewTokens: 64, temperature: 0 }),
      PROMPT,
    );
    assert.deepEqual(g.inputIds, reference.input_ids, backend);
    assert.deepEqual(g.outputIds, reference.greedy_ids.slice(0, g.outputIds.length), backend);
    assert.equal(g.outputIds.length, 64, backend);
    metrics[`decode_tok_s_${backend}`] = Number(g.decodeTokS.toFixed(1));
    metrics[`prefill_tok_s_${backend}`] = Number(g.prefillTokS.toFixed(1));
  }
  assert.deepEqual(errors, []);
  await context.close();
});

// On the random-weight fixture: it never ends an answer early, so Stop always lands mid-answer.
test('Stop ends a generation on each backend, from the API and from the button', async () => {
  const { page, errors, context } = await openPage();
  for (const backend of ['webgpu', 'cpu']) {
    await page.evaluate(([url, b]) => window.medphi.load({ url, backend: b }), [FIXTURE, backend]);
    const g = await page.evaluate((prompt) => {
      let pieces = 0;
      return window.medphi.generate({
        prompt,
        maxNewTokens: 240,
        onText: () => {
          pieces += 1;
          if (pieces === 2) window.medphi.stop();
        },
      });
    }, PROMPT);
    assert.equal(g.stopReason, 'cancelled', backend);
    assert.ok(g.outputIds.length < 240, `${backend}: ${g.outputIds.length} tokens`);
  }
  // From the button, on WebGPU (tens of tokens per second on SwiftShader, so the click
  // lands mid-answer).
  await page.evaluate((url) => window.medphi.load({ url, backend: 'webgpu' }), FIXTURE);
  await page.fill('#max-tokens', '240');
  await page.fill('#prompt', 'Tell me about the heart.');
  await page.press('#prompt', 'Enter');
  await page.waitForFunction(() => document.querySelector('.msg.model')?.textContent.length > 0);
  await page.click('#stop');
  await page.waitForSelector('#speed:has-text("stopped")', { timeout: 60_000 });
  assert.deepEqual(errors, []);
  await context.close();
});

/** Clicks Export JSON and returns the downloaded run. */
async function exportResults(page) {
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#export')]);
  return JSON.parse(readFileSync(await download.path(), 'utf8'));
}

test('the MedQA panel scores the bundled sample questions with bars and exports JSON', async () => {
  const { page, errors, context } = await openPage();
  await page.click('#tab-medqa');
  await page.click('#run-samples');
  await page.waitForSelector('#bench-summary:has-text("12 of 12")', { timeout: 120_000 });
  assert.equal(await page.locator('#bench-results > li').count(), 12);
  assert.equal(await page.locator('#bench-results > li').first().locator('.option').count(), 4);
  const summary = await page.textContent('#bench-summary');
  assert.match(summary, /accuracy ± \d+\.\d \(stderr\) on 12 of 12/);
  const widths = await page.$$eval('#bench-results > li:first-child .option .bar > span', (s) =>
    s.map((e) => parseFloat(e.style.width)),
  );
  assert.ok(Math.abs(widths.reduce((a, b) => a + b, 0) - 100) < 0.5, `probabilities sum to 100%: ${widths}`);
  const exported = await exportResults(page);
  assert.equal(exported.n, 12);
  assert.equal(exported.items.length, 12);
  await page.screenshot({ path: `${out}/medqa.png`, fullPage: true });
  assert.deepEqual(errors, []);
  await context.close();
});

test('option-text scoring asks the bare question and picks by mutual information', async () => {
  const { page, errors, context } = await openPage();
  await page.click('#tab-medqa');
  await page.selectOption('#bench-task', 'medqa_4options_continuation');
  await page.click('#run-samples');
  await page.waitForSelector('#bench-summary:has-text("12 of 12")', { timeout: 120_000 });
  assert.match(await page.textContent('#bench-summary'), /mutual-information accuracy ± \d+\.\d \(stderr\) on 12 of 12/);
  const first = page.locator('#bench-results > li').first();
  const question = await first.locator('.question-text').textContent();
  assert.match(question, /^Question: .*\nAnswer:$/s);
  assert.doesNotMatch(question, /\nA\. /);
  const exported = await exportResults(page);
  for (const item of exported.items) {
    assert.equal(item.unconditional_loglikelihoods.length, 4);
    const pmi = item.loglikelihoods.map((ll, i) => ll - item.unconditional_loglikelihoods[i]);
    assert.equal(item.pred_mutual_info, pmi.indexOf(Math.max(...pmi)));
    assert.equal(item.acc_mutual_info, item.pred_mutual_info === item.gold);
  }
  const picked = await first.locator('.option').evaluateAll((rows) => rows.findIndex((r) => r.classList.contains('pick')));
  assert.equal(picked, exported.items[0].pred_mutual_info);
  // The bars show the normalised gains, so the picked option has the longest bar.
  const widths = await first.locator('.option .bar > span').evaluateAll((s) => s.map((e) => parseFloat(e.style.width)));
  assert.equal(widths.indexOf(Math.max(...widths)), picked);
  const accuracy = exported.items.filter((i) => i.acc_mutual_info).length / 12;
  assert.ok(Math.abs(exported.acc - accuracy) < 1e-9, `${exported.acc} vs ${accuracy}`);
  await page.screenshot({ path: `${out}/medqa-option-texts.png`, fullPage: true });
  assert.deepEqual(errors, []);
  await context.close();
});

test("the bundled model's held-out questions run from the panel, and Stop ends the run", async () => {
  const { page, errors, context } = await openPage();
  await page.click('#tab-medqa');
  await page.selectOption('#bench-task', 'medqa_4options_continuation');
  await page.click('#run-quiz');
  await page.waitForSelector('#bench-summary:has-text("3 of 100 tiny-medphi held-out (option texts)")', { timeout: 120_000 });
  await page.click('#bench-stop');
  await page.waitForSelector('#status:has-text("tiny-medphi held-out")', { timeout: 60_000 });
  const n = await page.locator('#bench-results > li').count();
  assert.ok(n >= 3 && n < 100, `${n} questions scored before Stop`);
  const held = readFileSync(`${root}models/tiny-medphi/medqa_test.jsonl`, 'utf8').split('\n')[0];
  const first = JSON.parse(held);
  assert.equal(await page.locator('#bench-results > li .question-text').first().textContent(), `Question: ${first.question}\nAnswer:`);
  assert.deepEqual(errors, []);
  await context.close();
});

test('an original-format benchmark upload is scored; invalid files give readable errors', async () => {
  const { page, errors, context } = await openPage();
  await page.click('#tab-medqa');
  const csv = 'What is the largest organ of the body?,Liver,Skin,Heart,Lung,B\n';
  await page.setInputFiles('#bench-file', { name: 'anatomy_test.csv', mimeType: 'text/csv', buffer: Buffer.from(csv) });
  await page.waitForSelector('#bench-summary:has-text("1 of 1")', { timeout: 60_000 });
  assert.equal(await page.inputValue('#bench-task'), 'mmlu_anatomy');

  await page.setInputFiles('#bench-file', { name: 'broken.jsonl', mimeType: 'text/plain', buffer: Buffer.from('{"question": 1}\n') });
  await page.waitForSelector('#status.error', { timeout: 30_000 });
  assert.match(await page.textContent('#status'), /broken\.jsonl:1/);

  await page.click('#model-panel summary');
  await page.setInputFiles('#model-files', [
    { name: 'config.json', mimeType: 'application/json', buffer: readFileSync(`${root}models/tiny-medphi/config.json`) },
    { name: 'tokenizer.json', mimeType: 'application/json', buffer: readFileSync(`${root}models/tiny-medphi/tokenizer.json`) },
    { name: 'model.safetensors', mimeType: 'application/octet-stream', buffer: Buffer.from('not a safetensors file') },
  ]);
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("Could not load the model")', { timeout: 30_000 });
  assert.match(await page.textContent('#status'), /model\.safetensors/);
  // The worker survived: the bundled model loads and answers again.
  const info = await page.evaluate(() => window.medphi.load({ url: 'models/tiny-medphi/', backend: 'cpu' }));
  assert.equal(info.backend, 'cpu');
  const g = await page.evaluate((prompt) => window.medphi.generate({ prompt, maxNewTokens: 4 }), PROMPT);
  assert.ok(g.outputIds.length >= 1 && g.outputIds.length <= 4, `${g.outputIds.length} tokens`);
  assert.deepEqual(errors, []);
  await context.close();
});

test('losing the GPU device falls back to the CPU with a message, and the answer still comes', async () => {
  const { page, errors, context } = await openPage();
  assert.match(await page.textContent('#status'), /on WebGPU/);
  await page.evaluate(() => window.medphi.loseGpuDevice());
  await page.fill('#prompt', 'What is macrocephaly?');
  await page.press('#prompt', 'Enter');
  await page.waitForSelector('#speed:has-text("tok/s")', { timeout: 120_000 });
  assert.match(await page.textContent('#status'), /GPU failed .*now running on the CPU/);
  assert.equal(await page.evaluate(() => window.medphi.info.backend), 'cpu');
  assert.ok((await page.textContent('.msg.model')).length > 0);
  assert.deepEqual(errors.filter((e) => !/device|GPU|lost|destroy/i.test(e)), []);
  await context.close();
});

test('phone width: nothing overflows sideways, controls are reachable by keyboard', async () => {
  const { page, errors, context } = await openPage({ viewport: { width: 390, height: 844 } });
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `page is ${overflow}px wider than the screen`);
  await page.focus('#tab-chat');
  await page.keyboard.press('ArrowRight');
  assert.equal(await page.getAttribute('#tab-medqa', 'aria-selected'), 'true');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'tab-medqa');
  await page.screenshot({ path: `${out}/phone.png`, fullPage: true });
  assert.deepEqual(errors, []);
  await context.close();
});
