// The page's CPU threads (issue #19): served cross-origin isolated as scripts/serve.sh serves
// it, the worker runs the threaded wasm build (rayon on Web Workers over shared memory);
// served without the headers, the single-threaded build, saying why; and there the service
// worker (www/isolation-sw.js) adds the headers, so a reload runs threaded. Every way gives
// the same greedy ids, for the bundled model (f32) and the q8_0 and q4_0 fixtures (our
// kernels, whose rows the threads split).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { launchChromium, serveRepo } from './harness.mjs';

const root = new URL('../../', import.meta.url).pathname;
const PROMPT = JSON.parse(readFileSync(`${root}tests/fixtures/reference.json`, 'utf8')).prompt;
const N = 24;

let browser;
const servers = [];

/** The page's address, served by a server the tests kill at the end. */
async function serve(isolation) {
  const { server, base } = await serveRepo(isolation);
  servers.push(server);
  return base;
}

before(async () => {
  browser = await launchChromium();
});

after(async () => {
  await browser?.close();
  for (const s of servers) s.kill();
});

/**
 * On the page as it is: whether it is isolated, what it says of its threads, and greedy ids
 * of both models on the CPU.
 */
async function greedyOnTheCpu(page) {
  // What the page shows once its own load of the bundled model is done.
  await page.waitForSelector('#status:has-text("Ready")', { timeout: 120_000 });
  const detail = await page.textContent('#load-detail');
  const r = await page.evaluate(
    async ([prompt, n]) => {
      const m = window.medphi;
      // A URL, or files fetched and handed over as picked files (the q4_0 fixture embeds no
      // tokenizer).
      const run = async (source) => {
        const picked = async (url) => new File([await (await fetch(url)).blob()], url.split('/').pop());
        const from = typeof source === 'string' ? { url: source } : { files: await Promise.all(source.map(picked)) };
        const info = await m.load({ ...from, backend: 'cpu' });
        const g = await m.generate({ prompt, format: 'raw', maxNewTokens: n, temperature: 0 });
        return { threads: info.threads, note: info.threadsNote, ids: g.outputIds };
      };
      return {
        isolated: self.crossOriginIsolated,
        cores: navigator.hardwareConcurrency,
        bundled: await run('models/tiny-medphi/'),
        q8: await run('../tests/fixtures/tiny-phi-q8_0.gguf'),
        q4: await run(['../tests/fixtures/tiny-phi-q4_0.gguf', '../tests/fixtures/tiny-phi/tokenizer.json']),
      };
    },
    [PROMPT, N],
  );
  return { ...r, detail };
}

async function openPage(base) {
  const context = await browser.newContext();
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  await page.goto(base);
  return { context, page, errors };
}

test('isolated, the CPU runs threaded; without isolation, one thread, said so; after the service worker, threaded again; all give the same ids', async () => {
  const isolatedBase = await serve(true);
  const plainBase = await serve(false);

  const a = await openPage(isolatedBase);
  const threaded = await greedyOnTheCpu(a.page);
  assert.equal(threaded.isolated, true);
  const want = Math.min(threaded.cores, 16);
  assert.ok(want >= 2, `this test needs a machine with 2 or more cores (navigator.hardwareConcurrency = ${threaded.cores})`);
  for (const model of ['bundled', 'q8', 'q4']) {
    assert.equal(threaded[model].threads, want, `${model}: ${JSON.stringify(threaded[model])}`);
    assert.equal(threaded[model].note, null);
    assert.equal(threaded[model].ids.length, N);
  }
  assert.deepEqual(a.errors, []);
  await a.context.close();

  const b = await openPage(plainBase);
  const single = await greedyOnTheCpu(b.page);
  assert.equal(single.isolated, false);
  for (const model of ['bundled', 'q8', 'q4']) {
    assert.equal(single[model].threads, 1);
    assert.match(single[model].note, /not cross-origin isolated/);
    assert.deepEqual(single[model].ids, threaded[model].ids, `${model}: one thread gives the threaded build's ids`);
  }
  // The page says so; the service worker is registered meanwhile.
  await b.page.evaluate(() => navigator.serviceWorker.ready);
  assert.match(single.detail, /1 CPU thread \(this page is not cross-origin isolated/);

  // The service worker now answers for the site: reloaded, the page is isolated and threaded.
  await b.page.reload();
  const afterReload = await greedyOnTheCpu(b.page);
  assert.equal(afterReload.isolated, true, 'isolation-sw.js made the reloaded page cross-origin isolated');
  for (const model of ['bundled', 'q8', 'q4']) {
    assert.equal(afterReload[model].threads, want);
    assert.deepEqual(afterReload[model].ids, threaded[model].ids, `${model}: same ids under the service worker`);
  }
  assert.match(afterReload.detail, new RegExp(`${want} CPU threads`));
  assert.deepEqual(b.errors, []);
  await b.context.close();
});
