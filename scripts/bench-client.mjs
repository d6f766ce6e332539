// Client-Server API benchmark of two homeservers, Hyphae and Synapse, side by side. Usually
// started by scripts/bench-client.sh, which brings both servers up:
//
//   node scripts/bench-client.mjs HYPHAE_URL SYNAPSE_URL
//
// Each server is driven the same way with plain HTTP (fetch, kept-alive connections) and fresh
// users; they are measured one after the other, never at the same time. Prints a Markdown table
// and writes the raw figures to target/bench-client.json. Exits non-zero when a server lost an
// event, truncated a sync or delivered an event twice.

import { randomBytes } from "node:crypto";
import { mkdir, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { performance } from "node:perf_hooks";
import { fileURLToPath } from "node:url";

const ROOT = fileURLToPath(new URL("..", import.meta.url));
const OUT = path.join(ROOT, "target", "bench-client.json");

const N = Number(process.env.BENCH_N ?? 500); // sequential sends
const SENDERS = 10;
const CONCURRENT_TOTAL = 2 * N; // sent by SENDERS users, each sequentially, all at once
const WARMUP = 20; // untimed sends before the first phase
const LATENCY_MESSAGES = 100;
const PAGE = 100;
const PAGED_EVENTS = 1000;
const ROOMS = 50;
const SYNC_TIMEOUT_MS = 30_000;
const REQUEST_TIMEOUT_MS = 60_000;
const SEEN_TIMEOUT_MS = 15_000; // a latency message not in bob's sync by then counts as missing

const [hyphaeUrl, synapseUrl] = process.argv.slice(2);
if (!hyphaeUrl || !synapseUrl) {
  console.error("usage: node scripts/bench-client.mjs HYPHAE_URL SYNAPSE_URL");
  process.exit(2);
}

const log = (...args) => console.error(...args);
const now = () => performance.now();
const round = (x, digits = 1) => (Number.isFinite(x) ? Number(x.toFixed(digits)) : x);

// --- a minimal Matrix client ---------------------------------------------------------------------

class HttpError extends Error {
  constructor(what, status, text) {
    let json;
    try {
      json = JSON.parse(text);
    } catch {
      json = undefined;
    }
    super(`${what}: HTTP ${status} ${text.slice(0, 300)}`);
    this.status = status;
    this.json = json;
  }
}

async function call(base, method, urlPath, { token, body, query, timeoutMs = REQUEST_TIMEOUT_MS, signal } = {}) {
  const url = new URL(`/_matrix/client/v3${urlPath}`, base);
  for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
  const headers = {};
  if (token) headers.authorization = `Bearer ${token}`;
  if (body !== undefined) headers["content-type"] = "application/json";
  const timeout = AbortSignal.timeout(timeoutMs);
  const res = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: signal ? AbortSignal.any([signal, timeout]) : timeout,
  });
  const text = await res.text();
  if (!res.ok) throw new HttpError(`${method} ${urlPath}`, res.status, text);
  return JSON.parse(text);
}

const enc = encodeURIComponent;

/** Registers a user through the m.login.dummy user-interactive flow. */
async function register(base, username) {
  const body = { username, password: `pw-${username}`, initial_device_display_name: "bench-client" };
  let res;
  try {
    res = await call(base, "POST", "/register", { body });
  } catch (e) {
    if (e.status !== 401 || !e.json?.session) throw e;
    res = await call(base, "POST", "/register", {
      body: { ...body, auth: { type: "m.login.dummy", session: e.json.session } },
    });
  }
  let txn = 0;
  const user = {
    base,
    userId: res.user_id,
    token: res.access_token,
    call: (method, urlPath, opts = {}) => call(base, method, urlPath, { ...opts, token: res.access_token }),
    nextTxn: () => `${Date.now().toString(36)}-${(txn++).toString(36)}`,
  };
  user.send = async (roomId, text) => {
    const r = await user.call("PUT", `/rooms/${enc(roomId)}/send/m.room.message/${user.nextTxn()}`, {
      body: { msgtype: "m.text", body: text },
    });
    return r.event_id;
  };
  return user;
}

