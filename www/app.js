// The page: wires the controls to `window.medphi` (medphi-api.js). Model work happens in
// the worker, so nothing here blocks; this file only renders.
import { MedphiApi } from './medphi-api.js';
import { initFinetuneTab } from './finetune-tab.js';

const BUNDLED_MODEL = 'models/tiny-medphi/';
// The model picker's presets: each fills in the source and the conversion, then Load loads it.
// MedPhi-2's checkpoint has no repository this page could verify, so its entry asks for
// the folder URL rather than guess one.
const PRESETS = {
  bundled: {
    source: 'bundled',
    quantize: '',
    note: 'tiny-medphi, the demo model that comes with this page: loads at once and works offline.',
  },
  'phi-2': {
    source: 'url',
    url: 'https://huggingface.co/microsoft/phi-2/resolve/main/',
    quantize: 'q4_0',
    note:
      "Microsoft's Phi-2 (2.7 B parameters) from Hugging Face: its published f16 shards (5.6 GB) stream in tensor by tensor, " +
      'converted to q4_0 as they load (1.6 GB of weights), and are kept in this browser for offline use; an interrupted download continues where it stopped.',
  },
  'medphi-2': {
    source: 'url',
    url: '',
    quantize: 'q4_0',
    note:
      'MedPhi-2 (Phi-2 further trained on medical text): paste the Hugging Face folder URL of its checkpoint ' +
      '(https://huggingface.co/<org>/<repo>/resolve/main/) into “From a URL”; it is converted to q4_0 as it loads.',
  },
};
const SAMPLES = 'samples/medqa-sample.jsonl';
const QUIZ_QUESTIONS = 100;

const $ = (id) => document.getElementById(id);
const api = new MedphiApi();
window.medphi = api;

let gpu = { webgpu: false };
let busy = false;

// ---- status line -------------------------------------------------------------------

function status(text, kind = '') {
  const el = $('status');
  el.textContent = text;
  el.className = `status ${kind}`;
}

api.addEventListener('warning', (e) => status(e.detail, 'warning'));

// Whatever loaded it (this page, the console, a test), the status names the model in use.
api.addEventListener('model', ({ detail: { info, source: src } }) => {
  $('kernels-in-use').textContent = info?.kernels ? `in use: ${info.kernels}` : info ? 'in use: none (CPU backend)' : '';
  updateBenchmarkButton();
  refreshCached();
  if (!info) return;
  const radio = document.querySelector(`input[name=backend][value=${info.backend}]`);
  if (radio) radio.checked = true;
  status(describe(info, src));
});

function modelName(src) {
  return src?.files ? src.files.map((f) => f.name).join(', ') : (src?.url || 'model').replace(/\/$/, '').split('/').pop();
}

function describe(info, src) {
  const params = info.parameters >= 1e9 ? `${(info.parameters / 1e9).toFixed(2)} B` : `${(info.parameters / 1e6).toFixed(1)} M`;
  const kernels = info.kernels ? `, ${info.kernels} kernels` : '';
  const where = info.backend === 'webgpu' ? `WebGPU (${info.gpu?.adapter || gpu.adapter || 'adapter'}${kernels})` : 'CPU (WebAssembly)';
  const adapter = src?.adapter ? ` + LoRA adapter ${modelName(src.adapter)} (${info.adaptedMatrices} matrices merged)` : '';
  const format = info.quantize ? `${info.format} converted to ${info.quantize} on load` : info.format;
  return `Ready: ${modelName(src)}${adapter}, ${params} parameters, ${format}, context ${info.context} — on ${where}, loaded in ${(info.loadMs / 1000).toFixed(1)} s`;
}

// ---- loading -------------------------------------------------------------------------

function chosen(name) {
  return document.querySelector(`input[name=${name}]:checked`)?.value;
}

let pickedFiles = [];
let pickedAdapter = [];

function source() {
  const kind = chosen('source');
  if (kind === 'url') {
    const url = $('model-url').value.trim();
    if (!url) throw Object.assign(new Error('enter a model URL first'), { name: 'InputError' });
    return { url };
  }
  if (kind === 'files') {
    if (!pickedFiles.length) throw Object.assign(new Error('choose or drop model files first'), { name: 'InputError' });
    return { files: pickedFiles };
  }
  return { url: BUNDLED_MODEL };
}

/** The adapter chosen in the panel, as load's options: picked files, else a folder URL, else none. */
function adapterChoice() {
  if (pickedAdapter.length) return { adapterFiles: pickedAdapter };
  const url = $('adapter-url').value.trim();
  return url ? { adapterUrl: url } : {};
}

