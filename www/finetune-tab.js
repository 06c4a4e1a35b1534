// The Fine-tune tab: LoRA SFT of the model in use (medphi.finetune, the CLI's trainer in the
// worker), a live loss plot, the adapter out (PEFT's two files) and in, switching between
// base and adapter, and the before/after panel: the workshop quiz, a control quiz and a few
// prompts on both models.

const WORKSHOP = 'samples/workshop/';
const QUIZ_TASK = 'medqa_4options_continuation';
const ANSWER_TOKENS = 32;

/**
 * Wires the tab to `api` (window.medphi); `status(text, kind)` writes the page's status
 * line and `setBusy(on)` marks page work under way (the page's other buttons wait).
 */
export function initFinetuneTab({ api, status, setBusy }) {
  const $ = (id) => document.getElementById(id);
  let uploaded = null;
  let adapterFiles = null;
  let losses = [];
  let planned = 0;
  let drawPending = false;
  let running = false;

  const number = (id) => Number($(id).value);
  const settings = () => ({
    loraRank: number('ft-rank'),
    loraAlpha: number('ft-alpha'),
    steps: number('ft-steps'),
    batchSize: number('ft-batch'),
    lr: number('ft-lr'),
    seed: number('ft-seed'),
  });

  function refresh() {
    const info = api.info;
    const adapted = Boolean(api.source?.adapter);
    $('ft-in-use').textContent = !info
      ? 'No model is loaded.'
      : adapted
        ? `Base + adapter in use (${info.adaptedMatrices} matrices adapted)${api.kept === 'base' ? '; the base is kept loaded beside it' : ''}.`
        : `The base model is in use${api.kept === 'adapter' ? '; the adapter is kept loaded beside it' : ''}.`;
    $('ft-use-base').disabled = running || !adapted;
    $('ft-use-adapter').disabled = running || api.kept !== 'adapter';
    $('ft-download').disabled = !adapterFiles;
    $('ft-start').disabled = running || !info;
    $('ft-compare').disabled = running || !info || !(adapted || api.kept === 'adapter');
  }
  api.addEventListener('model', refresh);

  $('ft-file').addEventListener('change', async (e) => {
    const file = e.target.files[0];
    if (!file) return;
    document.querySelector('input[name=ft-data][value=upload]').checked = true;
    uploaded = null;
    try {
      uploaded = await api.parseTrainingRows(await file.text(), file.name);
      $('ft-data-note').textContent = `${file.name}: ${uploaded.length} prompt/response rows.`;
    } catch (err) {
      $('ft-data-note').textContent = `${file.name} cannot be used: ${err.message}`;
    }
  });

  async function trainingRows() {
    if (document.querySelector('input[name=ft-data]:checked').value === 'upload') {
      if (!uploaded) throw new Error('choose a .jsonl or .csv file of prompt/response rows first');
      return uploaded;
    }
    const text = await (await fetch(`${WORKSHOP}sft.jsonl`)).text();
    return api.parseTrainingRows(text, 'sft.jsonl');
  }

  function scheduleDraw() {
    if (drawPending) return;
    drawPending = true;
    requestAnimationFrame(() => {
      drawPending = false;
      drawLoss($('ft-loss'), losses, planned);
    });
  }

  $('ft-start').addEventListener('click', async () => {
    running = true;
    refresh();
    setBusy(true);
    $('ft-stop').disabled = false;
    const bar = $('ft-progress');
    bar.hidden = false;
    bar.value = 0;
    losses = [];
    try {
      const data = await trainingRows();
      const s = settings();
      planned = s.steps;
      scheduleDraw();
      status(`Fine-tuning on ${data.length} rows…`);
      const r = await api.finetune({
        data,
        ...s,
        onProgress: (p) => {
          if (p.step === undefined) return;
          losses.push(p.loss);
          bar.value = p.step / p.steps;
          const left = (p.elapsedMs / p.step) * (p.steps - p.step);
          $('ft-stats').textContent = `step ${p.step}/${p.steps} · loss ${p.loss.toFixed(3)} · ${Math.round(p.tokensPerS)} tokens/s · ${clock(p.elapsedMs)} elapsed, ${clock(left)} left`;
          scheduleDraw();
        },
      });
      adapterFiles = r.adapterFiles;
      status(`Fine-tuned for ${r.steps} steps${r.stopped ? ' (stopped; the adapter keeps what it learnt)' : ''}: the adapter is in use.`);
    } catch (err) {
      status(`Fine-tuning failed: ${err.message}`, 'error');
    } finally {
      running = false;
      bar.hidden = true;
      $('ft-stop').disabled = true;
      setBusy(false);
      refresh();
    }
  });

  $('ft-stop').addEventListener('click', () => api.stop());

  const switchTo = (which) => async () => {
    try {
      await (which === 'base' ? api.useBase() : api.useAdapter());
    } catch (err) {
      status(`Could not switch: ${err.message}`, 'error');
    }
  };
  $('ft-use-base').addEventListener('click', switchTo('base'));
  $('ft-use-adapter').addEventListener('click', switchTo('adapter'));

  $('ft-download').addEventListener('click', () => {
    for (const f of adapterFiles ?? []) {
      const a = document.createElement('a');
      a.href = URL.createObjectURL(new Blob([f.bytes]));
      a.download = f.name;
      a.click();
      setTimeout(() => URL.revokeObjectURL(a.href), 10_000);
    }
  });

  $('ft-load-adapter').addEventListener('change', async (e) => {
    const files = [...e.target.files];
    if (!files.length) return;
    setBusy(true);
    try {
      await api.applyAdapter(files);
      adapterFiles = await Promise.all(files.map(async (f) => ({ name: f.name, bytes: new Uint8Array(await f.arrayBuffer()) })));
      status(`Adapter ${files.map((f) => f.name).join(', ')} applied.`);
    } catch (err) {
      status(`Could not apply the adapter: ${err.message}`, 'error');
    } finally {
      setBusy(false);
      refresh();
    }
  });

  $('ft-compare').addEventListener('click', async () => {
    running = true;
    refresh();
    setBusy(true);
    const bar = $('ft-compare-progress');
    bar.hidden = false;
    bar.value = 0;
    const wasAdapted = Boolean(api.source?.adapter);
    try {
      const quizzes = [];
      for (const [file, label] of [
        ['quiz.jsonl', 'taught terms'],
        ['control.jsonl', 'other held-out terms (control)'],
      ]) {
        const text = await (await fetch(`${WORKSHOP}${file}`)).text();
        quizzes.push({ label, questions: await api.parseBenchmark(QUIZ_TASK, text, file) });
      }
      const taught = quizzes[0].questions.slice(0, 2).map((q) => q.doc.answer);
      const prompts = [...taught, 'macrocephaly'].map((t) => `Instruct: What is ${t.toLowerCase()}?\nOutput:`);
      const total = 2 * (quizzes.reduce((a, q) => a + q.questions.length, 0) + prompts.length);
      let done = 0;
      const tick = () => (bar.value = ++done / total);
      const measure = async () => {
        const scores = [];
        for (const quiz of quizzes) {
          const samples = [];
          for (const q of quiz.questions) {
            samples.push((await api.score(q)).sample);
            tick();
          }
          const m = (await api.report({ task: QUIZ_TASK, samples })).results[QUIZ_TASK];
          scores.push({ acc: m['acc_mutual_info,none'], se: m['acc_mutual_info_stderr,none'], n: samples.length });
        }
        const answers = [];
        for (const prompt of prompts) {
          answers.push((await api.generate({ prompt, format: 'raw', maxNewTokens: ANSWER_TOKENS, temperature: 0 })).text.trim());
          tick();
        }
        return { scores, answers };
      };
      await api.useBase();
      const before = await measure();
      await api.useAdapter();
      const after = await measure();
      if (!wasAdapted) await api.useBase();
      renderComparison($('ft-results'), quizzes, prompts, before, after);
      status('Compared the base and the adapted model.');
    } catch (err) {
      status(`The comparison failed: ${err.message}`, 'error');
    } finally {
      running = false;
      bar.hidden = true;
      setBusy(false);
      refresh();
    }
  });

  refresh();
  drawLoss($('ft-loss'), losses, 0);
}