function percentile(sorted, p) {
  if (sorted.length === 0) return NaN;
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1))];
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/**
 * A reader of one room through /sync, as a client runs it: a filter for the room with a
 * timeline limit of `limit`, and a new long poll as soon as one answers (or `pauseMs` later, a
 * slow reader). A `limited` timeline is filled from its `prev_batch` with /messages back to the
 * last event the reader had, as a client fills a gap. Records when each message body was first
 * seen, and every event id in the order delivered.
 */
function syncReader(user, roomId, { pauseMs = 0, limit = 1000 } = {}) {
  const filter = JSON.stringify({ room: { rooms: [roomId], timeline: { limit } } });
  const seenAt = new Map();
  const order = [];
  const counts = new Map();
  const stats = { syncs: 0, limited: 0, gap_events: 0 };
  const stop = new AbortController();
  let since;
  let lastId;
  const ready = user.call("GET", "/sync", { query: { filter, timeout: 0 } }).then((r) => {
    since = r.next_batch;
    const events = r.rooms?.join?.[roomId]?.timeline?.events ?? [];
    lastId = events.at(-1)?.event_id;
  });
  const loop = (async () => {
    await ready;
    while (!stop.signal.aborted) {
      if (pauseMs) await sleep(pauseMs);
      let r;
      try {
        r = await user.call("GET", "/sync", {
          query: { since, filter, timeout: SYNC_TIMEOUT_MS },
          timeoutMs: SYNC_TIMEOUT_MS + 30_000,
          signal: stop.signal,
        });
      } catch (e) {
        if (stop.signal.aborted) return;
        throw e;
      }
      const at = now();
      since = r.next_batch;
      stats.syncs++;
      const timeline = r.rooms?.join?.[roomId]?.timeline;
      if (!timeline) continue;
      let events = timeline.events ?? [];
      if (timeline.limited && lastId) {
        stats.limited++;
        const gap = [];
        let from = timeline.prev_batch;
        gapFill: while (from) {
          const page = await user.call("GET", `/rooms/${enc(roomId)}/messages`, { query: { dir: "b", from, limit: 100 } });
          for (const ev of page.chunk) {
            if (ev.event_id === lastId) break gapFill;
            gap.push(ev);
          }
          if (!page.end || page.chunk.length === 0) break;
          from = page.end;
        }
        gap.reverse();
        stats.gap_events += gap.length;
        events = [...gap, ...events];
      }
      for (const ev of events) {
        counts.set(ev.event_id, (counts.get(ev.event_id) ?? 0) + 1);
        order.push(ev.event_id);
        const body = ev.content?.body;
        if (body && !seenAt.has(body)) seenAt.set(body, at);
      }
      if (events.length) lastId = events.at(-1).event_id;
    }
  })();
  return {
    ready,
    seenAt,
    order,
    counts,
    stats,
    /** Resolves once every body in `bodies` was seen, or after `timeoutMs`. */
    async waitFor(bodies, timeoutMs = SEEN_TIMEOUT_MS) {
      const until = now() + timeoutMs;
      while (now() < until && !bodies.every((b) => seenAt.has(b))) await sleep(5);
    },
    async stop() {
      stop.abort();
      await loop;
    },
  };
}

/**
 * SENDERS users send `total` messages at once, each one at a time, while bob reads the room
 * with `syncReader(readerOptions)`. Returns the send figures and, per message, the time from the
 * start of its send to bob's sync answer holding it; checks nothing was lost, duplicated or
 * delivered out of the room's order.
 */