/** `api.source` (where a model came from) as load's options, to load the same model again. */
function sameSource({ adapter, ...model }) {
  if (adapter?.files) return { ...model, adapterFiles: adapter.files };
  return adapter ? { ...model, adapterUrl: adapter.url } : model;
}

let loadsStarted = 0;

// Starts loading at once (no await before api.load: the startup load must be the first
// request the worker sees, so that a load made from the console supersedes it). `src`:
// load's source options (url or files, adapterUrl or adapterFiles); `quantize`: its conversion.
async function load(src, backend, { quantize } = {}) {
  const mine = ++loadsStarted;
  setBusy(true);
  const bar = $('load-progress');
  bar.hidden = false;
  bar.value = 0;
  const sizes = new Map();
  let download = '';
  let tensor = '';
  status(`Loading the model${{ webgpu: ' on WebGPU', cpu: ' on the CPU' }[backend] || ''}…`);
  try {
    const info = await api.load({
      ...src,
      backend,
      quantize,
      gpuKernels: $('gpu-kernels').value,
      onProgress: (p) => {
        if (mine !== loadsStarted) return;
        if (p.tensor !== undefined) {
          // Weights are read, converted and uploaded one tensor at a time: the bar follows
          // them from here on, while downloads (made as tensors need them) keep their line.
          tensor = `converting ${p.tensor} (${p.index + 1}/${p.total})`;
          bar.value = p.index / p.total;
        } else {
          sizes.set(p.file, p);
          const speed = p.bytesPerSecond ? `, ${(p.bytesPerSecond / 1e6).toFixed(1)} MB/s` : '';
          download = `${p.file}: ${mb(p.loaded)}${p.total ? ` of ${mb(p.total)}` : ''}${speed}${p.cached ? ' (from the offline cache)' : ''}`;
          if (!tensor) {
            const loaded = [...sizes.values()].reduce((a, f) => a + f.loaded, 0);
            const total = [...sizes.values()].reduce((a, f) => a + (f.total || f.loaded), 0);
            bar.value = total ? loaded / total : 0;
          }
        }
        $('load-detail').textContent = [tensor, download].filter(Boolean).join(' · ');
      },
    });
    if (mine === loadsStarted) {
      bar.value = 1;
      $('load-detail').textContent = `${info.device} · ${cpuThreads(info)} · WebAssembly memory ${size(info.wasmMemoryBytes)}`;
    }
    return info;
  } catch (e) {
    // Superseded: a later load (this page's or the console's) is under way and its end
    // sets the status.
    if (e.name !== 'SupersededError') status(`Could not load the model: ${e.message}`, 'error');
    throw e;
  } finally {
    if (mine === loadsStarted) bar.hidden = true;
    setBusy(false);
    // Downloads enter the cache file by file, so even a failed load may have kept some.
    refreshCached();
  }
}

function mb(bytes) {
  return `${(bytes / 1048576).toFixed(1)} MB`;
}

function size(bytes) {
  if (bytes >= 2 ** 30) return `${(bytes / 2 ** 30).toFixed(2)} GB`;
  return bytes >= 2 ** 20 ? mb(bytes) : `${(bytes / 1024).toFixed(1)} KB`;
}

// Runs `task`; if the GPU fails under it, reloads the same model on the CPU and retries once.
async function withGpuFallback(task) {
  try {
    return await task();
  } catch (e) {
    if (e.name !== 'GpuError' || api.info?.backend !== 'webgpu') throw e;
    status(`The GPU failed (${e.message}); switching to the CPU…`, 'warning');
    // The same model, adapter and conversion, on the CPU.
    await load(sameSource(api.source), 'cpu', { quantize: api.info.quantize ?? undefined });
    status(`The GPU failed (${e.message}); now running on the CPU.`, 'warning');
    return task();
  }
}

$('load-button').addEventListener('click', async () => {
  let src;
  try {
    src = source();
  } catch (e) {
    status(`Could not load the model: ${e.message}`, 'error');
    return;
  }
  // An empty choice is no conversion (Model.load's default), not a quantization named "".
  await load({ ...src, ...adapterChoice() }, chosen('backend'), { quantize: $('quantize').value || undefined }).catch(() => {}); // load() shows the error
});

$('model-preset').addEventListener('change', () => {
  const preset = PRESETS[$('model-preset').value];
  $('preset-note').textContent = preset?.note ?? '';
  if (!preset) return;
  document.querySelector(`input[name=source][value=${preset.source}]`).checked = true;
  $('quantize').value = preset.quantize;
  if (preset.source !== 'url') return;
  $('model-url').value = preset.url;
  if (!preset.url) $('model-url').focus();
});

