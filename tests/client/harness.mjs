// Helpers for driving `hyphae-node` over its Client-Server API with matrix-js-sdk.

import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { access, mkdtemp, rm } from "node:fs/promises";
import http from "node:http";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";

const ROOT = fileURLToPath(new URL("../..", import.meta.url));
const READY_TIMEOUT_MS = 60_000;
const STOP_TIMEOUT_MS = 10_000;
const LOG_TAIL_CHARS = 16_000; // of a node's output, shown with a failure

// The SDK logs every request at debug level. Keep only what HYPHAE_SDK_LOG asks for
// ("trace", "debug", "info", "warn" or "error"); nothing by default. Every SDK logger is a
// child of this one and copies its method factory, so this covers them all. Some SDK modules
// bind the logger's methods when they load, so the SDK itself is loaded only after this.
const LEVELS = ["trace", "debug", "info", "warn", "error"];
const sdkLogThreshold = LEVELS.indexOf(process.env.HYPHAE_SDK_LOG ?? "");
const sdkMethodFactory = sdkLogger.methodFactory;
sdkLogger.methodFactory = function (method, level, name) {
  const rank = LEVELS.indexOf(method === "log" ? "debug" : method);
  if (sdkLogThreshold < 0 || rank < sdkLogThreshold) return () => {};
  return sdkMethodFactory.call(this, method, level, name);
};
sdkLogger.rebuild();

export const sdk = await import("matrix-js-sdk");

/** A user name no earlier run can have taken. */
export function uniqueName(prefix) {
  return `${prefix}_${randomBytes(5).toString("hex")}`;
}

/**
 * Starts `hyphae-node` on loopback with a fresh data directory and resolves once it has printed
 * its client API URL and at least one libp2p listen address.
 */
