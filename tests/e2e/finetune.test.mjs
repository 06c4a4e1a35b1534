// Fine-tuning in the page (issue #18): `medphi.finetune` called the moment the page opens
// (while it still loads its bundled model) lowers the loss on the workshop set; the adapter
// it leaves applied changes the greedy answer, `useBase` brings the base's back without a
// reload; the CLI with the page's adapter gives the page's greedy ids; `medphi train` with
// the same data, seed and settings makes the same adapter (within float tolerance) and the
// same losses; `peft` on transformers reproduces the adapted model's logits; and the
// Fine-tune tab's loss plot and before/after panel are checked in a screenshot.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { launchChromium, serveRepo } from './harness.mjs';

const root = new URL('../../', import.meta.url).pathname;
const bin = process.env.MEDPHI_BIN || `${process.env.CARGO_TARGET_DIR || `${process.env.HOME}/.cache/medphi-target`}/debug/medphi`;
const SFT = `${root}www/samples/workshop/sft.jsonl`;
// The first 32 rows (16 terms), so that 24 steps of 8 run six epochs.
const ROWS = readFileSync(SFT, 'utf8').trim().split('\n').slice(0, 32);
const DATA = ROWS.map((l) => JSON.parse(l));
const BASE = `${root}www/models/tiny-medphi`;
const PROMPT = 'Instruct: What is intratubular erythrocyte cast?\nOutput:';
const SETTINGS = { loraRank: 4, loraAlpha: 8, steps: 24, batchSize: 8, lr: 0.01, seed: 11 };
const N = 16;

let browser;
let server;
let base;
const tmp = mkdtempSync(join(tmpdir(), 'medphi-finetune-'));

before(async () => {
  browser = await launchChromium();
  ({ server, base } = await serveRepo());
});

after(async () => {
  await browser?.close();
  server?.kill();
  rmSync(tmp, { recursive: true, force: true });
});

