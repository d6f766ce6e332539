// Drives the web app in headless Chromium (Debian's, through playwright-core): isolated browser
// profiles, each a separate peer, against one hyphae-node that serves the app.

import assert from "node:assert/strict";
import { mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

import { chromium } from "playwright-core";

import { startNode } from "../client/harness.mjs";

export const ROOT = fileURLToPath(new URL("../..", import.meta.url));
export const ARTIFACTS = path.join(ROOT, "test-artifacts");

const CHROMIUM = process.env.CHROMIUM_BIN ?? "/usr/bin/chromium";
// Without the background-networking flags Chromium keeps calling home on a closed network.
const FLAGS = [
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
/** Generous: the first page load compiles the wasm module. */
export const UI_TIMEOUT_MS = 30_000;

/** A hyphae-node serving the built app (dist/) with a WebSocket listener for pages. */
export function startWebNode(name = "node") {
  return startNode({
    name,
    listen: ["/ip4/127.0.0.1/tcp/0/ws"],
    args: ["--web", path.join(ROOT, "dist")],
  });
}

/**
 * A fresh browser profile (its own IndexedDB, so its own homeserver). `page.logs()` is what the
 * page printed, for failure messages.
 */
export async function openProfile(name) {
  const dir = await mkdtemp(path.join(tmpdir(), `hyphae-web-${name}-`));
  const lines = [];
  const watch = (page) => {
    page.on("console", (m) => lines.push(`[${name}] ${m.type()}: ${m.text()}`));
    page.on("pageerror", (e) => lines.push(`[${name}] page error: ${e.message}`));
  };
  const launch = async () => {
    const context = await chromium.launchPersistentContext(dir, {
      executablePath: CHROMIUM,
      headless: true,
      args: FLAGS,
      viewport: { width: 1200, height: 800 },
    });
    context.setDefaultTimeout(UI_TIMEOUT_MS);
    context.on("page", watch);
    const page = context.pages()[0] ?? (await context.newPage());
    watch(page);
    return { context, page };
  };
  const profile = {
    name,
    ...(await launch()),
    logs: () => lines.slice(-80).join("\n"),
    /** Closes the browser and starts a new one on the same profile directory. */
    reopen: async () => {
      await profile.context.close();
      Object.assign(profile, await launch());
    },
    close: async () => {
      await profile.context.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
  return profile;
}

/** Opens the app and creates the account (display name only); waits for the chat view. */
export async function onboard(page, url, displayName) {
  await page.goto(url);
  await page.locator("#display-name").fill(displayName);
  await page.locator("#start").click();
  await ready(page);
  return page.locator(".me .server").textContent();
}

export async function ready(page) {
  await page.locator("body[data-ready=true]").waitFor();
}

export async function createRoom(page, name, { topic = "", visibility = "public", encrypted } = {}) {
  await page.locator("#new-room").click();
  await page.locator("#room-name-input").fill(name);
  if (topic) await page.locator("#room-topic-input").fill(topic);
  await page.locator(`input[name=visibility][value=${visibility}]`).check();
  if (encrypted !== undefined) await page.locator("#room-encrypted-input").setChecked(encrypted);
  await page.locator("#create-room").click();
  await page.locator("#room-name", { hasText: name }).waitFor();
}

export async function send(page, text) {
  await page.locator("#composer").fill(text);
  await page.locator("#composer").press("Enter");
}

/** The message texts of the open room's timeline, oldest first. */
export function messages(page) {
  return page.locator("#timeline .msg .text").allTextContents();
}

export async function waitForMessage(page, text) {
  await page.locator("#timeline .msg .text", { hasText: text }).first().waitFor();
}

/**
 * Waits until the async `fn` (run in the page, with `arg`) resolves truthy, and resolves to
 * that value. `page.waitForFunction` cannot do this: it takes the returned promise itself as
 * truthy and returns at once, whatever the promise resolves to.
 */
export async function waitUntilResolved(page, fn, arg, { timeout = UI_TIMEOUT_MS, polling = 250 } = {}) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const value = await page.evaluate(fn, arg);
    if (value) return value;
    assert.ok(Date.now() < deadline, `still not so after ${timeout} ms: ${fn}`);
    await page.waitForTimeout(polling);
  }
}

export async function screenshot(page, name) {
  await mkdir(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, name);
  await page.screenshot({ path: file });
  return file;
}

export { assert };

/**
 * Runs dependent steps as subtests of `t`: once one fails, the later ones are skipped, and the
 * failure carries what the node and the pages printed.
 */
export function steps(t, node, profiles) {
  let failed = null;
  return (name, fn) =>
    t.test(name, { skip: failed ? `after failed step "${failed}"` : false }, async () => {
      const mark = node.mark();
      try {
        await fn();
      } catch (e) {
        failed = name;
        const pages = profiles().map((p) => p.logs()).join("\n");
        throw new Error(`${name}: ${e?.message ?? e}\n--- node ---\n${node.logs(mark) || "(nothing)"}\n--- pages ---\n${pages}`, { cause: e });
      }
    });
}

/** Scrolls the open room back (loading history) until a message with exactly `text` shows. */
export async function scrollBackTo(page, text) {
  const target = page.locator("#timeline .msg .text").filter({ hasText: new RegExp(`^${text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}$`) });
  for (;;) {
    if ((await target.count()) > 0) return;
    const rows = await page.locator("#timeline > *").count();
    const atStart = await page.locator("#timeline-start", { hasText: "start of the room" }).count();
    assert.equal(atStart, 0, `"${text}" is not in the room's history`);
    await page.locator("#timeline").evaluate((el) => (el.scrollTop = 0));
    await page.waitForFunction(
      (n) =>
        document.querySelectorAll("#timeline > *").length > n ||
        /start of the room/.test(document.getElementById("timeline-start")?.textContent ?? ""),
      rows,
    );
  }
}