$('clear-cache').addEventListener('click', async () => {
  try {
    const removed = await api.clearCache();
    status(removed ? 'Downloaded models removed from this browser.' : 'There were no downloaded models to remove.');
  } catch (e) {
    status(`Could not remove the downloaded models: ${e.message}`, 'error');
  }
  refreshCached();
});

const ADAPTER_FILE = /^adapter_(config\.json|model\.safetensors)$/;

// Picked model files may include an adapter's (a whole folder picked at once): those go to
// the adapter, the rest to the model.
function pick(files) {
  const all = [...files];
  const adapter = all.filter((f) => ADAPTER_FILE.test(f.name));
  if (adapter.length) pickAdapter(adapter);
  const model = all.filter((f) => !ADAPTER_FILE.test(f.name));
  if (!model.length) return;
  pickedFiles = model;
  $('picked-files').textContent = pickedFiles.map((f) => `${f.name} (${mb(f.size)})`).join(', ');
  document.querySelector('input[name=source][value=files]').checked = true;
}

function pickAdapter(files) {
  pickedAdapter = [...files];
  $('picked-adapter').textContent = pickedAdapter.map((f) => `${f.name} (${mb(f.size)})`).join(', ');
  // One adapter at a time: picked files replace a typed URL.
  if (pickedAdapter.length) $('adapter-url').value = '';
}

$('adapter-files').addEventListener('change', (e) => {
  pickAdapter(e.target.files);
  e.target.value = '';
});
$('adapter-url').addEventListener('input', () => {
  if ($('adapter-url').value.trim()) pickAdapter([]);
});
$('adapter-clear').addEventListener('click', () => {
  pickAdapter([]);
  $('adapter-url').value = '';
});

// ---- downloaded models -----------------------------------------------------------------

let cacheListings = 0;

/** Lists the models kept in Cache Storage, each with its size and a Delete button. */
async function refreshCached() {
  const mine = ++cacheListings;
  const list = $('cached-models');
  let models;
  try {
    models = await api.cachedModels();
  } catch (e) {
    if (mine !== cacheListings) return;
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = `Could not read this browser's storage: ${e.message}`;
    list.replaceChildren(li);
    return;
  }
  if (mine !== cacheListings) return; // a later listing is on its way
  if (!models.length) {
    const li = document.createElement('li');
    li.className = 'muted';
    li.textContent = 'None yet: models downloaded from other sites are kept here after their first load.';
    list.replaceChildren(li);
    return;
  }
  list.replaceChildren(
    ...models.map((m) => {
      const li = document.createElement('li');
      li.dataset.url = m.url;
      li.dataset.bytes = String(m.bytes);
      const url = document.createElement('span');
      url.className = 'cached-url';
      url.textContent = m.url;
      url.title = m.files.map((f) => `${f.name} (${size(f.bytes)})`).join('\n');
      const bytes = document.createElement('span');
      bytes.className = 'muted cached-size';
      bytes.textContent = size(m.bytes);
      const remove = document.createElement('button');
      remove.type = 'button';
      remove.className = 'secondary small';
      remove.textContent = 'Delete';
      remove.setAttribute('aria-label', `Delete the downloaded copy of ${m.url}`);
      remove.addEventListener('click', async () => {
        remove.disabled = true;
        try {
          await api.deleteCachedModel(m.url);
          status(`Deleted the downloaded copy of ${m.url} (${size(m.bytes)}).`);
        } catch (e) {
          status(`Could not delete ${m.url}: ${e.message}`, 'error');
        }
        refreshCached();
      });
      li.append(url, bytes, remove);
      return li;
    }),
  );
}

$('model-files').addEventListener('change', (e) => pick(e.target.files));
const drop = $('drop-zone');
drop.addEventListener('dragover', (e) => {
  e.preventDefault();
  drop.classList.add('over');
});
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  pick(e.dataTransfer.files);
});
drop.addEventListener('keydown', (e) => {
  if (e.key === 'Enter' || e.key === ' ') {
    e.preventDefault();
    $('model-files').click();
  }
});

// ---- tabs ----------------------------------------------------------------------------