export async function startNode({
  bootstrap = [],
  name = "node",
  listen = ["/ip4/127.0.0.1/tcp/0"],
  args: extra = [],
  data: dataDir,
  http = "127.0.0.1:0",
} = {}) {
  const bin = path.resolve(ROOT, process.env.HYPHAE_NODE_BIN ?? "target/debug/hyphae-node");
  await access(bin).catch(() => {
    throw new Error(`no hyphae-node binary at ${bin} (build it, or set HYPHAE_NODE_BIN)`);
  });
  // A node restarted on the data of an earlier one (`data`) keeps it when it stops: its first
  // run's `stop({ keep: true })` left it for this one.
  const data = dataDir ?? (await mkdtemp(path.join(tmpdir(), "hyphae-client-test-")));
  const args = ["--data", data, "--no-mdns", "--http", http, ...extra];
  for (const addr of listen) args.push("--listen", addr);
  for (const addr of bootstrap) args.push("--bootstrap", addr);
  const child = spawn(bin, args, {
    cwd: ROOT,
    env: { ...process.env, RUST_LOG: process.env.RUST_LOG ?? "warn", NO_COLOR: "1" },
    stdio: ["ignore", "pipe", "pipe"],
  });

  // The node's stdout and stderr, with the oldest part dropped beyond a limit. `mark()` is a
  // position in everything ever written, `logs(mark)` what came after it (its last part).
  let output = "";
  let dropped = 0;
  const record = (chunk) => {
    output += chunk;
    const excess = output.length - 4 * LOG_TAIL_CHARS;
    if (excess > 0) {
      output = output.slice(excess);
      dropped += excess;
    }
  };
  const mark = () => dropped + output.length;
  const logs = (since = 0) => {
    const text = output.slice(Math.max(0, since - dropped));
    if (text.length <= LOG_TAIL_CHARS) return text;
    const head = LOG_TAIL_CHARS / 4; // where a panic message would be
    return `${text.slice(0, head)}\n[…]\n${text.slice(head - LOG_TAIL_CHARS)}`;
  };
  const exited = new Promise((resolve) => child.once("exit", resolve));
  const killOnExit = () => child.kill("SIGKILL");
  process.once("exit", killOnExit);
  exited.then(() => process.off("exit", killOnExit));

  const node = { name, url: undefined, serverName: undefined, peerId: undefined, listen: [], mark, logs, data };
  let stopping;
  node.stop = ({ keep = false } = {}) => {
    stopping ??= (async () => {
      // (No pid: it never started, and there is no exit to wait for.)
      if (child.pid !== undefined && child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        const force = setTimeout(() => child.kill("SIGKILL"), STOP_TIMEOUT_MS);
        await exited;
        clearTimeout(force);
      }
      if (!keep && !process.env.HYPHAE_KEEP_DATA) await rm(data, { recursive: true, force: true });
    })();
    return stopping;
  };

  child.stderr.setEncoding("utf8");
  child.stderr.on("data", record);
  child.stdout.setEncoding("utf8");
  let partial = "";
  const ready = new Promise((resolve, reject) => {
    const fail = (why) => {
      clearTimeout(timer);
      reject(new Error(`${name}: ${why}\n--- ${name} output ---\n${logs()}`));
    };
    const timer = setTimeout(() => fail(`not ready within ${READY_TIMEOUT_MS / 1000} s`), READY_TIMEOUT_MS);
    child.once("error", (e) => fail(`could not start ${bin}: ${e.message}`));
    child.once("exit", (code, signal) => fail(`exited (${signal ?? `code ${code}`}) before it was ready`));
    child.stdout.on("data", (chunk) => {
      record(chunk);
      partial += chunk;
      const lines = partial.split("\n");
      partial = lines.pop();
      for (const line of lines) {
        const m = /^(server name|peer id|listening|client api|web app):\s+(\S+)\s*$/.exec(line.trimEnd());
        if (!m) continue;
        if (m[1] === "server name") node.serverName = m[2];
        if (m[1] === "peer id") node.peerId = m[2];
        if (m[1] === "listening") node.listen.push(m[2]);
        if (m[1] === "client api") node.url = m[2].replace(/\/+$/, "");
        if (m[1] === "web app") node.webUrl = m[2];
      }
      if (node.url && node.listen.length > 0 && (node.webUrl || !extra.includes("--web"))) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  try {
    await ready;
  } catch (e) {
    await node.stop();
    throw e;
  }
  return node;
}

/**
 * Runs the steps of a scenario as subtests of `t`. Once a step fails the later ones are skipped
 * (they build on it) unless it was marked `independent`. A failure carries what the nodes
 * printed during the step.
 */
export function stepper(t, nodes) {
  nodes = [...new Set(nodes)];
  let failed = null;
  return (name, fn, { independent = false } = {}) =>
    t.test(name, { skip: failed ? `after failed step "${failed}"` : false }, async (st) => {
      const marks = nodes.map((n) => n.mark());
      try {
        return await fn(st);
      } catch (e) {
        if (!independent) failed = name;
        const logs = nodes
          .map((n, i) => `--- ${n.name} (${n.url}) output during the step ---\n${n.logs(marks[i]) || "(nothing)"}`)
          .join("\n");
        throw new Error(`${name}: ${e?.message ?? e}\n${logs}`, { cause: e });
      }
    });
}

/** A client for a session the server handed out (register or login response). */
function sessionClient(url, res) {
  assert.ok(res.access_token, "the response carries an access_token");
  return sdk.createClient({
    baseUrl: url,
    accessToken: res.access_token,
    userId: res.user_id,
    deviceId: res.device_id,
  });
}

/**
 * Registers `username` through the user-interactive flow: the first request is answered with
 * 401 and a session, the second completes `m.login.dummy` in it. Returns a logged-in client.
 */
export async function register(url, username, password) {
  const anonymous = sdk.createClient({ baseUrl: url });
  const body = { username, password, initial_device_display_name: "hyphae client test" };
  let res;
  try {
    res = await anonymous.registerRequest(body);
  } catch (e) {
    if (e.httpStatus !== 401 || !e.data?.session) throw e;
    const flows = e.data.flows ?? [];
    assert.ok(
      flows.some((f) => f.stages?.length === 1 && f.stages[0] === "m.login.dummy"),
      `registration offers an m.login.dummy flow: ${JSON.stringify(flows)}`,
    );
    res = await anonymous.registerRequest({ ...body, auth: { type: "m.login.dummy", session: e.data.session } });
  }
  return sessionClient(url, res);
}

/** Logs `username` in with its password on a new device. Returns a client for that device. */
export async function login(url, username, password) {
  const res = await sdk.createClient({ baseUrl: url }).loginRequest({
    type: "m.login.password",
    identifier: { type: "m.id.user", user: username },
    password,
    initial_device_display_name: "hyphae client test",
  });
  return sessionClient(url, res);
}

/** Starts the client's /sync loop and resolves after its first sync went through. */
export async function startSyncing(client, timeoutMs = 30_000) {
  const synced = new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      client.off(sdk.ClientEvent.Sync, onSync);
      reject(new Error(`${client.getUserId()}: no first sync within ${timeoutMs} ms`));
    }, timeoutMs);
    const onSync = (state, _previous, data) => {
      if (state === sdk.SyncState.Prepared || state === sdk.SyncState.Syncing) {
        clearTimeout(timer);
        client.off(sdk.ClientEvent.Sync, onSync);
        resolve();
      } else if (state === sdk.SyncState.Error) {
        clearTimeout(timer);
        client.off(sdk.ClientEvent.Sync, onSync);
        reject(new Error(`${client.getUserId()}: sync failed: ${data?.error?.message ?? "no detail"}`));
      }
    };
    client.on(sdk.ClientEvent.Sync, onSync);
  });
  await client.startClient({ initialSyncLimit: 10 });
  await synced;
}