async function concurrentPhase(name, { senders, bob, roomId, total, tag, readerOptions }) {
  const reader = syncReader(bob, roomId, readerOptions);
  await reader.ready;
  const started = new Map();
  const each = Math.ceil(total / senders.length);
  const t0 = now();
  const perSender = await Promise.all(
    senders.map(async (u, s) => {
      const ids = [];
      for (let i = 0; i < each; i++) {
        const body = `${tag} ${s}/${i}`;
        started.set(body, now());
        ids.push(await u.send(roomId, body));
      }
      return ids;
    }),
  );
  const ms = now() - t0;
  const ids = perSender.flat();
  await reader.waitFor([...started.keys()]);
  await reader.stop();
  const latencies = [...started].filter(([b]) => reader.seenAt.has(b)).map(([b, t]) => reader.seenAt.get(b) - t);
  latencies.sort((a, b) => a - b);
  // The room's order, from /messages, against the order bob's syncs delivered.
  const whole = await pageBack(bob, roomId, { maxEvents: ids.length + 200 });
  const wanted = new Set(ids);
  const roomOrder = whole.events.map((e) => e.event_id).reverse().filter((id) => wanted.has(id));
  const delivered = reader.order.filter((id) => wanted.has(id));
  const firstDelivery = [...new Set(delivered)];
  return {
    senders: senders.length,
    events: ids.length,
    ms: round(ms),
    events_per_s: round((ids.length * 1000) / ms),
    delivery_p50_ms: round(percentile(latencies, 0.5), 2),
    delivery_p99_ms: round(percentile(latencies, 0.99), 2),
    lost: ids.filter((id) => !reader.counts.has(id)).length,
    duplicated: ids.filter((id) => (reader.counts.get(id) ?? 0) > 1).length,
    out_of_order: firstDelivery.filter((id, i) => roomOrder[i] !== id).length,
    ...reader.stats,
    ids,
  };
}

/** Pages /messages backwards from the newest event, `limit` at a time, until `maxEvents` or the start. */
async function pageBack(user, roomId, { limit = PAGE, maxEvents = Infinity } = {}) {
  const events = [];
  const pageMs = [];
  let from;
  while (events.length < maxEvents) {
    const t0 = now();
    const r = await user.call("GET", `/rooms/${enc(roomId)}/messages`, { query: { dir: "b", limit, from } });
    pageMs.push(now() - t0);
    events.push(...r.chunk);
    if (!r.end || r.chunk.length === 0) break;
    from = r.end;
  }
  return { events, pageMs };
}

// --- the benchmark, for one server ---------------------------------------------------------------