const tabs = [$('tab-chat'), $('tab-medqa'), $('tab-finetune')];
function selectTab(tab) {
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute('aria-selected', String(on));
    t.tabIndex = on ? 0 : -1;
    $(t.getAttribute('aria-controls')).hidden = !on;
  }
  tab.focus();
}
tabs.forEach((t, i) => {
  t.addEventListener('click', () => selectTab(t));
  t.addEventListener('keydown', (e) => {
    if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') selectTab(tabs[(i + (e.key === 'ArrowRight' ? 1 : tabs.length - 1)) % tabs.length]);
  });
});

let busyCount = 0;

// Busy while any task (a load, a chat turn, a benchmark run) of this page's is under way.
function setBusy(on) {
  busyCount = Math.max(0, busyCount + (on ? 1 : -1));
  busy = busyCount > 0;
  for (const id of ['send', 'load-button', 'run-samples', 'run-quiz', 'clear']) $(id).disabled = busy;
  $('bench-file').disabled = busy;
  updateBenchmarkButton();
}

initFinetuneTab({ api, status, setBusy });

function updateBenchmarkButton() {
  $('benchmark-button').disabled = busy || !api.info;
}

// ---- speed benchmark -----------------------------------------------------------------

const BENCH_PROMPT = 128;
const BENCH_GEN = 32;
// The on-paper memory bandwidth of an integrated laptop GPU (docs/gpu.md): the bar's
// reference mark. A reference, never a measurement.
const REFERENCE_GB_S = 100;

/** A figure to three significant digits or so: 1234, 56.7, 0.812, 0.0421. */
function fmt(x) {
  if (!Number.isFinite(x)) return '—';
  if (x >= 100) return Math.round(x).toLocaleString('en-US');
  if (x >= 10) return x.toFixed(1);
  if (x >= 1) return x.toFixed(2);
  return x.toPrecision(3);
}

/** One labelled figure of the benchmark panel. */
function figure(label, value, unit, key, title = '') {
  const div = document.createElement('div');
  div.className = 'figure';
  div.dataset.key = key;
  if (title) div.title = title;
  const dt = document.createElement('dt');
  dt.textContent = label;
  const dd = document.createElement('dd');
  const num = document.createElement('span');
  num.className = 'value';
  num.textContent = value;
  dd.append(num);
  if (unit) dd.append(` ${unit}`);
  div.append(dt, dd);
  return div;
}

/** Shows a `benchmark()` result: what it ran on, its speeds, bytes per token and bandwidth, and on
 * WebGPU the bandwidth bar against a laptop GPU's. */
function renderBenchmark(r, src, seconds) {
  const el = $('benchmark-result');
  el.replaceChildren();
  el.hidden = false;
  const head = document.createElement('div');
  head.className = 'bench-head';
  const adapter = document.createElement('strong');
  adapter.className = 'adapter';
  adapter.textContent = r.backend === 'webgpu' ? r.adapter || r.device : 'CPU (WebAssembly)';
  const kernels = document.createElement('span');
  kernels.className = 'kernels';
  kernels.textContent = r.kernels ? `${r.kernels} kernels` : 'no GPU kernels';
  const detail = document.createElement('span');
  detail.className = 'muted';
  detail.textContent = `${r.backend === 'webgpu' ? 'WebGPU' : 'CPU'} · ${modelName(src)} · ${BENCH_PROMPT}-token prompt, ${BENCH_GEN} tokens decoded, ${seconds.toFixed(1)} s`;
  head.append(adapter, kernels, detail);

  const figures = document.createElement('dl');
  figures.className = 'figures';
  const unmeasured = 'not measured by this backend';
  const memory = r.backend === 'webgpu' ? 'GPU memory' : 'memory';
  figures.append(
    figure('Prefill', fmt(r.prefillTokS), 'tok/s', 'prefill'),
    figure('Decode', fmt(r.decodeTokS), 'tok/s', 'decode'),
    r.bytesPerToken == null
      ? figure('Read per token', '—', '', 'bytes', unmeasured)
      : figure('Read per token', fmt(r.bytesPerToken / 1e6), 'MB', 'bytes', `${r.bytesPerToken.toLocaleString('en-US')} bytes read from ${memory} per decoded token`),
    r.effectiveGbS == null
      ? figure('Effective bandwidth', '—', '', 'bandwidth', unmeasured)
      : figure('Effective bandwidth', fmt(r.effectiveGbS), 'GB/s', 'bandwidth', 'bytes per token × decode tok/s'),
  );
  el.append(head, figures);

  // The bar's mark is a GPU's bandwidth: a scale for WebGPU runs only.
  if (r.effectiveGbS == null || r.backend !== 'webgpu') return;
  // The bar: the effective bandwidth on a scale whose mark is a ~100 GB/s laptop GPU.
  const scale = Math.max(REFERENCE_GB_S * 1.25, r.effectiveGbS * 1.1);
  const pct = (x) => `${((100 * x) / scale).toFixed(2)}%`;
  const bar = document.createElement('div');
  bar.className = 'gbs-bar';
  bar.setAttribute('role', 'img');
  bar.setAttribute(
    'aria-label',
    `effective bandwidth ${fmt(r.effectiveGbS)} GB/s, ${fmt((100 * r.effectiveGbS) / REFERENCE_GB_S)} percent of a ${REFERENCE_GB_S} GB/s laptop GPU's bandwidth on paper`,
  );
  const fill = document.createElement('span');
  fill.style.width = pct(r.effectiveGbS);
  const mark = document.createElement('i');
  mark.style.left = pct(REFERENCE_GB_S);
  mark.title = `~${REFERENCE_GB_S} GB/s: a laptop GPU, on paper`;
  bar.append(fill, mark);
  const labels = document.createElement('div');
  labels.className = 'gbs-scale muted';
  const zero = document.createElement('span');
  zero.textContent = '0';
  const ref = document.createElement('span');
  ref.className = 'ref';
  ref.style.left = pct(REFERENCE_GB_S);
  ref.textContent = `~${REFERENCE_GB_S} GB/s`;
  labels.append(zero, ref);
  const note = document.createElement('div');
  note.className = 'muted gbs-note';
  note.textContent =
    `${fmt((100 * r.effectiveGbS) / REFERENCE_GB_S)}% of the ~${REFERENCE_GB_S} GB/s an integrated laptop GPU's memory offers on paper. ` +
    'The mark is a reference for scale, not a measurement; CPU-emulated adapters (SwiftShader, lavapipe) sit far below it.';
  el.append(bar, labels, note);
}