// Whatever /sync delivers surfaces as one of these on the client.
const WAKE_EVENTS = [
  sdk.ClientEvent.Sync,
  sdk.ClientEvent.Room,
  sdk.RoomEvent.Timeline,
  sdk.RoomEvent.Redaction,
  sdk.RoomEvent.Receipt,
  sdk.RoomEvent.MyMembership,
  sdk.RoomEvent.Name,
  sdk.RoomStateEvent.Events,
  sdk.RoomMemberEvent.Typing,
  sdk.RoomMemberEvent.Membership,
];

/**
 * Resolves with the first truthy value of `predicate()`, checked now and whenever the client
 * reports something from /sync. Rejects naming `what` after `timeoutMs`.
 */
export function waitFor(client, predicate, what, timeoutMs = 20_000) {
  return new Promise((resolve, reject) => {
    let lastError;
    const done = () => {
      clearTimeout(timer);
      for (const e of WAKE_EVENTS) client.off(e, check);
    };
    const check = () => {
      let value;
      try {
        value = predicate();
      } catch (e) {
        lastError = e;
        return;
      }
      if (value) {
        done();
        resolve(value);
      }
    };
    const timer = setTimeout(() => {
      done();
      const why = lastError ? ` (the last check threw: ${lastError.message})` : "";
      reject(new Error(`${client.getUserId()}: timed out after ${timeoutMs} ms waiting for ${what}${why}`));
    }, timeoutMs);
    for (const e of WAKE_EVENTS) client.on(e, check);
    check();
  });
}

const oneOf = (expected) => [].concat(expected);

/** Asserts that `promise` rejects with a Matrix error of the given HTTP status and errcode. */
export async function expectMatrixError(promise, status, errcode, what) {
  await assert.rejects(
    promise,
    (err) => {
      assert.ok(
        oneOf(errcode).includes(err.errcode) && oneOf(status).includes(err.httpStatus),
        `${what}: expected ${oneOf(status).join("/")} ${oneOf(errcode).join("/")}, ` +
          `got ${err.httpStatus} ${err.errcode} (${err.message})`,
      );
      return true;
    },
    `${what}: expected the request to fail`,
  );
}

/**
 * One HTTP request with no client library in between. `body` is sent as is when it is a string
 * or Buffer, as JSON otherwise. Resolves with the status and the parsed JSON body, also when
 * the server answers before it has read the whole request body.
 */
export function request(baseUrl, method, urlPath, { token, body, timeoutMs = 30_000 } = {}) {
  const raw = typeof body === "string" || Buffer.isBuffer(body);
  const data = body === undefined ? undefined : Buffer.from(raw ? body : JSON.stringify(body));
  const headers = {};
  if (data) Object.assign(headers, { "content-type": "application/json", "content-length": data.length });
  if (token) headers.authorization = `Bearer ${token}`;
  const what = `${method} ${urlPath}`;
  return new Promise((resolve, reject) => {
    let response;
    const chunks = [];
    const finish = () => {
      const text = Buffer.concat(chunks).toString("utf8");
      let json;
      try {
        json = JSON.parse(text);
      } catch {
        json = undefined;
      }
      resolve({ status: response.statusCode, contentType: response.headers["content-type"] ?? "", text, json });
    };
    const req = http.request(new URL(urlPath, baseUrl), { method, headers, agent: false });
    req.setTimeout(timeoutMs, () => req.destroy(new Error(`no answer within ${timeoutMs} ms`)));
    req.on("response", (res) => {
      response = res;
      res.on("data", (c) => chunks.push(c));
      res.on("end", finish);
      res.on("error", () => {}); // reported by "close" below
      res.on("close", () => {
        if (!res.complete) reject(new Error(`${what}: the response was cut off`));
      });
    });
    // A server refusing a large body may close the connection while it is still being sent:
    // that is fine once its answer is in.
    req.on("error", (e) => {
      if (!response) reject(new Error(`${what}: ${e.message}`));
    });
    req.end(data);
  });
}

/** Asserts that a `request()` result is a Matrix error with the given status and errcode. */
export function expectErrorResponse(res, status, errcode, what) {
  assert.ok(
    oneOf(status).includes(res.status) && oneOf(errcode).includes(res.json?.errcode),
    `${what}: expected ${oneOf(status).join("/")} ${oneOf(errcode).join("/")}, got ${res.status} ${res.text.slice(0, 300)}`,
  );
  assert.match(res.contentType, /^application\/json\b/, `${what}: errors are served as application/json`);
}