async function benchServer(name, base) {
  const run = randomBytes(4).toString("hex");
  const progress = (what) => log(`[${name}] ${what}`);
  const out = { url: base };

  progress("registering users and setting up the room");
  const alice = await register(base, `alice_${run}`);
  const bob = await register(base, `bob_${run}`);
  const senders = [];
  for (let i = 0; i < SENDERS; i++) senders.push(await register(base, `sender${i}_${run}`));
  const { room_id: roomId } = await alice.call("POST", "/createRoom", {
    body: { preset: "private_chat", name: `bench ${run}` },
  });
  for (const u of [bob, ...senders]) {
    await alice.call("POST", `/rooms/${enc(roomId)}/invite`, { body: { user_id: u.userId } });
    await u.call("POST", `/join/${enc(roomId)}`, { body: {} });
  }
  for (let i = 0; i < WARMUP; i++) await alice.send(roomId, `warm-up ${i}`);

  const sent = []; // every event id the send phases got back

  // Sequential send: one message at a time.
  progress(`sequential send: ${N} messages`);
  let t0 = now();
  for (let i = 0; i < N; i++) sent.push(await alice.send(roomId, `sequential ${i}`));
  let ms = now() - t0;
  out.sequential_send = { events: N, ms: round(ms), events_per_s: round((N * 1000) / ms) };

  // Concurrent send: SENDERS users at once, each one message at a time, while bob reads the
  // room through /sync and polls again at once.
  progress(`concurrent send: ${CONCURRENT_TOTAL} messages from ${SENDERS} users, bob reading`);
  out.concurrent_send = await concurrentPhase(name, {
    senders,
    bob,
    roomId,
    total: CONCURRENT_TOTAL,
    tag: `concurrent ${run}`,
  });
  // The same with a slow reader: 200 ms between bob's polls, so his timelines come limited and
  // he fills the gaps from prev_batch; nothing may be lost or doubled.
  progress(`concurrent send with a slow reader (200 ms between polls)`);
  out.slow_reader = await concurrentPhase(name, {
    senders,
    bob,
    roomId,
    total: CONCURRENT_TOTAL,
    tag: `slow ${run}`,
    readerOptions: { pauseMs: 200, limit: 50 },
  });
  for (const phase of [out.concurrent_send, out.slow_reader]) {
    sent.push(...phase.ids);
    delete phase.ids;
  }

  // Nothing lost: bob pages back over the whole room; every sent event is there exactly once.
  progress("checking for lost events: /messages over the whole room");
  const whole = await pageBack(bob, roomId);
  const counts = new Map();
  for (const ev of whole.events) counts.set(ev.event_id, (counts.get(ev.event_id) ?? 0) + 1);
  const distinct = new Set(sent);
  out.loss = {
    sent: sent.length,
    distinct_event_ids: distinct.size,
    room_events_paged: whole.events.length,
    pages: whole.pageMs.length,
    lost: sent.filter((id) => !counts.has(id)).length,
    duplicated: sent.filter((id) => (counts.get(id) ?? 0) > 1).length,
  };

  // /messages back over PAGED_EVENTS events, PAGE at a time.
  progress(`/messages: back over ${PAGED_EVENTS} events in pages of ${PAGE}`);
  t0 = now();
  const paged = await pageBack(bob, roomId, { maxEvents: PAGED_EVENTS });
  ms = now() - t0;
  out.messages = {
    events: paged.events.length,
    pages: paged.pageMs.length,
    total_ms: round(ms),
    ms_per_page: round(ms / paged.pageMs.length, 2),
    page_ms: paged.pageMs.map((x) => round(x, 2)),
  };

  // Delivery latency: bob long-polls /sync; alice sends one message at a time, each once bob saw
  // the one before; the time from starting the send to bob's sync answer holding it.
  progress(`sync delivery latency: ${LATENCY_MESSAGES} messages`);
  const first = await bob.call("GET", "/sync", { query: { timeout: 0 } });
  let since = first.next_batch;
  const waiting = new Map(); // message body -> resolve(seen at)
  const seenIds = new Map(); // event id -> times delivered
  const syncStats = { incremental_syncs: 0, limited: 0, duplicated_in_sync: 0 };
  const stopSync = new AbortController();
  const syncLoop = (async () => {
    while (!stopSync.signal.aborted) {
      let r;
      try {
        r = await bob.call("GET", "/sync", {
          query: { since, timeout: SYNC_TIMEOUT_MS },
          timeoutMs: SYNC_TIMEOUT_MS + 30_000,
          signal: stopSync.signal,
        });
      } catch (e) {
        if (stopSync.signal.aborted) return;
        throw e;
      }
      const at = now();
      since = r.next_batch;
      syncStats.incremental_syncs++;
      const timeline = r.rooms?.join?.[roomId]?.timeline;
      if (!timeline) continue;
      if (timeline.limited) syncStats.limited++;
      for (const ev of timeline.events ?? []) {
        seenIds.set(ev.event_id, (seenIds.get(ev.event_id) ?? 0) + 1);
        if (seenIds.get(ev.event_id) > 1) syncStats.duplicated_in_sync++;
        const resolve = waiting.get(ev.content?.body);
        if (resolve) {
          waiting.delete(ev.content.body);
          resolve(at);
        }
      }
    }
  })();
  const latencies = [];
  const latencyIds = [];
  let timeouts = 0;
  try {
    for (let i = 0; i < LATENCY_MESSAGES; i++) {
      const text = `latency ${run} ${i}`;
      let timer;
      const seen = new Promise((resolve) => {
        waiting.set(text, resolve);
        timer = setTimeout(() => resolve(null), SEEN_TIMEOUT_MS);
      });
      const start = now();
      const eventId = await alice.send(roomId, text);
      latencyIds.push(eventId);
      const at = await Promise.race([seen, syncLoop.then(() => null)]);
      clearTimeout(timer);
      if (at === null) {
        waiting.delete(text);
        timeouts++;
        progress(`  ${eventId} not in bob's sync within ${SEEN_TIMEOUT_MS} ms`);
        continue;
      }
      latencies.push(at - start);
    }
  } finally {
    stopSync.abort();
    await syncLoop;
  }
  // Only alice sent in the room meanwhile, so these are all the room's new messages. One a sync
  // never delivered was cut out of a limited (gappy) timeline, or lost outright.
  const missing = latencyIds.filter((id) => !seenIds.has(id)).length;
  const sorted = [...latencies].sort((a, b) => a - b);
  out.sync_latency = {
    messages: LATENCY_MESSAGES,
    p50_ms: round(percentile(sorted, 0.5), 2),
    p99_ms: round(percentile(sorted, 0.99), 2),
    mean_ms: round(sorted.reduce((a, b) => a + b, 0) / sorted.length, 2),
    max_ms: round(sorted.at(-1), 2),
    missing,
    timeouts,
    ...syncStats,
    truncated: missing > 0 ? syncStats.limited : 0,
    samples_ms: latencies.map((x) => round(x, 2)),
  };

  // Room creation, one after another.
  progress(`createRoom x${ROOMS}`);
  t0 = now();
  for (let i = 0; i < ROOMS; i++) {
    await alice.call("POST", "/createRoom", { body: { preset: "private_chat", name: `room ${run} ${i}` } });
  }
  ms = now() - t0;
  out.create_room = { rooms: ROOMS, ms: round(ms), rooms_per_s: round((ROOMS * 1000) / ms, 2) };

  return out;
}