$('benchmark-button').addEventListener('click', async () => {
  if (busy || !api.info) return;
  setBusy(true);
  const state = $('benchmark-state');
  const bar = $('benchmark-progress');
  bar.hidden = false;
  const t0 = performance.now();
  const tick = () => {
    state.textContent = `Running… ${((performance.now() - t0) / 1000).toFixed(0)} s (prefill of ${BENCH_PROMPT} tokens, then ${BENCH_GEN} decoded, in the worker)`;
  };
  tick();
  const timer = setInterval(tick, 1000);
  try {
    const r = await withGpuFallback(() => api.benchmark({ promptLen: BENCH_PROMPT, gen: BENCH_GEN }));
    const seconds = (performance.now() - t0) / 1000;
    renderBenchmark(r, api.source, seconds);
    state.textContent = `Done in ${seconds.toFixed(1)} s.`;
  } catch (e) {
    state.textContent = '';
    status(`Benchmark failed: ${e.message}`, 'error');
  } finally {
    clearInterval(timer);
    bar.hidden = true;
    setBusy(false);
  }
});

// ---- chat ----------------------------------------------------------------------------

let history = [];

// Only the transcript scrolls while text streams; the page and its buttons stay put.
function scrollTranscript() {
  const t = $('transcript');
  t.scrollTop = t.scrollHeight;
}

function bubble(kind, text) {
  const div = document.createElement('div');
  div.className = `msg ${kind}`;
  div.textContent = text;
  $('transcript').append(div);
  scrollTranscript();
  return div;
}

function number(id, fallback) {
  const v = Number($(id).value);
  return Number.isFinite(v) ? v : fallback;
}

async function send() {
  const message = $('prompt').value.trim();
  if (!message || busy) return;
  if (!api.info) {
    status('Load a model first.', 'error');
    return;
  }
  $('prompt').value = '';
  bubble('user', message);
  const reply = bubble('model streaming', '');
  const format = $('format').value;
  setBusy(true);
  $('stop').disabled = false;
  try {
    const g = await withGpuFallback(() => {
      reply.textContent = '';
      return api.generate({
        prompt: message,
        format,
        history: format === 'raw' ? [] : history,
        maxNewTokens: Math.max(1, Math.round(number('max-tokens', 128))),
        temperature: Math.max(0, number('temperature', 0)),
        topP: Math.min(1, Math.max(0.01, number('top-p', 1))),
        onText: (piece) => {
          reply.textContent += piece;
          scrollTranscript();
        },
      });
    });
    reply.textContent = g.text;
    history.push({ user: message, assistant: g.text });
    const why = { eos: 'end of text', max_tokens: 'token limit', stop_string: 'end of turn', context_full: 'context full', cancelled: 'stopped' }[g.stopReason] || g.stopReason;
    $('speed').textContent = `${g.outputIds.length} tokens · ${g.decodeTokS.toFixed(1)} tok/s · prompt ${g.prefillTokS.toFixed(0)} tok/s · ${why}`;
  } catch (e) {
    reply.remove();
    status(e.name === 'InputError' ? `${e.message}. Clear the chat to start over.` : `Generation failed: ${e.message}`, 'error');
  } finally {
    reply.classList.remove('streaming');
    $('stop').disabled = true;
    setBusy(false);
  }
}

