// What every page test starts with: Debian's headless Chromium with WebGPU (SwiftShader),
// never a browser a tool downloads itself.
import { spawn } from 'node:child_process';
import { chromium } from 'playwright-core';

export function launchChromium() {
  return chromium.launch({
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
}

/**
 * Serves the repository root by scripts/serve-www.py, cross-origin isolated as scripts/serve.sh
 * serves it unless `isolation` is false. Resolves to the server process (to kill) and the
 * page's address.
 */
export function serveRepo(isolation = true) {
  const root = new URL('../../', import.meta.url).pathname;
  const args = ['-u', `${root}scripts/serve-www.py`, '--port', '0', ...(isolation ? [] : ['--no-isolation']), root];
  const server = spawn('python3', args, { stdio: ['ignore', 'pipe', 'ignore'] });
  return new Promise((resolve, reject) => {
    server.stdout.on('data', (d) => {
      const m = String(d).match(/port (\d+)/);
      if (m) resolve({ server, base: `http://127.0.0.1:${m[1]}/www/` });
    });
    server.on('exit', (code) => reject(new Error(`serve-www.py exited with ${code}`)));
  });
}