// --- both servers, then the table ----------------------------------------------------------------

const results = {
  date: new Date().toISOString(),
  machine: { cpus: os.cpus().length, cpu: os.cpus()[0]?.model, arch: os.arch(), node: process.version },
  parameters: {
    sequential: N,
    concurrent: CONCURRENT_TOTAL,
    senders: SENDERS,
    latency_messages: LATENCY_MESSAGES,
    page: PAGE,
    paged_events: PAGED_EVENTS,
    rooms: ROOMS,
  },
  hyphae: { bin: process.env.BENCH_HYPHAE_BIN },
  synapse: { version: process.env.BENCH_SYNAPSE_VERSION, database: "sqlite3" },
};
Object.assign(results.hyphae, await benchServer("Hyphae", hyphaeUrl));
Object.assign(results.synapse, await benchServer("Synapse", synapseUrl));

await mkdir(path.dirname(OUT), { recursive: true });
await writeFile(OUT, `${JSON.stringify(results, null, 2)}\n`);

const h = results.hyphae;
const s = results.synapse;
const fmtCheck = (p) => `${p.lost} / ${p.duplicated} / ${p.out_of_order}`;
const higher = (a, b) => `${(a / b).toFixed(2)}×`; // throughput: Hyphae / Synapse
const lower = (a, b) => `${(b / a).toFixed(2)}×`; // time: Synapse / Hyphae
const rows = [
  ["sequential send (events/s)", h.sequential_send.events_per_s, s.sequential_send.events_per_s, higher],
  [`concurrent send, ${SENDERS} users (events/s)`, h.concurrent_send.events_per_s, s.concurrent_send.events_per_s, higher],
  ["delivery to a reader during the concurrent sends p50 (ms)", h.concurrent_send.delivery_p50_ms, s.concurrent_send.delivery_p50_ms, lower],
  ["delivery to a reader during the concurrent sends p99 (ms)", h.concurrent_send.delivery_p99_ms, s.concurrent_send.delivery_p99_ms, lower],
  ["slow reader (200 ms between polls): delivery p50 (ms)", h.slow_reader.delivery_p50_ms, s.slow_reader.delivery_p50_ms, lower],
  ["sync delivery latency p50 (ms)", h.sync_latency.p50_ms, s.sync_latency.p50_ms, lower],
  ["sync delivery latency p99 (ms)", h.sync_latency.p99_ms, s.sync_latency.p99_ms, lower],
  [`/messages back over ${PAGED_EVENTS} events (ms)`, h.messages.total_ms, s.messages.total_ms, lower],
  [`/messages per page of ${PAGE} (ms)`, h.messages.ms_per_page, s.messages.ms_per_page, lower],
  [`createRoom x${ROOMS} (rooms/s)`, h.create_room.rooms_per_s, s.create_room.rooms_per_s, higher],
  [`lost events (of ${h.loss.sent} / ${s.loss.sent})`, h.loss.lost, s.loss.lost, null],
  ["events paged back twice", h.loss.duplicated, s.loss.duplicated, null],
  ["truncated syncs (limited, message left out)", h.sync_latency.truncated, s.sync_latency.truncated, null],
  ["concurrent phase: lost / doubled / out of order", fmtCheck(h.concurrent_send), fmtCheck(s.concurrent_send), null],
  ["slow reader: lost / doubled / out of order", fmtCheck(h.slow_reader), fmtCheck(s.slow_reader), null],
  ["slow reader: limited timelines (gap events filled)", `${h.slow_reader.limited} (${h.slow_reader.gap_events})`, `${s.slow_reader.limited} (${s.slow_reader.gap_events})`, null],
  ["latency messages missing from sync", h.sync_latency.missing, s.sync_latency.missing, null],
  ["events delivered twice by /sync", h.sync_latency.duplicated_in_sync, s.sync_latency.duplicated_in_sync, null],
];
const lines = [
  `Hyphae (${path.relative(ROOT, h.bin ?? "") || "?"}) vs Synapse ${s.version ?? "?"} (SQLite), ` +
    `${results.machine.cpus} cores, ${results.date.slice(0, 10)}`,
  "",
  "| metric | Hyphae | Synapse | ratio |",
  "| --- | ---: | ---: | ---: |",
  ...rows.map(([metric, a, b, ratio]) => `| ${metric} | ${a} | ${b} | ${ratio ? ratio(a, b) : "—"} |`),
  "",
  "ratio: Hyphae/Synapse for throughputs, Synapse/Hyphae for times (above 1× means Hyphae is faster).",
  `raw figures: ${path.relative(ROOT, OUT)}`,
];
console.log(lines.join("\n"));

