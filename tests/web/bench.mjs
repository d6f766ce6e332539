// Web app figures, measured with Playwright in headless Chromium against a hyphae-node serving
// the built app: cold start, bundle sizes, typed → visible on the other peer, tab memory.
// `npm run bench:web` (after scripts/build-web.sh and a hyphae-node build); JSON goes to
// target/bench-web.json.

import { readdir, readFile, writeFile, mkdir } from "node:fs/promises";
import path from "node:path";
import { gzipSync } from "node:zlib";

import { createRoom, onboard, openProfile, ready, ROOT, startWebNode } from "./browser.mjs";

const RESULTS = path.join(ROOT, "target", "bench-web.json");
const HISTORY = Number(process.env.HYPHAE_BENCH_HISTORY ?? 1000);
const LATENCY_SAMPLES = Number(process.env.HYPHAE_BENCH_SAMPLES ?? 100);
const MEMORY_MESSAGES = Number(process.env.HYPHAE_BENCH_MEMORY ?? 10_000);
const RUNS = 5;

const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((xs.length * p) / 100))];
const ms = (x) => `${x.toFixed(1)} ms`;
const mib = (x) => `${(x / 1048576).toFixed(1)} MiB`;
const kb = (x) => `${(x / 1000).toFixed(1)} KB`;

async function sizes() {
  const dist = path.join(ROOT, "dist");
  const out = { wasm: { raw: 0, gzip: 0 }, js: { raw: 0, gzip: 0 }, crypto: { raw: 0, gzip: 0 }, other: { raw: 0, gzip: 0 } };
  for (const name of await readdir(dist)) {
    if (name.endsWith(".gz")) continue; // the precompressed copies the node serves
    const data = await readFile(path.join(dist, name));
    // End-to-end encryption (its wasm and the chunk that loads it) comes after the page.
    const lazy = name.startsWith("matrix_sdk_crypto") || (name.endsWith(".js") && name !== "app.js");
    const kind = lazy ? "crypto" : name.endsWith(".wasm") ? "wasm" : name.endsWith(".js") ? "js" : "other";
    out[kind].raw += data.length;
    out[kind].gzip += gzipSync(data, { level: 9 }).length;
  }
  return out;
}

/** Milliseconds from navigation start to the chat being usable (or the first-run form shown). */
async function interactiveAt(page, phases) {
  const marks = await page.evaluate(async () => {
    const mark = (name) => performance.getEntriesByName(name)[0]?.startTime;
    // Both: interactive, and the first /sync handled (up to date), which may land either side.
    while (!mark("hyphae-interactive") || !mark("hyphae-up-to-date")) await new Promise((r) => setTimeout(r, 5));
    return Object.fromEntries(
      performance
        .getEntriesByType("mark")
        .filter((m) => m.name.startsWith("hyphae-"))
        .map((m) => [m.name, m.startTime]),
    );
  });
  phases?.push(marks);
  return marks["hyphae-interactive"];
}

/**
 * A 20 MB file from `from`'s tab to `to`'s (Bob's homeserver fetches it from Alice's over
 * libp2p, as the two tabs are connected), and an 800×600 thumbnail of a 4000×3000 JPEG made in
 * Bob's tab by the browser's decoders.
 */
