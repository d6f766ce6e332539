// Hyphae in a page: opens this browser's homeserver (wasm, IndexedDB, libp2p), makes sure only
// one tab runs it, signs the person in, and hands over to the chat view.
import * as sdk from "matrix-js-sdk";
import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";
import init, { Hyphae, wasmMemoryBytes } from "../pkg/hyphae.js";
import { h, toast, describe, fail, screen, serverNameBox } from "./dom.js";
import { DB_NAME, LOCK, PROFILE, loadSession, saveSession, localpartFor, restore } from "./profile.js";
import { Chat, cryptoStoreHolds } from "./chat.js";
import { cryptoCallbacks } from "./recovery.js";
import { loadSettings, applyTheme } from "./settings.js";

// The SDK logs every request; warnings and errors are what a person debugging needs.
sdkLogger.setLevel(localStorage.getItem("hyphae:sdk-log") ?? "warn", false);
sdkLogger.rebuild?.();

/** Requests never leave the tab: the base URL only has to parse. */
const BASE_URL = "https://hyphae.invalid";

const root = document.getElementById("app");

// The homeserver runs inside this page. If it fails (in the browser a panic aborts the wasm
// module) nothing here works any more: say so above everything, and offer a reload. What the
// page showed as saved is in IndexedDB and comes back. Set up before the module even loads.
addEventListener("hyphae-failed", (e) => homeserverStopped(e.detail?.message));

function homeserverStopped(reason) {
  if (document.getElementById("homeserver-stopped")) return;
  document.body.prepend(
    h(
      "div.banner.fatal",
      { id: "homeserver-stopped", role: "alert" },
      h("strong", {}, "The homeserver in this tab stopped. "),
      "Your saved messages are safe in this browser; reload the page to start it again. ",
      h("button.primary", { id: "reload", onclick: () => location.reload() }, "Reload"),
      reason ? h("details", {}, h("summary", {}, "What happened"), h("pre", {}, reason)) : null,
    ),
  );
}

const wasmReady = init();

/** The multiaddrs to bootstrap from: the ones set in settings, else the serving node's. */
async function bootstrapAddrs() {
  const configured = loadSettings().bootstrap;
  if (configured?.length) return configured;
  try {
    const res = await fetch("/hyphae/bootstrap.json");
    if (!res.ok) return [];
    const { addrs } = await res.json();
    // One connection is enough; prefer WebSocket on the host this page came from.
    const host = location.hostname === "localhost" ? "127.0.0.1" : location.hostname;
    const ws = addrs.filter((a) => a.includes("/ws/"));
    const same = ws.find((a) => a.includes(`/${host}/`));
    return [same ?? ws[0] ?? addrs[0]].filter(Boolean);
  } catch {
    return [];
  }
}

export function clientFor(hs, session) {
  return sdk.createClient({
    baseUrl: BASE_URL,
    fetchFn: hs.fetch.bind(hs),
    userId: session?.user_id,
    accessToken: session?.access_token,
    deviceId: session?.device_id,
    timelineSupport: true,
    cryptoCallbacks,
  });
}

async function register(hs, displayName) {
  const anonymous = clientFor(hs, null);
  const password = btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(24))));
  const body = { username: localpartFor(displayName), password, initial_device_display_name: "Hyphae web" };
  let res;
  try {
    res = await anonymous.registerRequest(body);
  } catch (err) {
    if (err.httpStatus !== 401 || !err.data?.session) throw err;
    res = await anonymous.registerRequest({ ...body, auth: { type: "m.login.dummy", session: err.data.session } });
  }
  const session = { user_id: res.user_id, access_token: res.access_token, device_id: res.device_id, password };
  await clientFor(hs, session).setDisplayName(displayName);
  saveSession(session);
  return session;
}

