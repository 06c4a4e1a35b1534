// All model work runs here, off the page's thread. Messages in: {id, type, ...}; out:
// {id, type: "result" | "error" | "text" | "progress" | "warning", ...}. A {type: "stop"}
// message (no id) ends the running generation at its next token.
import init, { Model, parseBenchmark } from './pkg/medphi.js';
import { loadFiles } from './fetch-model.js';

const ready = init();
let model = null;
let stopRequested = false;

const handlers = {
  async probe() {
    if (!self.navigator.gpu) return { webgpu: false, reason: 'this browser has no WebGPU' };
    const adapter = await self.navigator.gpu.requestAdapter({ powerPreference: 'high-performance' });
    if (!adapter) return { webgpu: false, reason: 'WebGPU is present but offers no adapter' };
    const i = adapter.info || {};
    const name = [i.vendor, i.architecture, i.description].filter(Boolean).join(' ');
    return { webgpu: true, adapter: name || 'WebGPU adapter', shaderF16: adapter.features.has('shader-f16') };
  },

  async load({ id, source, backend, context }) {
    const files = await loadFiles(source, {
      progress: (p) => self.postMessage({ id, type: 'progress', ...p }),
      warn: (message) => self.postMessage({ id, type: 'warning', message }),
    });
    // The old model's memory goes first: two models at once may not fit.
    if (model) {
      model.free();
      model = null;
    }
    model = await Model.load(files, backend, context ?? undefined);
    return model.info();
  },

  async generate({ id, request }) {
    requireModel();
    stopRequested = false;
    return model.generate(request, (piece) => {
      self.postMessage({ id, type: 'text', piece });
      return !stopRequested;
    });
  },

  async score({ question }) {
    requireModel();
    return model.score(question);
  },

  async parse({ task, text, file }) {
    return parseBenchmark(task, text, file);
  },

  async reset() {
    if (model) model.reset();
  },

  // Testing: the path a real device loss takes (see Model.loseGpuDevice).
  async loseGpuDevice() {
    requireModel();
    model.loseGpuDevice();
  },

  async clearCache() {
    if (!self.caches) return false;
    return self.caches.delete('medphi-models-v1');
  },
};

function requireModel() {
  if (!model) {
    const e = new Error('no model is loaded');
    e.name = 'InputError';
    throw e;
  }
}

self.onmessage = async ({ data }) => {
  if (data.type === 'stop') {
    stopRequested = true;
    return;
  }
  try {
    await ready;
    const handler = handlers[data.type];
    if (!handler) throw new Error(`unknown request ${data.type}`);
    const value = await handler(data);
    self.postMessage({ id: data.id, type: 'result', value });
  } catch (err) {
    self.postMessage({
      id: data.id,
      type: 'error',
      name: err?.name || 'Error',
      message: err?.message || String(err),
    });
  }
};