function clock(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  return s >= 60 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${s} s`;
}

/** Side by side: each quiz's accuracy with its standard error, base vs adapter, and the answers. */
function renderComparison(el, quizzes, prompts, before, after) {
  el.replaceChildren();
  const percent = (x) => `${(100 * x).toFixed(1)}%`;
  quizzes.forEach((quiz, i) => {
    const group = document.createElement('div');
    group.className = 'compare-group';
    const head = document.createElement('div');
    head.className = 'compare-head';
    head.textContent = `${quiz.label} (${quiz.questions.length} questions; chance 25%)`;
    group.append(head);
    for (const [who, r] of [['base', before.scores[i]], ['base + adapter', after.scores[i]]]) {
      const row = document.createElement('div');
      row.className = `compare-row ${who === 'base' ? 'base' : 'adapted'}`;
      const name = document.createElement('span');
      name.textContent = who;
      const track = document.createElement('div');
      track.className = 'accuracy-bar';
      track.setAttribute('role', 'img');
      const se = typeof r.se === 'number' ? r.se : 0;
      track.setAttribute('aria-label', `${who}: ${percent(r.acc)} plus or minus ${percent(se)}`);
      const fill = document.createElement('span');
      fill.style.width = `${100 * r.acc}%`;
      const whisker = document.createElement('b');
      whisker.className = 'whisker';
      whisker.style.left = `${100 * Math.max(0, r.acc - se)}%`;
      whisker.style.width = `${100 * (Math.min(1, r.acc + se) - Math.max(0, r.acc - se))}%`;
      const chance = document.createElement('i');
      chance.style.left = '25%';
      chance.title = 'chance';
      track.append(fill, whisker, chance);
      const value = document.createElement('span');
      value.className = 'compare-value';
      value.textContent = `${percent(r.acc)} ± ${percent(se)}`;
      row.append(name, track, value);
      group.append(row);
    }
    el.append(group);
  });
  const table = document.createElement('table');
  table.className = 'answers';
  table.innerHTML = '<thead><tr><th>Prompt</th><th>Base</th><th>Base + adapter</th></tr></thead>';
  const body = document.createElement('tbody');
  prompts.forEach((p, i) => {
    const tr = document.createElement('tr');
    for (const text of [p.replace(/^Instruct: /, '').replace(/\nOutput:$/, ''), before.answers[i], after.answers[i]]) {
      const td = document.createElement('td');
      td.textContent = text;
      tr.append(td);
    }
    body.append(tr);
  });
  table.append(body);
  el.append(table);
}

/**
 * The loss plot: each step's loss as a dot, a moving average as a line, over the planned
 * steps; axes with a few round ticks.
 */
function drawLoss(canvas, losses, planned) {
  const ctx = canvas.getContext('2d');
  const { width, height } = canvas;
  const pad = { left: 52, right: 14, top: 12, bottom: 34 };
  ctx.clearRect(0, 0, width, height);
  ctx.fillStyle = '#fff';
  ctx.fillRect(0, 0, width, height);
  const steps = Math.max(planned, losses.length, 1);
  const top = niceCeil(Math.max(...losses, 1) * 1.05);
  const x = (step) => pad.left + ((step - 1) / Math.max(steps - 1, 1)) * (width - pad.left - pad.right);
  const y = (loss) => height - pad.bottom - (loss / top) * (height - pad.top - pad.bottom);
  ctx.strokeStyle = '#d8dde3';
  ctx.fillStyle = '#5b6470';
  ctx.font = '12px system-ui, sans-serif';
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const v = (top * i) / 4;
    ctx.beginPath();
    ctx.moveTo(pad.left, y(v));
    ctx.lineTo(width - pad.right, y(v));
    ctx.stroke();
    ctx.textAlign = 'right';
    ctx.fillText(v.toFixed(1), pad.left - 6, y(v) + 4);
  }
  ctx.textAlign = 'center';
  for (let i = 0; i <= 4; i++) {
    const step = Math.max(1, Math.round(1 + ((steps - 1) * i) / 4));
    ctx.fillText(String(step), x(step), height - pad.bottom + 16);
  }
  ctx.fillText('step', (pad.left + width - pad.right) / 2, height - 4);
  ctx.save();
  ctx.translate(12, (pad.top + height - pad.bottom) / 2);
  ctx.rotate(-Math.PI / 2);
  ctx.fillText('loss', 0, 0);
  ctx.restore();
  ctx.fillStyle = '#8aa4bf';
  losses.forEach((l, i) => {
    ctx.beginPath();
    ctx.arc(x(i + 1), y(l), 2.2, 0, 2 * Math.PI);
    ctx.fill();
  });
  const span = Math.max(1, Math.round(steps / 20));
  ctx.strokeStyle = '#0b6bcb';
  ctx.lineWidth = 2.5;
  ctx.beginPath();
  losses.forEach((_, i) => {
    const from = Math.max(0, i - span + 1);
    const avg = losses.slice(from, i + 1).reduce((a, b) => a + b, 0) / (i + 1 - from);
    if (i === 0) ctx.moveTo(x(1), y(avg));
    else ctx.lineTo(x(i + 1), y(avg));
  });
  ctx.stroke();
  canvas.dataset.points = String(losses.length);
  canvas.setAttribute(
    'aria-label',
    losses.length ? `Training loss by step: ${losses.length} of ${steps} steps, from ${losses[0].toFixed(2)} to ${losses.at(-1).toFixed(2)}` : 'Training loss by step (no run yet)',
  );
}

/** The smallest round number (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 × 10^k) at least `v`. */
function niceCeil(v) {
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10].map((m) => m * p).find((c) => c >= v);
}