/** The stored session if the homeserver still knows it (logging in again if only the token went). */
async function resume(hs) {
  const session = loadSession();
  if (!session?.user_id) return null;
  try {
    await clientFor(hs, session).whoami();
    return session;
  } catch (err) {
    if (err.errcode !== "M_UNKNOWN_TOKEN" || !session.password) return null;
  }
  // The token is gone (say, the profile was restored without it): log in again.
  try {
    const res = await clientFor(hs, null).loginRequest({
      type: "m.login.password",
      identifier: { type: "m.id.user", user: session.user_id },
      password: session.password,
    });
    const renewed = { ...session, access_token: res.access_token, device_id: res.device_id };
    saveSession(renewed);
    return renewed;
  } catch {
    return null;
  }
}

/**
 * The session to run end-to-end encryption in. A device's secret keys live in this browser's
 * crypto store; a profile restored in another browser has the session but not those keys, so
 * it signs in as a new device (and retires the old one) rather than reuse keys it cannot have.
 */
async function cryptoDevice(hs, session) {
  if (cryptoStoreHolds(session.user_id, session.device_id)) return session;
  const client = clientFor(hs, session);
  const keys = await client.http
    .authedRequest(sdk.Method.Post, "/keys/query", undefined, { device_keys: { [session.user_id]: [session.device_id] } })
    .catch(() => null);
  if (!keys?.device_keys?.[session.user_id]?.[session.device_id] || !session.password) return session;
  const identifier = { type: "m.id.user", user: session.user_id };
  const res = await clientFor(hs, null).loginRequest({
    type: "m.login.password",
    identifier,
    password: session.password,
    initial_device_display_name: "Hyphae web",
  });
  const renewed = { ...session, access_token: res.access_token, device_id: res.device_id };
  saveSession(renewed);
  // Best effort: the old device's keys should not be encrypted to any more.
  const old = session.device_id;
  await clientFor(hs, renewed)
    .deleteDevice(old)
    .catch((err) => {
      const auth = { type: "m.login.password", identifier, password: session.password, session: err.data?.session };
      return clientFor(hs, renewed).deleteDevice(old, auth);
    })
    .catch(() => {});
  return renewed;
}

/** First run: ask for a display name (or a backup to restore); resolves to a session. */
function onboard(hs) {
  return new Promise((resolve) => {
    const name = h("input", {
      type: "text", id: "display-name", placeholder: "e.g. Ada", maxlength: 64, autocomplete: "nickname",
    });
    const start = h("button.primary", { type: "submit", id: "start" }, "Start chatting");
    const file = h("input", { type: "file", accept: ".json,application/json", class: "hidden", id: "restore-file" });
    file.addEventListener("change", () => file.files[0] && restore(hs, file.files[0]));
    const form = h(
      "form",
      {
        onsubmit: async (e) => {
          e.preventDefault();
          const value = name.value.trim();
          if (!value) return name.focus();
          start.disabled = true;
          start.textContent = "Creating your account…";
          try {
            resolve(await register(hs, value));
          } catch (err) {
            toast(`Could not create your account: ${describe(err)}`, { error: true });
            start.disabled = false;
            start.textContent = "Start chatting";
          }
        },
      },
      h("h1", {}, "Welcome to Hyphae"),
      h("p.muted", {}, "This page is your own Matrix homeserver. It keeps your rooms in this browser and talks to other people's pages and nodes directly."),
      h("label", {}, "Your homeserver's name"),
      serverNameBox(hs.serverName),
      h("label", { for: "display-name" }, "What should people call you?"),
      name,
      h(
        "div.actions",
        {},
        h("button", { type: "button", id: "restore", onclick: () => file.click() }, "Restore a backup…"),
        file,
        start,
      ),
    );
    root.replaceChildren(h("div.center-card", {}, h("div.card", {}, form)));
    name.focus();
  });
}

/**
 * Runs the homeserver and the chat until `handedOver` resolves (another tab takes over).
 * Resolves to whether it was handed over (false: it could not start).
 */
