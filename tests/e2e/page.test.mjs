// End-to-end tests of the page (www/, served as static files like scripts/serve.sh does, from
// the repository root so that tests/fixtures is reachable too) in
// Debian's headless Chromium, driven by playwright-core. Needs www/pkg built
// (scripts/build-web.sh). Screenshots and measurements go to target/e2e/.
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

/** Clicks Export JSON and returns the downloaded run (lm-eval's results object) and its file name. */
async function exportResults(page) {
  const [download] = await Promise.all([page.waitForEvent('download'), page.click('#export')]);
  return { exported: JSON.parse(readFileSync(await download.path(), 'utf8')), filename: download.suggestedFilename() };
}

/**
 * The exported `results[task]` are lm-eval's aggregates of the exported sample lines: each
 * metric the mean of the samples' per-item values, its stderr the sample standard deviation
 * over √n ("N/A" for one sample).
 */
function assertMetricsAreSampleMeans(exported, task, names) {
  const metrics = exported.results[task];
  const lines = exported.samples[task];
  for (const name of names) {
    const values = lines.map((l) => l[name]);
    assert.ok(values.every((v) => v === 0 || v === 1), `${name}: ${values}`);
    const n = values.length;
    const mean = values.reduce((a, b) => a + b, 0) / n;
    assert.ok(Math.abs(metrics[`${name},none`] - mean) < 1e-12, `${name}: ${metrics[`${name},none`]} vs ${mean}`);
    if (n < 2) {
      assert.equal(metrics[`${name}_stderr,none`], 'N/A', name);
    } else {
      const se = Math.sqrt(values.reduce((a, v) => a + (v - mean) ** 2, 0) / (n - 1) / n);
      assert.ok(Math.abs(metrics[`${name}_stderr,none`] - se) < 1e-12, `${name} stderr: ${metrics[`${name}_stderr,none`]} vs ${se}`);
    }
  }
}

/** The summary's big number and stderr, as the page shows them. */
async function shownAccuracy(page) {
  const big = await page.textContent('#bench-summary .big');
  const detail = await page.textContent('#bench-summary .detail');
  return { percent: big, stderr: detail.match(/± (\d+\.\d) \(stderr\)/)?.[1] ?? null };
}

/** Asserts the summary shows the exported `metric` and its stderr, as percentages to one decimal. */
async function assertShowsMetric(page, exported, task, metric) {
  const shown = await shownAccuracy(page);
  const m = exported.results[task];
  assert.equal(shown.percent, `${(100 * m[`${metric},none`]).toFixed(1)}%`);
  assert.equal(shown.stderr, (100 * m[`${metric}_stderr,none`]).toFixed(1));
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
  const { exported, filename } = await exportResults(page);
  const task = 'medqa_4options';
  assert.equal(filename, `medphi-${task}-results.json`);
  assert.deepEqual(exported['n-samples'][task], { original: 12, effective: 12 });
  assert.equal(exported.samples[task].length, 12);
  assert.deepEqual(exported.samples[task].map((l) => l.doc_id), [...Array(12).keys()]);
  assert.equal(exported.results[task]['acc_mutual_info,none'], undefined, 'letters: no mutual information');
  assertMetricsAreSampleMeans(exported, task, ['acc', 'acc_norm']);
  await assertShowsMetric(page, exported, task, 'acc');
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
  const { exported, filename } = await exportResults(page);
  const task = 'medqa_4options_continuation';
  assert.equal(filename, `medphi-${task}-results.json`);
  assert.deepEqual(exported['n-samples'][task], { original: 12, effective: 12 });
  const lines = exported.samples[task];
  assert.equal(lines.length, 12);
  // lm-eval's sample lines: 4 requests (question, " option") then 4 unconditional ("", option);
  // the pick by mutual information is the largest gain of the first over the second.
  const predMutualInfo = (line) => {
    const ll = line.filtered_resps.map(([v]) => v);
    const pmi = ll.slice(0, 4).map((v, i) => v - ll[4 + i]);
    return pmi.indexOf(Math.max(...pmi));
  };
  for (const line of lines) {
    assert.equal(line.arguments.length, 8);
    assert.equal(line.filtered_resps.length, 8);
    assert.ok(line.arguments.slice(4).every(([context]) => context === ''), JSON.stringify(line.arguments));
    assert.equal(line.acc_mutual_info, predMutualInfo(line) === line.target ? 1 : 0);
  }
  assert.equal(lines[0].arguments[0][0], question);
  const picked = await first.locator('.option').evaluateAll((rows) => rows.findIndex((r) => r.classList.contains('pick')));
  assert.equal(picked, predMutualInfo(lines[0]));
  // The bars show the normalised gains, so the picked option has the longest bar.
  const widths = await first.locator('.option .bar > span').evaluateAll((s) => s.map((e) => parseFloat(e.style.width)));
  assert.equal(widths.indexOf(Math.max(...widths)), picked);
  // The accuracy shown is the exported metric, the mean of the lines' acc_mutual_info.
  assertMetricsAreSampleMeans(exported, task, ['acc', 'acc_norm', 'acc_mutual_info']);
  await assertShowsMetric(page, exported, task, 'acc_mutual_info');
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
  const heldOut = readFileSync(`${root}models/tiny-medphi/medqa_test.jsonl`, 'utf8').split('\n').filter((l) => l.trim());
  const first = JSON.parse(heldOut[0]);
  // The export covers what was scored, out of the whole file.
  const { exported } = await exportResults(page);
  const task = 'medqa_4options_continuation';
  assert.deepEqual(exported['n-samples'][task], { original: heldOut.length, effective: n });
  assert.equal(exported.config.limit, 100);
  assert.deepEqual(exported.samples[task][0].doc, first);
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
