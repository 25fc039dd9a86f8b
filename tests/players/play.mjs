// Plays a CMAF output directory through hls.js or dash.js in Debian's headless Chromium
// (/usr/bin/chromium, driven by playwright-core; no browser is downloaded) and prints one
// JSON line: how far playback got, which files the player fetched, the renditions it
// played, and any player error. The Rust test (tests/players.rs) asserts on it.
//
//   node play.mjs DIR hls|dash [SECONDS]
//
// DIR holds master.m3u8 and manifest.mpd. The player starts on the lowest video
// rendition with adaptation off, plays a while, is forced onto the highest one, and must
// play on from there: both renditions' segments are fetched and decoded.
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { extname, join, normalize, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [dir, player, secondsArg] = process.argv.slice(2);
if (!dir || !['hls', 'dash'].includes(player)) {
  console.error('usage: node play.mjs DIR hls|dash [SECONDS]');
  process.exit(2);
}
// Seconds of playback before the switch, and after it.
const leg = Number(secondsArg ?? 2.5);
const here = fileURLToPath(new URL('.', import.meta.url));
const root = resolve(dir);
const libs = {
  '/lib/hls.js': join(here, 'node_modules/hls.js/dist/hls.min.js'),
  '/lib/dash.js': join(here, 'node_modules/dashjs/dist/modern/umd/dash.all.min.js'),
};
const types = {
  '.m3u8': 'application/vnd.apple.mpegurl',
  '.mpd': 'application/dash+xml',
  '.mp4': 'video/mp4',
  '.m4s': 'video/iso.segment',
  '.js': 'text/javascript',
  '.html': 'text/html',
};

const page = `<!doctype html><html><body><video id="v" muted playsinline></video>
<script src="/lib/${player}.js"></script><script>
const video = document.getElementById('v');
window.state = { errors: [], renditions: [], switched: false, ready: false };
const note = (r) => { const s = window.state.renditions; if (s[s.length - 1] !== r) s.push(r); };
video.addEventListener('error', () => window.state.errors.push('video element: ' + (video.error && video.error.message)));
if ('${player}' === 'hls') {
  const hls = new Hls({ startLevel: 0, capLevelToPlayerSize: false, debug: false });
  window.toTop = () => { hls.currentLevel = hls.levels.length - 1; window.state.switched = true; };
  hls.on(Hls.Events.ERROR, (_, d) => { if (d.fatal) window.state.errors.push('hls.js: ' + d.type + ' ' + d.details); });
  hls.on(Hls.Events.MANIFEST_PARSED, () => { hls.currentLevel = 0; window.state.levels = hls.levels.length; window.state.ready = true; video.play(); });
  hls.on(Hls.Events.LEVEL_SWITCHED, (_, d) => note(hls.levels[d.level].height + 'p'));
  hls.loadSource('/media/master.m3u8');
  hls.attachMedia(video);
} else {
  const p = dashjs.MediaPlayer().create();
  p.updateSettings({ streaming: { abr: { autoSwitchBitrate: { video: false } }, buffer: { fastSwitchEnabled: true } } });
  window.toTop = () => {
    const reps = p.getRepresentationsByType('video');
    p.setRepresentationForTypeByIndex('video', reps.length - 1, true);
    window.state.switched = true;
  };
  p.on(dashjs.MediaPlayer.events.ERROR, (e) => window.state.errors.push('dash.js: ' + JSON.stringify(e.error && (e.error.message || e.error.code))));
  p.on(dashjs.MediaPlayer.events.STREAM_INITIALIZED, () => {
    p.setRepresentationForTypeByIndex('video', 0, true);
    window.state.levels = p.getRepresentationsByType('video').length;
    window.state.ready = true;
  });
  p.on(dashjs.MediaPlayer.events.QUALITY_CHANGE_RENDERED, (e) => { if (e.mediaType === 'video') note(e.newRepresentation && e.newRepresentation.height + 'p'); });
  p.initialize(video, '/media/manifest.mpd', true);
}
</script></body></html>`;

const requests = [];
const server = createServer(async (req, res) => {
  const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
  let file;
  if (path === '/') {
    res.writeHead(200, { 'content-type': 'text/html' });
    res.end(page);
    return;
  } else if (libs[path]) {
    file = libs[path];
  } else if (path.startsWith('/media/')) {
    const rel = normalize(path.slice('/media/'.length));
    if (rel.startsWith('..')) {
      res.writeHead(403).end();
      return;
    }
    requests.push(rel);
    file = join(root, rel);
  } else {
    res.writeHead(404).end();
    return;
  }
  try {
    const body = await readFile(file);
    res.writeHead(200, { 'content-type': types[extname(file)] ?? 'application/octet-stream' });
    res.end(body);
  } catch {
    res.writeHead(404).end();
  }
});
await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
const url = `http://127.0.0.1:${server.address().port}/`;

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  headless: true,
  // As root (CI) Chromium needs --no-sandbox; playback starts without a user gesture.
  args: ['--no-sandbox', '--autoplay-policy=no-user-gesture-required', '--mute-audio'],
});
const result = { player, played_s: 0, switched_at_s: null, renditions: [], errors: [], requests };
try {
  const tab = await browser.newPage();
  tab.on('pageerror', (e) => result.errors.push('page: ' + e.message));
  await tab.goto(url);
  const state = () => tab.evaluate(() => ({ ...window.state, t: document.getElementById('v').currentTime }));
  // Plays until currentTime passes `until` (or an error, or the deadline).
  const playTo = async (until) => {
    const deadline = Date.now() + 20_000 + until * 1000;
    for (;;) {
      const s = await state();
      result.played_s = s.t;
      if (s.errors.length || s.t >= until || Date.now() > deadline) return s;
      await new Promise((ok) => setTimeout(ok, 100));
    }
  };
  let s = await playTo(leg);
  if (!s.errors.length && s.ready) {
    result.switched_at_s = s.t;
    await tab.evaluate(() => window.toTop());
    s = await playTo(s.t + leg);
  }
  result.levels = s.levels ?? 0;
  result.renditions = s.renditions;
  result.errors.push(...s.errors);
} catch (e) {
  result.errors.push('driver: ' + e.message);
} finally {
  await browser.close();
  server.close();
}
console.log(JSON.stringify(result));
