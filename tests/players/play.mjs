// Plays a CMAF output directory through hls.js or dash.js in Debian's headless Chromium
// (/usr/bin/chromium, driven by playwright-core; no browser is downloaded) and prints one
// JSON line: how far playback got, which files the player fetched, the renditions it
// played, and any player error. The Rust test (tests/players.rs) asserts on it.
//
//   node play.mjs DIR hls|dash [CODEC]
//
// DIR holds master.m3u8 and manifest.mpd. CODEC (default avc1) is the codec part of the
// renditions to play (avc1, av01): a job with several codecs has a ladder of each. The
// player starts on that codec's lowest video rendition with adaptation off, plays a
// while, is forced onto its highest one, and must play on from there: both renditions'
// segments are fetched and decoded. The report names the renditions played by their
// directory (`video/<name>/`), the MPD's representation ids.
import { createServer } from 'node:http';
import { readFile } from 'node:fs/promises';
import { extname, join, normalize, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const [dir, player, codecArg] = process.argv.slice(2);
const codec = codecArg ?? 'avc1';
if (!dir || !['hls', 'dash'].includes(player) || !/^[a-z0-9]{4}$/.test(codec)) {
  console.error('usage: node play.mjs DIR hls|dash [avc1|av01|...]');
  process.exit(2);
}
// Seconds of playback before the switch, and after it.
const leg = 2.5;
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
const want = '${codec}';
const dirOf = (uri) => ((uri || '').match(new RegExp('video/([^/]+)/')) || [])[1];
if ('${player}' === 'hls') {
  const hls = new Hls({ capLevelToPlayerSize: false, debug: false });
  let low = -1, high = -1;
  window.toTop = () => { hls.currentLevel = high; window.state.switched = true; };
  hls.on(Hls.Events.ERROR, (_, d) => { if (d.fatal) window.state.errors.push('hls.js: ' + d.type + ' ' + d.details); });
  hls.on(Hls.Events.MANIFEST_PARSED, () => {
    const mine = hls.levels.map((l, i) => [l, i]).filter(([l]) => (l.videoCodec || '').startsWith(want));
    mine.sort(([a], [b]) => a.bitrate - b.bitrate);
    window.state.levels = mine.length;
    if (!mine.length) { window.state.errors.push('hls.js: no level of ' + want); return; }
    low = mine[0][1]; high = mine[mine.length - 1][1];
    hls.currentLevel = low;
    window.state.ready = true;
    video.play();
  });
  hls.on(Hls.Events.LEVEL_SWITCHED, (_, d) => { const l = hls.levels[d.level]; note(dirOf(l.uri || (l.url && l.url[0]))); });
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
  const start = () => {
    p.setRepresentationForTypeByIndex('video', 0, true);
    window.state.levels = p.getRepresentationsByType('video').length;
    window.state.ready = true;
  };
  // One adaptation set per codec: switch to the wanted codec's set if dash.js chose
  // another, then start on its lowest representation.
  p.on(dashjs.MediaPlayer.events.STREAM_INITIALIZED, () => {
    const reps = p.getRepresentationsByType('video');
    if (reps.length && (reps[0].codecs || '').startsWith(want)) return start();
    const track = p.getTracksFor('video').find((t) => (t.codec || '').includes('codecs="' + want));
    if (!track) { window.state.errors.push('dash.js: no video track of ' + want); return; }
    p.on(dashjs.MediaPlayer.events.TRACK_CHANGE_RENDERED, (e) => { if (e.mediaType === 'video') start(); });
    p.setCurrentTrack(track);
  });
  p.on(dashjs.MediaPlayer.events.QUALITY_CHANGE_RENDERED, (e) => { if (e.mediaType === 'video') note(e.newRepresentation && e.newRepresentation.id); });
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
const result = { player, codec, played_s: 0, switched_at_s: null, renditions: [], errors: [], requests };
try {
  const tab = await browser.newPage();
  tab.on('pageerror', (e) => result.errors.push('page: ' + e.message));
  await tab.goto(url);
  const state = () =>
    tab.evaluate(() => ({
      ...(window.state ?? { errors: ['the page script did not run'] }),
      t: document.getElementById('v').currentTime,
    }));
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