async function mediaFigures(from, to, roomId) {
  const sent = await from.evaluate(async (roomId) => {
    const client = window.hyphaeClient;
    const upload = async (blob, name, type) => {
      // Uploaded for the room rather than named in a message, so Bob's app does not fetch
      // them on its own before they are timed.
      const query = new URLSearchParams({ filename: name, "org.hyphae.room_id": roomId });
      const resp = await window.hyphae.fetch(`${client.baseUrl}/_matrix/media/v3/upload?${query}`, {
        method: "POST",
        headers: { Authorization: `Bearer ${client.getAccessToken()}`, "Content-Type": type },
        body: blob,
      });
      return (await resp.json()).content_uri;
    };
    const data = new Uint8Array(20 * 1024 * 1024);
    for (let i = 0; i < data.length; i += 65536) crypto.getRandomValues(data.subarray(i, i + 65536));
    const t0 = performance.now();
    const file = await upload(new Blob([data]), "big.bin", "application/octet-stream");
    const upload_ms = performance.now() - t0;
    const canvas = new OffscreenCanvas(4000, 3000);
    const ctx = canvas.getContext("2d");
    const gradient = ctx.createLinearGradient(0, 0, 4000, 3000);
    gradient.addColorStop(0, "#2a6");
    gradient.addColorStop(1, "#a26");
    ctx.fillStyle = gradient;
    ctx.fillRect(0, 0, 4000, 3000);
    for (let i = 0; i < 2000; i++) {
      ctx.fillStyle = `hsl(${i % 360} 60% 50%)`;
      ctx.fillRect((i * 137) % 4000, (i * 91) % 3000, 40, 40);
    }
    const jpegBlob = await canvas.convertToBlob({ type: "image/jpeg", quality: 0.9 });
    const jpeg = await upload(jpegBlob, "big.jpg", "image/jpeg");
    const status = await window.hyphae.status();
    const connection = (status.connections ?? []).map((c) => (c.relayed ? "relayed" : "direct")).join(", ");
    return { file, jpeg, upload_ms, jpeg_bytes: jpegBlob.size, connection };
  }, roomId);
  const got = await to.evaluate(async ({ file, jpeg }) => {
    const client = window.hyphaeClient;
    const auth = { headers: { Authorization: `Bearer ${client.getAccessToken()}` } };
    const timed = async (url) => {
      const t0 = performance.now();
      const resp = await window.hyphae.fetch(url, auth);
      const bytes = (await resp.arrayBuffer()).byteLength;
      return { ms: performance.now() - t0, bytes, status: resp.status };
    };
    const full = (mxc) => client.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true);
    const download = await timed(full(file));
    const picture = await timed(full(jpeg));
    const thumbnail = await timed(client.mxcUrlToHttp(jpeg, 800, 600, "scale", false, true, true));
    const kept = await timed(client.mxcUrlToHttp(jpeg, 800, 600, "scale", false, true, true));
    const type = (await window.hyphae.fetch(client.mxcUrlToHttp(jpeg, 800, 600, "scale", false, true, true), auth)).headers.get("content-type");
    thumbnail.type = type;
    return { download, picture, thumbnail, kept };
  }, sent);
  if (got.download.bytes !== 20 * 1024 * 1024 || got.thumbnail.status !== 200) throw new Error(`media: ${JSON.stringify(got)}`);
  return {
    upload_20mb_ms: sent.upload_ms,
    download_20mb_other_tab_ms: got.download.ms,
    jpeg_4000x3000_bytes: sent.jpeg_bytes,
    jpeg_fetch_ms: got.picture.ms,
    thumbnail_in_tab_ms: got.thumbnail.ms,
    thumbnail_bytes: got.thumbnail.bytes,
    thumbnail_type: got.thumbnail.type,
    connection: sent.connection,
    thumbnail_kept_ms: got.kept.ms,
  };
}