$('chat-form').addEventListener('submit', (e) => {
  e.preventDefault();
  send();
});
$('prompt').addEventListener('keydown', (e) => {
  if (e.key === 'Enter' && !e.shiftKey) {
    e.preventDefault();
    send();
  }
});
$('stop').addEventListener('click', () => api.stop());
$('clear').addEventListener('click', async () => {
  history = [];
  $('transcript').replaceChildren();
  $('speed').textContent = '';
  if (!api.info) return;
  try {
    await api.reset();
  } catch (e) {
    status(`Could not clear the conversation: ${e.message}`, 'error');
  }
});
$('copy').addEventListener('click', async () => {
  const text = [...$('transcript').children].map((m) => `${m.classList.contains('user') ? 'You' : 'Model'}: ${m.textContent}`).join('\n\n');
  try {
    await navigator.clipboard.writeText(text);
    status('Conversation copied.');
  } catch {
    status('The browser refused clipboard access; select the text to copy it.', 'warning');
  }
});

// ---- MedQA panel ---------------------------------------------------------------------

let benchStop = false;
let lastRun = null;

function softmax(xs) {
  const m = Math.max(...xs);
  const e = xs.map((x) => Math.exp(x - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((x) => x / s);
}

/** The choice the model picked: by mutual information where the question asks for it. */
function picked(r) {
  return r.predMutualInfo ?? r.pred;
}

function correct(r) {
  return r.accMutualInfo ?? r.acc;
}

function renderQuestion(q, r, index) {
  const li = document.createElement('li');
  const text = document.createElement('div');
  text.className = 'question-text';
  text.textContent = q.context;
  li.append(text);
  r.probs.forEach((p, i) => {
    const row = document.createElement('div');
    row.className = `option${i === picked(r) ? ' pick' : ''}${i === q.gold ? ' key' : ''}`;
    const mark = document.createElement('span');
    mark.className = 'mark';
    mark.textContent = i === q.gold ? '✓' : '';
    mark.title = i === q.gold ? 'the key' : '';
    const label = document.createElement('span');
    label.textContent = q.choices[i];
    const bar = document.createElement('span');
    bar.className = 'bar';
    bar.setAttribute('role', 'img');
    bar.setAttribute('aria-label', `probability ${(100 * p).toFixed(1)} percent`);
    const fill = document.createElement('span');
    fill.style.width = `${(100 * p).toFixed(1)}%`;
    bar.append(fill);
    const pct = document.createElement('span');
    pct.textContent = `${(100 * p).toFixed(1)}%`;
    row.append(mark, label, bar, pct);
    li.append(row);
  });
  const verdict = document.createElement('div');
  const pick = picked(r);
  verdict.className = `verdict ${correct(r) ? 'right' : 'wrong'}`;
  verdict.textContent = correct(r) ? `Model picked the key (${q.choices[pick]})` : `Model picked “${q.choices[pick]}”; the key is “${q.choices[q.gold]}”`;
  if (r.predMutualInfo !== undefined) verdict.textContent += ' by mutual information';
  li.append(verdict);
  li.dataset.index = String(index);
  return li;
}

/**
 * The summary line and bar, from lm-eval's results object of the run so far (`report`):
 * acc_mutual_info where the task has it (option texts scored), else acc, with its stderr.
 */
function renderSummary(report, task, results, total, label) {
  const metrics = report.results[task];
  const key = metrics['acc_mutual_info,none'] !== undefined ? 'acc_mutual_info' : 'acc';
  const acc = metrics[`${key},none`];
  const stderr = metrics[`${key}_stderr,none`];
  const se = typeof stderr === 'number' ? stderr : null; // "N/A" for a single question
  const metric = key === 'acc_mutual_info' ? 'mutual-information accuracy' : 'accuracy';
  const scored = report['n-samples'][task].effective;
  const chance = results.length ? results.reduce((a, r) => a + 1 / r.probs.length, 0) / results.length : 0.25;
  const el = $('bench-summary');
  el.replaceChildren();
  const head = document.createElement('div');
  head.innerHTML = `<span class="big"></span> <span class="detail"></span>`;
  head.querySelector('.big').textContent = `${(100 * acc).toFixed(1)}%`;
  head.querySelector('.detail').textContent = ` ${metric}${se === null ? '' : ` ± ${(100 * se).toFixed(1)} (stderr)`} on ${scored} of ${total} ${label} questions; chance is ${(100 * chance).toFixed(0)}%`;
  const bar = document.createElement('div');
  bar.className = 'accuracy-bar';
  bar.setAttribute('role', 'img');
  bar.setAttribute('aria-label', `accuracy ${(100 * acc).toFixed(1)} percent, chance ${(100 * chance).toFixed(0)} percent`);
  const fill = document.createElement('span');
  fill.style.width = `${100 * acc}%`;
  const line = document.createElement('i');
  line.style.left = `${100 * chance}%`;
  line.title = 'chance';
  bar.append(fill, line);
  el.append(head, bar);
}

/** Where the model in use came from, as `medphi eval` writes it in `model_args`. */
function modelArgs(src) {
  const where = (s) => (s.files ? s.files.map((f) => f.name).join(',') : s.url);
  const args = `pretrained=${src ? where(src) : 'unknown'}`;
  // lm-eval's `peft=` argument: the adapter applied to the pretrained model.
  return src?.adapter ? `${args},peft=${where(src.adapter)}` : args;
}

/**
 * Scores `questions` (parsed from a file of `original` questions as lm-eval task `task`),
 * showing each with its bars and verdict and the summary so far. The summary and the
 * Export button's JSON are lm-eval's results object, built by the wasm package from the
 * questions' sample lines (`medphi eval`'s results.json, plus `samples`); `label` names the
 * run for people.
 */
async function runBenchmark(questions, { task, label, original = questions.length }) {
  if (!api.info) {
    status('Load a model first.', 'error');
    return;
  }
  setBusy(true);
  benchStop = false;
  $('bench-stop').disabled = false;
  $('export').disabled = true;
  const list = $('bench-results');
  list.replaceChildren();
  const bar = $('bench-progress');
  bar.hidden = false;
  bar.value = 0;
  $('bench-summary').replaceChildren();
  lastRun = null;
  const results = [];
  const samples = [];
  const t0 = performance.now();
  const report = () => {
    const seconds = (performance.now() - t0) / 1000;
    return api.report({
      task,
      samples,
      original,
      seconds,
      config: {
        model: 'medphi',
        model_args: modelArgs(api.source),
        backend: api.info?.backend,
        device: api.info?.device,
        quantize: api.info?.quantize ?? null,
        limit: questions.length < original ? questions.length : null,
        mode: 'loglikelihood',
        share_prefix: true,
        items_per_s: samples.length / seconds,
        label,
      },
    });
  };
  try {
    for (const [i, q] of questions.entries()) {
      if (benchStop) break;
      const r = await withGpuFallback(() => api.score(q));
      // The bars show what decides the pick: with mutual information, each option's
      // log-likelihood gain from the question.
      r.probs = softmax(r.unconditional ? r.loglikelihoods.map((ll, j) => ll - r.unconditional[j]) : r.loglikelihoods);
      results.push(r);
      samples.push(r.sample);
      list.append(renderQuestion(q, r, i));
      bar.value = (i + 1) / questions.length;
      renderSummary(await report(), task, results, questions.length, label);
    }
    const secs = (performance.now() - t0) / 1000;
    status(`Scored ${results.length} ${label} questions in ${secs.toFixed(1)} s.`);
    if (samples.length) {
      lastRun = { task, report: await report() };
      renderSummary(lastRun.report, task, results, questions.length, label);
      $('export').disabled = false;
    }
  } catch (e) {
    status(`Scoring failed: ${e.message}`, 'error');
  } finally {
    bar.hidden = true;
    $('bench-stop').disabled = true;
    setBusy(false);
  }
}

/** The MedQA form picked in the task list: letters (lm-eval's medqa_4options) unless option texts. */
function medqaTask() {
  return $('bench-task').value === 'medqa_4options_continuation' ? 'medqa_4options_continuation' : 'medqa_4options';
}

async function runMedqaFile(url, label, limit) {
  try {
    const text = await (await fetch(url)).text();
    const task = medqaTask();
    const all = await api.parseBenchmark(task, text, url);
    await runBenchmark(all.slice(0, limit), {
      task,
      label: task === 'medqa_4options' ? label : `${label} (option texts)`,
      original: all.length,
    });
  } catch (e) {
    status(`Could not read ${url}: ${e.message}`, 'error');
  }
}

$('run-samples').addEventListener('click', () => runMedqaFile(SAMPLES, 'sample MedQA'));

// The bundled model's own held-out questions: terms and diseases it never saw quizzed.
$('run-quiz').addEventListener('click', () => runMedqaFile(`${BUNDLED_MODEL}medqa_test.jsonl`, 'tiny-medphi held-out', QUIZ_QUESTIONS));

/** The lm-eval task a file most likely is, from its name and first bytes. */
function guessTask(name, text) {
  const lower = name.toLowerCase();
  const mmlu = lower.match(/(anatomy|clinical_knowledge|college_biology|college_medicine|medical_genetics|professional_medicine)/);
  if (lower.endsWith('.csv') && mmlu) return `mmlu_${mmlu[1]}`;
  if (lower.includes('pubmedqa') || /^\s*\{\s*"\d+"\s*:/.test(text)) return 'pubmedqa';
  if (lower.includes('medmcqa') || /"cop"\s*:/.test(text.slice(0, 5000))) return 'medmcqa';
  if (lower.endsWith('.tsv')) {
    const specialty = lower.replace(/\.tsv$/, '').replace(/_(test|dev)$/, '').replace(/[^a-z0-9_]/g, '_');
    return `medexqa_${specialty}`;
  }
  return $('bench-task').value;
}

$('bench-file').addEventListener('change', async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  e.target.value = '';
  try {
    const text = await file.text();
    const task = guessTask(file.name, text);
    const select = $('bench-task');
    if (![...select.options].some((o) => o.value === task)) select.add(new Option(task, task));
    select.value = task;
    const questions = await api.parseBenchmark(task, text, file.name);
    await runBenchmark(questions, { task, label: `${task} (${file.name})` });
  } catch (err) {
    status(`Could not use ${file.name}: ${err.message}`, 'error');
  }
});

$('bench-stop').addEventListener('click', () => {
  benchStop = true;
});

$('export').addEventListener('click', () => {
  if (!lastRun) return;
  // lm-eval's results.json of the run, with its sample lines under `samples`.
  const blob = new Blob([JSON.stringify(lastRun.report, null, 2)], { type: 'application/json' });
  const a = document.createElement('a');
  a.href = URL.createObjectURL(blob);
  a.download = `medphi-${lastRun.task}-results.json`;
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
});

// ---- start ---------------------------------------------------------------------------

/**
 * The CPU threads the wasm uses, for people: and when the page could use more after a
 * reload (isolation-sw.js now adds the headers the threaded build needs), that too.
 */
function cpuThreads(info) {
  const count = `${info.threads} CPU thread${info.threads === 1 ? '' : 's'}`;
  if (!info.threadsNote) return count;
  const cores = navigator.hardwareConcurrency || 1;
  const reload = isolationWorker && cores > 1 ? `; reload the page to use all ${cores} cores` : '';
  return `${count} (${info.threadsNote}${reload})`;
}

// Threads need a cross-origin isolated page. scripts/serve.sh sends the headers for that;
// where the host does not, isolation-sw.js adds them to the next load of the page.
let isolationWorker = false;
if (!self.crossOriginIsolated && window.isSecureContext && 'serviceWorker' in navigator) {
  navigator.serviceWorker.register('isolation-sw.js').then(
    () => (isolationWorker = true),
    () => {},
  );
}

// The bundled model loads on WebGPU when it can take it, else on the CPU (the worker
// decides, and says so if WebGPU fails). The load is sent before anything else, so any
// request made from the console from now on comes after it.
function start() {
  load({ url: BUNDLED_MODEL }, 'auto').catch(() => {}); // load() shows the error
  api.probe().then(
    (p) => {
      gpu = p;
    },
    () => {
      gpu = { webgpu: false, reason: 'WebGPU probe failed' };
    },
  ).then(() => {
    const webgpuRadio = document.querySelector('input[name=backend][value=webgpu]');
    webgpuRadio.disabled = !gpu.webgpu;
    $('adapter-name').textContent = gpu.webgpu ? `(${gpu.adapter})` : `(unavailable: ${gpu.reason})`;
    if (!api.info && !chosen('backend')) {
      document.querySelector(`input[name=backend][value=${gpu.webgpu ? 'webgpu' : 'cpu'}]`).checked = true;
    }
  });
}

start();