// Figures are only worth reading from a server that delivered every event once.
const problems = [];
for (const [name, r] of [["Hyphae", h], ["Synapse", s]]) {
  if (r.loss.lost > 0) problems.push(`${name} lost ${r.loss.lost} of ${r.loss.sent} sent events`);
  if (r.loss.duplicated > 0) problems.push(`${name}'s /messages returned ${r.loss.duplicated} events twice`);
  if (r.sync_latency.truncated > 0) problems.push(`${name} truncated ${r.sync_latency.truncated} syncs`);
  if (r.sync_latency.missing > 0) problems.push(`${name}'s /sync never delivered ${r.sync_latency.missing} messages`);
  for (const [phase, p] of [["concurrent", r.concurrent_send], ["slow-reader", r.slow_reader]]) {
    if (p.lost || p.duplicated || p.out_of_order) {
      problems.push(`${name}, ${phase} phase: ${p.lost} lost, ${p.duplicated} doubled, ${p.out_of_order} out of order in /sync`);
    }
  }
  if (r.sync_latency.duplicated_in_sync > 0) {
    problems.push(`${name}'s /sync delivered ${r.sync_latency.duplicated_in_sync} events a second time`);
  }
}
for (const p of problems) console.error(`FAIL: ${p}`);
process.exitCode = problems.length > 0 ? 1 : 0;