/** Typed on `from` → shown on `to`, LATENCY_SAMPLES times, for messages "`tag` <n>". */
async function typedToVisible(from, to, tag) {
  // Where the time goes, per message: the sender's homeserver answers the send (durable
  // there), the receiver's SDK has the event (from a /sync), the receiver's screen shows it.
  const stampEvents = ({ tag, sent }) => {
    window.stampsAt = new Map();
    const pattern = new RegExp(`^${tag} (\\d+)$`);
    const now = () => performance.timeOrigin + performance.now();
    const stamp = (ev, at) => {
      const m = pattern.exec(ev.getContent()?.body ?? "");
      if (m && !window.stampsAt.has(m[1])) window.stampsAt.set(m[1], at);
    };
    const client = window.hyphaeClient;
    if (sent) {
      // Answered: SENT; or the remote echo came first (local status → none).
      client.on("Room.localEchoUpdated", (ev, _room, _oldId, oldStatus) => {
        if (ev.status === "sent" || (ev.status === null && oldStatus)) stamp(ev, now());
      });
    } else {
      // When the event reached the SDK; an encrypted one's body is known once decrypted.
      const arrived = new Map();
      client.on("Room.timeline", (ev) => {
        if (ev.status !== null) return;
        const at = now();
        arrived.set(ev.getId(), at);
        stamp(ev, at);
      });
      client.on("Event.decrypted", (ev) => arrived.has(ev.getId()) && stamp(ev, arrived.get(ev.getId())));
    }
  };
  await from.evaluate(stampEvents, { tag, sent: true });
  await to.evaluate(stampEvents, { tag, sent: false });
  await to.evaluate((tag) => {
    window.seenAt = new Map();
    const pattern = new RegExp(`^${tag} (\\d+)$`);
    new MutationObserver(() => {
      for (const el of document.querySelectorAll("#timeline .msg .text")) {
        const m = pattern.exec(el.textContent);
        if (m && !window.seenAt.has(m[1])) window.seenAt.set(m[1], performance.timeOrigin + performance.now());
      }
    }).observe(document.getElementById("app"), { childList: true, subtree: true, characterData: true });
  }, tag);
  const latencies = [];
  const parts = { saved: [], synced: [], shown: [] };
  for (let i = 0; i < LATENCY_SAMPLES; i++) {
    const sentAt = await from.evaluate((text) => {
      const box = document.getElementById("composer");
      box.value = text;
      const t = performance.timeOrigin + performance.now();
      box.dispatchEvent(new KeyboardEvent("keydown", { key: "Enter", bubbles: true }));
      return t;
    }, `${tag} ${i}`);
    const seenAt = await to.waitForFunction((i) => window.seenAt.get(String(i)), i).then((h) => h.jsonValue());
    latencies.push(seenAt - sentAt);
    const savedAt = await from.evaluate((i) => window.stampsAt.get(String(i)), i);
    const syncedAt = await to.evaluate((i) => window.stampsAt.get(String(i)), i);
    if (savedAt && syncedAt) {
      parts.saved.push(savedAt - sentAt);
      parts.synced.push(syncedAt - sentAt);
      parts.shown.push(seenAt - syncedAt);
    }
  }
  return {
    samples: latencies.length,
    p50: pct(latencies, 50),
    p99: pct(latencies, 99),
    // Medians, ms from the key press: the send answered; the event in the receiver's SDK; and
    // from there to the screen.
    parts_p50: { send_answered: median(parts.saved), in_receiver_sdk: median(parts.synced), sdk_to_screen: median(parts.shown) },
  };
}

async function firstRunFormAt(page) {
  await page.locator("#display-name").waitFor();
  return page.evaluate(() => performance.now());
}

/** Sends `n` messages from the page's own client, `parallel` at a time. */
async function fill(page, roomId, n, parallel = 16) {
  await page.evaluate(
    async ({ roomId, n, parallel }) => {
      const client = window.hyphaeClient;
      let next = 0;
      const worker = async () => {
        while (next < n) {
          const i = next++;
          await client.sendEvent(roomId, "m.room.message", { msgtype: "m.text", body: `history ${i}` });
        }
      };
      await Promise.all(Array.from({ length: parallel }, worker));
    },
    { roomId, n, parallel },
  );
}

async function currentRoom(page) {
  return page.locator("#timeline").getAttribute("data-room-id");
}

/** JS heap (after a collection) and the wasm module's linear memory. */
async function memory(page) {
  const cdp = await page.context().newCDPSession(page);
  await cdp.send("HeapProfiler.collectGarbage");
  const { usedSize } = await cdp.send("Runtime.getHeapUsage");
  const wasm = await page.evaluate(() => window.hyphaeWasmMemory());
  await cdp.detach();
  return { js_heap: usedSize, wasm };
}