async function holdProfile(handedOver) {
  root.replaceChildren(h("div.splash", {}, h("div", {}, h("div.logo", {}, "Hyphae"), h("p", {}, "Starting your homeserver…"))));
  // This tab holds the profile's lock by now: what it starts, no other tab is using.
  const returning = loadSession();
  const resuming = returning?.user_id && cryptoStoreHolds(returning.user_id, returning.device_id);
  await wasmReady;
  performance.mark("hyphae-wasm-ready");
  // Its end-to-end encryption is matrix-js-sdk's own wasm module: fetch and compile it while
  // the homeserver opens (after ours, which everything waits for). The SDK's `initRustCrypto`
  // then finds it loaded (the module keeps one instance).
  if (resuming) import("@matrix-org/matrix-sdk-crypto-wasm").then((m) => m.initAsync()).catch(() => {});
  let hs;
  try {
    // Offline until the chat is on screen: the handshakes would compete with the first sync.
    hs = await Hyphae.open(DB_NAME, await bootstrapAddrs(), true);
  } catch (err) {
    fail("Your homeserver could not start", err);
    return false;
  }
  performance.mark("hyphae-homeserver-open");
  window.hyphae = hs;
  let chat;
  try {
    const signedIn = (async () => cryptoDevice(hs, (await resume(hs)) ?? (await onboard(hs))))();
    const session = await Promise.race([signedIn, handedOver.then(() => null)]);
    performance.mark("hyphae-signed-in");
    if (session) {
      chat = new Chat({ root, hs, client: clientFor(hs, session), session });
      // For the browser console (and benchmarks): this tab's homeserver and Matrix client.
      window.hyphaeClient = chat.client;
      window.hyphaeWasmMemory = wasmMemoryBytes;
      await chat.start();
    }
  } catch (err) {
    fail("Something went wrong while starting", err);
  }
  await handedOver;
  chat?.stop();
  await hs.shutdown();
  window.hyphae = undefined;
  window.hyphaeClient = undefined;
  return true;
}

/** Another tab runs this profile: say so, and offer to move it here. */
function offerTakeOver(channel, message) {
  if (location.hash.startsWith("#/join/")) {
    // A join link opened in a new tab: the tab that runs the homeserver follows it.
    channel.postMessage({ join: location.hash });
    history.replaceState(null, "", location.pathname + location.search);
    message = "The room opens in your other Hyphae tab";
  }
  const button = h("button.primary", { id: "take-over" }, "Use Hyphae in this tab");
  screen(
    h("h1", { id: "elsewhere" }, message),
    h("p.muted", {}, "Only one tab at a time runs your homeserver, so that two of them never write to the same store."),
    h("div.actions", {}, button),
  );
  button.addEventListener("click", () => {
    button.disabled = true;
    button.textContent = "Waiting for the other tab…";
    channel.postMessage("take-over");
    navigator.locks.request(LOCK, () => run(channel));
  });
}

/** Holds the profile's lock (granted to this tab) until a take-over request. */
async function run(channel) {
  let handOver;
  const handedOver = new Promise((resolve) => (handOver = resolve));
  channel.onmessage = (e) => {
    if (e.data === "take-over") handOver();
    else if (typeof e.data?.join === "string") location.hash = e.data.join;
  };
  const moved = await holdProfile(handedOver);
  channel.onmessage = null;
  if (moved) offerTakeOver(channel, "Hyphae moved to another tab");
}

async function main() {
  applyTheme();
  if (!navigator.locks || !window.BroadcastChannel) {
    fail("This browser cannot run Hyphae", new Error("it lacks the Web Locks API"));
    return;
  }
  const channel = new BroadcastChannel(LOCK);
  const granted = await navigator.locks.request(LOCK, { ifAvailable: true }, async (lock) => {
    if (!lock) return false;
    await run(channel);
    return true;
  });
  if (!granted) offerTakeOver(channel, "Hyphae is open in another tab");
}

main();
