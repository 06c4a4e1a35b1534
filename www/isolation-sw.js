// For hosts that cannot send headers (a static host, a plain file server): this service worker
// adds Cross-Origin-Opener-Policy and Cross-Origin-Embedder-Policy to the site's own
// responses, so the page, once loaded under it (the next visit or a reload), is cross-origin
// isolated and its worker runs the threaded wasm build. Other origins' responses (models
// fetched from elsewhere, with CORS) pass untouched. It never reloads the page itself: a
// reload in the middle of a load or a question would lose the user's work.
self.addEventListener('install', () => self.skipWaiting());

self.addEventListener('fetch', (event) => {
  const { request } = event;
  if (new URL(request.url).origin !== self.location.origin) return;
  event.respondWith(
    fetch(request).then((response) => {
      if (response.type === 'opaque' || response.type === 'opaqueredirect') return response;
      const headers = new Headers(response.headers);
      headers.set('Cross-Origin-Opener-Policy', 'same-origin');
      headers.set('Cross-Origin-Embedder-Policy', 'require-corp');
      const bodyless = [101, 204, 205, 304].includes(response.status);
      return new Response(bodyless ? null : response.body, {
        status: response.status,
        statusText: response.statusText,
        headers,
      });
    }),
  );
});