async function main() {
  const results = { sizes: await sizes() };
  const node = await startWebNode("bench");
  const url = node.webUrl;
  const profiles = [];
  try {
    // Cold start, empty profile: a new browser, first visit, until the first-run form shows.
    const empty = [];
    for (let i = 0; i < RUNS; i++) {
      const p = await openProfile(`empty${i}`);
      await p.page.goto(url);
      empty.push(await firstRunFormAt(p.page));
      await p.close();
    }
    results.cold_start_empty_ms = median(empty);

    // Cold start with a room of HISTORY messages: a new browser process on the same profile.
    let a = await openProfile("a");
    profiles.push(a);
    await onboard(a.page, url, "Alice");
    await createRoom(a.page, "History");
    const room = await currentRoom(a.page);
    await fill(a.page, room, HISTORY);
    const withHistory = [];
    const reloads = [];
    const phases = [];
    for (let i = 0; i < RUNS; i++) {
      await a.page.reload();
      reloads.push(await interactiveAt(a.page));
    }
    for (let i = 0; i < RUNS; i++) {
      await a.reopen();
      await a.page.goto(url);
      withHistory.push(await interactiveAt(a.page, phases));
    }
    // Where the time goes (median of each mark, ms from navigation start).
    const phase = (name) => median(phases.map((p) => p[name]));
    results.cold_start_history = {
      messages: HISTORY,
      new_browser_ms: median(withHistory),
      runs_ms: withHistory,
      reload_ms: median(reloads),
      phases_ms: {
        wasm_ready: phase("hyphae-wasm-ready"),
        homeserver_open: phase("hyphae-homeserver-open"),
        crypto_ready: phase("hyphae-crypto-ready"),
        first_sync: phase("hyphae-first-sync"),
        interactive: phase("hyphae-interactive"),
      },
      // Every mark the app sets, in the order they come (medians).
      marks_ms: Object.fromEntries(
        Object.keys(phases[0])
          .map((name) => [name.slice("hyphae-".length), phase(name)])
          .sort((x, y) => x[1] - y[1]),
      ),
    };

    // Typed → visible on the other peer.
    const b = await openProfile("b");
    profiles.push(b);
    await onboard(b.page, url, "Bob");
    await a.page.locator("#share-button").click();
    const link = await a.page.locator("#join-link").inputValue();
    await a.page.keyboard.press("Escape");
    await b.page.goto(link);
    await b.page.locator("#room-name", { hasText: "History" }).waitFor();
    results.typed_to_visible_ms = await typedToVisible(a.page, b.page, "typed");

    // The same in an end-to-end encrypted room (open, so Bob joins by its link).
    await createRoom(a.page, "Secret", { encrypted: true });
    await a.page.locator("#share-button").click();
    const secretLink = await a.page.locator("#join-link").inputValue();
    await a.page.keyboard.press("Escape");
    await b.page.goto(secretLink);
    await b.page.locator("#room-name", { hasText: "Secret" }).waitFor();
    await b.page.locator("#room-encrypted").waitFor();
    results.typed_to_visible_encrypted_ms = await typedToVisible(a.page, b.page, "secret");
    await a.page.locator(".room-item", { hasText: "History" }).click();
    await b.page.locator(".room-item", { hasText: "History" }).click();
    await b.page.locator("#room-name", { hasText: "History" }).waitFor();
    results.media = await mediaFigures(a.page, b.page, room);

    // Tab memory after MEMORY_MESSAGES more messages (sent by Alice, received by Bob); 0 skips it.
    if (MEMORY_MESSAGES > 0) {
      await fill(a.page, room, MEMORY_MESSAGES);
      await b.page.locator("#timeline .msg .text", { hasText: `history ${MEMORY_MESSAGES - 1}` }).first().waitFor({ timeout: 300_000 });
      results.memory_after = {
        messages: HISTORY + MEMORY_MESSAGES + LATENCY_SAMPLES,
        sender: await memory(a.page),
        receiver: await memory(b.page),
      };
    }
  } finally {
    for (const p of profiles) await p.close().catch(() => {});
    await node.stop();
  }

  const r = results;
  const lines = [
    ["wasm (gzip -9)", `${kb(r.sizes.wasm.gzip)} (raw ${kb(r.sizes.wasm.raw)})`],
    ["JS bundle (gzip -9)", `${kb(r.sizes.js.gzip)} (raw ${kb(r.sizes.js.raw)})`],
    ["end-to-end encryption, loaded after the page (gzip -9)", `${kb(r.sizes.crypto.gzip)} (raw ${kb(r.sizes.crypto.raw)})`],
    ["cold start, empty profile", ms(r.cold_start_empty_ms)],
    [`cold start, ${HISTORY}-message room, new browser`, ms(r.cold_start_history.new_browser_ms)],
    [`cold start, ${HISTORY}-message room, reload`, ms(r.cold_start_history.reload_ms)],
    [
      "  phases (new browser): wasm / homeserver open / crypto ready / first sync",
      Object.values(r.cold_start_history.phases_ms).slice(0, 4).map(ms).join(" / "),
    ],
    [
      "  every mark (median ms)",
      Object.entries(r.cold_start_history.marks_ms)
        .map(([k, v]) => `${k} ${v.toFixed(0)}`)
        .join(", "),
    ],
    [
      "  the same, each run (interactive)",
      r.cold_start_history.runs_ms.map(ms).join(" / "),
    ],
    ["typed → visible on the other peer, p50", ms(r.typed_to_visible_ms.p50)],
    ["typed → visible on the other peer, p99", ms(r.typed_to_visible_ms.p99)],
    [
      "  p50 parts: send answered / in the receiver's SDK / SDK to screen",
      Object.values(r.typed_to_visible_ms.parts_p50)
        .map((x) => (x === undefined ? "—" : ms(x)))
        .join(" / "),
    ],
    ["the same, encrypted room, p50", ms(r.typed_to_visible_encrypted_ms.p50)],
    ["the same, encrypted room, p99", ms(r.typed_to_visible_encrypted_ms.p99)],
    ["20 MB upload in the tab", `${ms(r.media.upload_20mb_ms)} (${(20 / (r.media.upload_20mb_ms / 1000)).toFixed(1)} MB/s)`],
    ["the same file downloaded in the other tab", `${ms(r.media.download_20mb_other_tab_ms)} (${(20 / (r.media.download_20mb_other_tab_ms / 1000)).toFixed(1)} MB/s)`],
    [`4000×3000 JPEG (${kb(r.media.jpeg_4000x3000_bytes)}) fetched by the other tab`, ms(r.media.jpeg_fetch_ms)],
    ["  its 800×600 thumbnail made in that tab / once kept", `${ms(r.media.thumbnail_in_tab_ms)} / ${ms(r.media.thumbnail_kept_ms)} (${r.media.thumbnail_type}, ${kb(r.media.thumbnail_bytes)})`],
    ["  the sender's connections", r.media.connection],
  ];
  if (r.memory_after) {
    lines.push(
      [`sender tab after ${r.memory_after.messages} messages: JS heap + wasm`, `${mib(r.memory_after.sender.js_heap)} + ${mib(r.memory_after.sender.wasm)}`],
      [`receiver tab after ${r.memory_after.messages} messages: JS heap + wasm`, `${mib(r.memory_after.receiver.js_heap)} + ${mib(r.memory_after.receiver.wasm)}`],
    );
  }
  for (const [k, v] of lines) console.log(`${k.padEnd(62)} ${v}`);
  await mkdir(path.dirname(RESULTS), { recursive: true });
  await writeFile(RESULTS, JSON.stringify(results, null, 2));
}

await main();