/** The f32 tensors of a safetensors file, by name. */
function safetensors(bytes) {
  const n = Number(Buffer.from(bytes).readBigUInt64LE(0));
  const header = JSON.parse(Buffer.from(bytes.slice(8, 8 + n)).toString('utf8'));
  const out = {};
  for (const [name, t] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    assert.equal(t.dtype, 'F32', name);
    const [a, b] = t.data_offsets;
    const data = Buffer.from(bytes.slice(8 + n + a, 8 + n + b));
    out[name] = new Float32Array(data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
  }
  return out;
}

function writeAdapter(files, dir) {
  mkdirSync(dir, { recursive: true });
  for (const f of files) writeFileSync(join(dir, f.name), Buffer.from(f.bytes));
  return dir;
}

function mean(xs) {
  return xs.reduce((a, b) => a + b, 0) / xs.length;
}

test('finetune in the page: lower loss, adapter applied, base back, the CLI agrees, peft agrees', { timeout: 900_000 }, async () => {
  const context = await browser.newContext({ viewport: { width: 1200, height: 1400 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(base);
  // The page's own load of the bundled model is still under way: the request waits for it.
  await page.waitForFunction(() => window.medphi);
  const r = await page.evaluate(
    async ([data, settings, prompt, n]) => {
      const m = window.medphi;
      const progress = [];
      const tuned = await m.finetune({ data, ...settings, onProgress: (p) => progress.push(p) });
      const greedy = async () => (await m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 })).outputIds;
      const adapted = await greedy();
      const baseInfo = await m.useBase();
      const baseIds = await greedy();
      const adaptedInfo = await m.useAdapter();
      const again = await greedy();
      // Bad input is refused with the row named, and the model in use stays.
      const bad = await m.finetune({ data: [...data.slice(0, 3), { prompt: 'no response' }], steps: 2 }).catch((e) => `${e.name}: ${e.message}`);
      const badSetting = await m.finetune({ data, steps: 0 }).catch((e) => `${e.name}: ${e.message}`);
      // Uploaded files: CSV with quoted commas and newlines, and a malformed row named by its line.
      const csv = await m.parseTrainingRows('prompt,response\n"Instruct: a, b?\nOutput:", yes\nq2,r2\n', 'pairs.csv');
      const badCsv = await m.parseTrainingRows('prompt,response\na,b\nc\n', 'pairs.csv').catch((e) => `${e.name}: ${e.message}`);
      const badJsonl = await m.parseTrainingRows('{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', 'pairs.jsonl').catch((e) => `${e.name}: ${e.message}`);
      const refusedKept = m.info.adaptedMatrices;
      // Stop ends a run after the step under way and keeps what it learnt, applied.
      let asked = false;
      const stopped = await m.finetune({
        data,
        steps: 500,
        onProgress: (p) => {
          if (p.step >= 3 && !asked) {
            asked = true;
            m.stop();
          }
        },
      });
      const stoppedInfo = m.info.adaptedMatrices;
      // The first adapter, handed back as files, applied onto the base: its greedy ids again.
      const applied = await m.applyAdapter(tuned.adapterFiles);
      const reapplied = await greedy();
      return {
        stopped: { stopped: stopped.stopped, steps: stopped.steps, losses: stopped.losses.length, adapted: stoppedInfo },
        applied: applied.adaptedMatrices,
        refusedKept,
        reapplied,
        losses: tuned.losses,
        steps: tuned.steps,
        progress: progress.filter((p) => p.step !== undefined).map((p) => [p.step, p.steps, p.loss]),
        files: tuned.adapterFiles.map((f) => ({ name: f.name, bytes: Array.from(f.bytes) })),
        threads: tuned.info.threads,
        adaptedMatrices: tuned.info.adaptedMatrices,
        adapted,
        baseIds,
        again,
        baseAdapted: baseInfo.adaptedMatrices,
        backAdapted: adaptedInfo.adaptedMatrices,
        bad,
        badSetting,
        csv,
        badCsv,
        badJsonl,
      };
    },
    [DATA, SETTINGS, PROMPT, N],
  );
  assert.deepEqual(errors, []);
  assert.equal(r.steps, SETTINGS.steps);
  assert.equal(r.losses.length, SETTINGS.steps);
  assert.deepEqual(r.progress.map((p) => p[0]), [...Array(SETTINGS.steps).keys()].map((i) => i + 1));
  assert.deepEqual(r.progress.map((p) => p[2]), r.losses);
  const [first, last] = [mean(r.losses.slice(0, 4)), mean(r.losses.slice(-4))];
  assert.ok(last < 0.7 * first, `the loss fell from ${first} to ${last}`);
  // Every q, k, v, dense, fc1 and fc2 of the 4 layers.
  assert.equal(r.adaptedMatrices, 24);
  assert.equal(r.baseAdapted, 0);
  assert.equal(r.backAdapted, 24);
  assert.notDeepEqual(r.adapted, r.baseIds, 'the adapter changes the greedy answer');
  assert.deepEqual(r.again, r.adapted);
  assert.match(r.bad, /InputError|FileError/);
  assert.match(r.bad, /data row 4.*`response`/);
  assert.match(r.badSetting, /steps must be/);
  assert.deepEqual(r.csv, [
    { prompt: 'Instruct: a, b?\nOutput:', response: ' yes' },
    { prompt: 'q2', response: 'r2' },
  ]);
  assert.match(r.badCsv, /FileError: pairs\.csv.*line:? 3/);
  assert.match(r.badJsonl, /FileError: pairs\.jsonl:2: missing string field `response`/);
  assert.equal(r.stopped.stopped, true);
  assert.ok(r.stopped.steps >= 3 && r.stopped.steps < 10, JSON.stringify(r.stopped));
  assert.equal(r.stopped.losses, r.stopped.steps);
  assert.equal(r.stopped.adapted, 24, "the stopped run's adapter is applied");
  assert.equal(r.refusedKept, 24, 'the adapter stays in use after the refused requests');
  assert.equal(r.applied, 24);
  assert.deepEqual(r.reapplied, r.adapted);

  // The CLI with the page's adapter, and without it, gives the page's greedy ids.
  const dir = writeAdapter(
    r.files.map((f) => ({ name: f.name, bytes: Uint8Array.from(f.bytes) })),
    join(tmp, 'page-adapter'),
  );
  const cli = (...extra) =>
    JSON.parse(
      execFileSync(bin, ['generate', '--model', BASE, '--prompt', PROMPT, '--prompt-format', 'raw', '--max-new-tokens', String(N), '--temperature', '0', '--json', ...extra], {
        encoding: 'utf8',
      }),
    ).output_ids;
  assert.deepEqual(cli('--adapter', dir), r.adapted);
  assert.deepEqual(cli(), r.baseIds);

  // `medphi train` with the same data, seed and settings: the same adapter and losses.
  const out = join(tmp, 'cli-run');
  const data = join(tmp, 'rows.jsonl');
  writeFileSync(data, ROWS.join('\n') + '\n');
  const s = SETTINGS;
  execFileSync(bin, ['train', '--stage', 'sft', '--data', data, '--init-from', BASE, '--out', out, '--steps', String(s.steps), '--lora-rank', String(s.loraRank),
    '--lora-alpha', String(s.loraAlpha), '--batch-size', String(s.batchSize), '--lr', String(s.lr), '--seed', String(s.seed)], { stdio: 'ignore' });
  const cliLosses = readFileSync(join(out, 'metrics.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l).loss);
  assert.equal(cliLosses.length, s.steps);
  cliLosses.forEach((l, i) => assert.ok(Math.abs(l - r.losses[i]) <= 1e-4 * Math.max(1, Math.abs(l)), `step ${i + 1}: CLI loss ${l}, page ${r.losses[i]}`));
  const ours = safetensors(readFileSync(join(dir, 'adapter_model.safetensors')));
  const theirs = safetensors(readFileSync(join(out, 'adapter_model.safetensors')));
  assert.deepEqual(Object.keys(ours).sort(), Object.keys(theirs).sort());
  let worst = 0;
  let largest = 0;
  for (const name of Object.keys(ours)) {
    for (let i = 0; i < ours[name].length; i++) {
      worst = Math.max(worst, Math.abs(ours[name][i] - theirs[name][i]));
      // B starts at zero: how far it moved is what training did.
      if (name.includes('lora_B')) largest = Math.max(largest, Math.abs(theirs[name][i]));
    }
  }
  // An AdamW step moves a value by about lr at most: float differences between wasm and
  // native code (no fused multiply-add, other summation orders) stay far below one step.
  assert.ok(largest > 10 * s.lr, `the adapters moved (largest value ${largest})`);
  assert.ok(worst <= 0.05 * s.lr, `adapters differ by ${worst} (lr ${s.lr}, largest value ${largest})`);
  const config = JSON.parse(readFileSync(join(dir, 'adapter_config.json'), 'utf8'));
  assert.equal(config.peft_type, 'LORA');
  assert.equal(config.r, s.loraRank);
  assert.equal(config.lora_alpha, s.loraAlpha);

  // peft loads the page's adapter onto transformers' model of the base: the same logits.
  const parity = JSON.parse(
    execFileSync('python3', [`${root}scripts/check-transformers-parity.py`, BASE, PROMPT, '--adapter', dir], {
      encoding: 'utf8',
      env: { ...process.env, MEDPHI: bin },
      stdio: ['ignore', 'pipe', 'ignore'],
    }),
  );
  assert.ok(parity.max_abs_logit_diff < 1e-4, JSON.stringify(parity));
  await context.close();
});

test('the Fine-tune tab: a workshop run, its loss plot and the before/after panel (screenshot)', { timeout: 1_200_000 }, async () => {
  const context = await browser.newContext({ viewport: { width: 1100, height: 1600 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.goto(base);
  await page.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  // On the CPU: headless Chromium's WebGPU is SwiftShader, a CPU emulating a GPU, which
  // scores the quizzes 30× slower than the wasm CPU backend. (Training runs on the CPU either way.)
  await page.click('#model-panel summary');
  await page.check('input[name=backend][value=cpu]');
  await page.click('#load-button');
  await page.waitForSelector('#status:has-text("on CPU")', { timeout: 120_000 });
  await page.click('#model-panel summary');
  await page.click('#tab-finetune');
  assert.equal(await page.isVisible('#view-finetune'), true);
  // The workshop set with the tab's defaults: what an educator clicks.
  const t0 = Date.now();
  await page.click('#ft-start');
  await page.waitForSelector('#status:has-text("Fine-tuned for 100 steps")', { timeout: 900_000 });
  const seconds = (Date.now() - t0) / 1000;
  const plot = await page.evaluate(() => {
    const c = document.getElementById('ft-loss');
    const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    // The moving average's colour (#0b6bcb) and the dots' (#8aa4bf).
    let line = 0;
    let dots = 0;
    for (let i = 0; i < px.length; i += 4) {
      if (px[i] === 0x0b && px[i + 1] === 0x6b && px[i + 2] === 0xcb) line++;
      if (px[i] === 0x8a && px[i + 1] === 0xa4 && px[i + 2] === 0xbf) dots++;
    }
    return { points: c.dataset.points, label: c.getAttribute('aria-label'), line, dots };
  });
  assert.equal(plot.points, '100');
  assert.match(plot.label, /100 of 100 steps, from [\d.]+ to [\d.]+/);
  assert.ok(plot.line > 300 && plot.dots > 200, JSON.stringify(plot));
  assert.match(await page.textContent('#ft-in-use'), /Base \+ adapter in use \(24 matrices adapted\); the base is kept loaded/);
  assert.match(await page.textContent('#ft-stats'), /step 100\/100 · loss [\d.]+ · \d+ tokens\/s/);

  await page.click('#ft-compare');
  await page.waitForSelector('#status:has-text("Compared the base and the adapted model")', { timeout: 900_000 });
  const shown = await page.$$eval('.compare-row', (rows) =>
    rows.map((r) => {
      const [acc, se] = r.querySelector('.compare-value').textContent.match(/[\d.]+/g).map(Number);
      return { who: r.firstChild.textContent, acc, se, width: parseFloat(r.querySelector('.accuracy-bar > span').style.width) };
    }),
  );
  assert.deepEqual(shown.map((r) => r.who), ['base', 'base + adapter', 'base', 'base + adapter']);
  for (const r of shown) assert.ok(Math.abs(r.width - r.acc) < 0.06, JSON.stringify(r));
  const [taughtBase, taughtAdapted] = shown;
  // The workshop's point: the taught terms are recognised far more often after the fine-tune.
  assert.ok(taughtAdapted.acc > taughtBase.acc + 2 * (taughtBase.se + taughtAdapted.se), JSON.stringify(shown));
  const answers = await page.$$eval('table.answers tbody tr', (trs) => trs.map((tr) => [...tr.cells].map((td) => td.textContent)));
  assert.equal(answers.length, 3);
  // The adapted model in use again afterwards, as before the comparison.
  assert.match(await page.textContent('#ft-in-use'), /Base \+ adapter in use/);
  const out = `${root}target/e2e`;
  mkdirSync(out, { recursive: true });
  const png = await page.locator('#view-finetune').screenshot({ path: `${out}/finetune.png` });
  assert.ok(png.length > 30_000, `screenshot of ${png.length} bytes`);
  writeFileSync(`${out}/finetune.json`, JSON.stringify({ seconds, shown, answers, threads: await page.evaluate(() => window.medphi.info.threads) }, null, 2));
  assert.deepEqual(errors, []);
  await context.close();
});
