// The web app end to end: two browser profiles (two peers) and one hyphae-node serving the app.
// Each step builds on the ones before it.

import { mkdtemp, readdir, readFile, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import path from "node:path";
import { test } from "node:test";

import { png } from "../png.mjs";
import {
  assert,
  createRoom,
  ROOT,
  messages,
  onboard,
  openProfile,
  ready,
  screenshot,
  scrollBackTo,
  send,
  startWebNode,
  steps,
  waitForMessage,
  waitUntilResolved,
} from "./browser.mjs";

/** How many backed-up room keys (`backupkey` rows) a backup file's profile holds. */
function backedUpKeys(saved) {
  return saved.profile
    .split("\n")
    .slice(1)
    .filter((line) => line && Buffer.from(JSON.parse(line).key, "base64").toString().startsWith("backupkey\0")).length;
}

/** Waits until the page's own profile export holds at least two backed-up room keys. */
async function profileHoldsBackedUpKeys(page) {
  await waitUntilResolved(
    page,
    async () => {
      const lines = (await window.hyphae.exportProfile()).split("\n").slice(1);
      return lines.filter((l) => l && atob(JSON.parse(l).key).startsWith("backupkey\0")).length >= 2;
    },
    null,
    { timeout: 60_000, polling: 500 },
  );
}

test("two peers chat through the web app", { timeout: 600_000 }, async (t) => {
  const node = await startWebNode();
  const profiles = [];
  const open = async (name) => {
    const p = await openProfile(name);
    profiles.push(p);
    return p;
  };
  t.after(async () => {
    for (const p of profiles) await p.close().catch(() => {});
    await node.stop();
  });
  const step = steps(t, node, () => profiles);
  const url = node.webUrl;
  let a, b, c, aliceId, bobId, link, downloaded, recoveryKey;

  await step("both people onboard with a display name only", async () => {
    [a, b] = await Promise.all([open("a"), open("b")]);
    aliceId = await onboard(a.page, url, "Alice");
    bobId = await onboard(b.page, url, "Bob");
    assert.match(aliceId, /^@alice:[0-9a-f]{64}$/);
    assert.match(bobId, /^@bob:[0-9a-f]{64}$/);
    assert.notEqual(aliceId.split(":")[1], bobId.split(":")[1], "two peers, two server names");
  });

  await step("the node lets browsers keep the app: hashed files for a year, the rest revalidated", async () => {
    const page = await fetch(url);
    assert.equal(page.status, 200);
    assert.equal(page.headers.get("cache-control"), "no-cache");
    const since = page.headers.get("last-modified");
    assert.ok(since, "the page carries Last-Modified");
    const again = await fetch(url, { headers: { "If-Modified-Since": since } });
    assert.equal(again.status, 304, "an unchanged page is not sent again");
    assert.equal(again.headers.get("cache-control"), "no-cache");
    const wasm = (await readdir(path.join(ROOT, "dist"))).find((n) => /^hyphae_bg\.[0-9a-f]{8}\.wasm$/.test(n));
    assert.ok(wasm, "dist/ holds the content-hashed module");
    const module = await fetch(new URL(wasm, url));
    assert.equal(module.status, 200);
    assert.equal(module.headers.get("content-type"), "application/wasm");
    assert.equal(module.headers.get("cache-control"), "public, max-age=31536000, immutable");
    assert.equal(module.headers.get("vary"), "accept-encoding", "gzipped or not, by Accept-Encoding");
    assert.equal((await fetch(new URL("/hyphae_bg.00000000.wasm", url))).headers.get("cache-control"), null, "a missing file is not cached");
  });

  await step("Alice creates a room and shares its join link", async () => {
    await createRoom(a.page, "Garden", { topic: "what grows where" });
    await a.page.locator("#room-topic", { hasText: "what grows where" }).waitFor();
    await a.page.locator("#share-button").click();
    link = await a.page.locator("#join-link").inputValue();
    assert.match(link, /#\/join\/.+via=/);
    await a.page.keyboard.press("Escape");
  });

  await step("Bob joins through the link", async () => {
    await b.page.goto(link);
    await b.page.locator("#room-name", { hasText: "Garden" }).waitFor();
    await a.page.locator("#timeline .notice", { hasText: "Bob joined" }).waitFor();
  });

  await step("they exchange messages, see each other typing and reading", async () => {
    await send(a.page, "Hi Bob, the tomatoes are in");
    await waitForMessage(b.page, "Hi Bob, the tomatoes are in");
    await send(b.page, "Hi Alice! Basil next?");
    await waitForMessage(a.page, "Hi Alice! Basil next?");
    // Typing: Bob starts a message; Alice sees it.
    await b.page.locator("#composer").fill("Thinking about it");
    await a.page.locator("#typing", { hasText: "Bob is typing" }).waitFor();
    await b.page.locator("#composer").fill("");
    await a.page.locator("#typing", { hasText: /^$/ }).waitFor();
    // Receipts: each has the room open, so each has read the other's message.
    await a.page.locator(".msg .seen", { hasText: "Seen by Bob" }).waitFor();
    await b.page.locator(".msg .seen", { hasText: "Seen by Alice" }).waitFor();
    // Alice's message reached another peer.
    await a.page.locator(".msg .state.delivered").first().waitFor();
  });

  await step("replies, edits and reactions", async () => {
    const bobsMessage = a.page.locator(".msg", { hasText: "Basil next?" });
    await bobsMessage.hover();
    await bobsMessage.locator("button[title=Reply]").click();
    await send(a.page, "Yes, by the window");
    await b.page.locator(".msg .quote", { hasText: "Basil next?" }).waitFor();
    const mine = a.page.locator(".msg", { hasText: "Yes, by the window" });
    await mine.hover();
    await mine.locator("button[title=Edit]").click();
    await send(a.page, "Yes, by the south window");
    await b.page.locator(".msg .text", { hasText: "Yes, by the south window" }).waitFor();
    await b.page.locator(".msg .edited").first().waitFor();
    const onBob = b.page.locator(".msg", { hasText: "Yes, by the south window" });
    await onBob.hover();
    await onBob.locator("button[title='React 👍']").click();
    await a.page.locator(".msg .reactions button", { hasText: "👍 1" }).waitFor();
    // Bob's latest read is his reaction, which has no row: it shows on the message before it.
    await a.page.locator(".msg", { hasText: "Yes, by the south window" }).locator(".seen", { hasText: "Seen by Bob" }).waitFor();
    await a.page.mouse.move(0, 0);
    await screenshot(a.page, "chat.png");
    await a.page.emulateMedia({ colorScheme: "dark" });
    await screenshot(a.page, "chat-dark.png");
    await a.page.emulateMedia({ colorScheme: "light" });
    // Only the sender's own edits count: Bob's client forging an edit of Alice's message
    // changes nothing on either screen.
    await b.page.evaluate(async (text) => {
      const client = window.hyphaeClient;
      const room = client.getRoom(document.getElementById("timeline").dataset.roomId);
      const target = room.getLiveTimeline().getEvents().find((e) => e.getContent().body === text);
      await client.sendEvent(room.roomId, "m.room.message", {
        msgtype: "m.text",
        body: "* forged",
        "m.new_content": { msgtype: "m.text", body: "forged by Bob" },
        "m.relates_to": { rel_type: "m.replace", event_id: target.getId() },
      });
      await client.sendMessage(room.roomId, { msgtype: "m.text", body: "after the forgery" });
    }, "Hi Bob, the tomatoes are in");
    for (const p of [a.page, b.page]) {
      await waitForMessage(p, "after the forgery");
      assert.equal(await p.locator(".msg .text", { hasText: "forged by Bob" }).count(), 0);
      await waitForMessage(p, "Hi Bob, the tomatoes are in");
    }
  });

  await step("pictures, files and avatars reach the other screen", async () => {
    // A picture: Bob sees an 800×600 thumbnail, scaled by his tab's homeserver from the
    // picture it fetched from Alice's, and opens the picture itself.
    await a.page.locator("#attach-input").setInputFiles({ name: "seedlings.png", mimeType: "image/png", buffer: png(1600, 1200) });
    const thumb = b.page.locator(".msg img.thumb[alt='seedlings.png']");
    await thumb.waitFor();
    await b.page.waitForFunction(() => document.querySelector(".msg img.thumb[alt='seedlings.png']")?.naturalWidth === 800);
    await thumb.click();
    await b.page.waitForFunction(() => document.querySelector("#lightbox img")?.naturalHeight === 1200);
    await b.page.keyboard.press("Escape");
    // A file: a row with its name and size that downloads it whole.
    const notes = "Sow thinly.\n".repeat(1000);
    await a.page.locator("#attach-input").setInputFiles({ name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from(notes) });
    const row = b.page.locator(".msg .file", { hasText: "notes.txt" });
    await row.locator(".file-size", { hasText: "12 KB" }).waitFor();
    const [download] = await Promise.all([b.page.waitForEvent("download"), row.click()]);
    assert.equal(download.suggestedFilename(), "notes.txt");
    assert.equal(await readFile(await download.path(), "utf8"), notes);
    // Alice picks a picture in Settings: it is next to her messages on Bob's screen.
    await a.page.locator("#settings-button").click();
    await a.page.locator("#settings-avatar-input").setInputFiles({ name: "me.png", mimeType: "image/png", buffer: png(64, 64) });
    await a.page.locator(".me .avatar.picture").waitFor();
    await a.page.keyboard.press("Escape");
    await send(a.page, "That is me now");
    await b.page.locator(".msg", { hasText: "That is me now" }).locator(".avatar.picture").waitFor();
  });

  await step("Alice invites Bob to a private room by user ID; Bob accepts", async () => {
    await createRoom(a.page, "Seeds", { visibility: "private" });
    await a.page.locator("#invite-button").click();
    await a.page.locator("#invite-user").fill(bobId);
    await a.page.locator("#invite-user").press("Enter");
    const invite = b.page.locator(".invite-item", { hasText: "Seeds" });
    await invite.locator("button", { hasText: "Join" }).click();
    await b.page.locator("#room-name", { hasText: "Seeds" }).waitFor();
    // A private room is end-to-end encrypted by default: both show the lock, and the message
    // crosses the peers as ciphertext that both browsers' crypto reads.
    for (const p of [a.page, b.page]) await p.locator("#room-encrypted").waitFor();
    await send(b.page, "Thanks for the invite");
    await waitForMessage(a.page, "Thanks for the invite");
    await send(a.page, "Encrypted on the way");
    await waitForMessage(b.page, "Encrypted on the way");
    const wire = await a.page.evaluate((text) => {
      const client = window.hyphaeClient;
      const room = client.getRooms().find((r) => r.name === "Seeds");
      const ev = room.getLiveTimeline().getEvents().find((e) => e.getContent().body === text);
      return { type: ev.getWireType(), body: ev.getWireContent().body ?? null };
    }, "Thanks for the invite");
    assert.deepEqual(wire, { type: "m.room.encrypted", body: null }, "the message travelled encrypted");
    // A picture in an encrypted room is encrypted before it is uploaded: the servers hold
    // ciphertext, and Bob's browser decrypts it.
    await a.page.locator("#attach-input").setInputFiles({ name: "secret-seeds.png", mimeType: "image/png", buffer: png(90, 60) });
    await b.page.waitForFunction(() => document.querySelector(".msg img.thumb[alt='secret-seeds.png']")?.naturalWidth === 90);
    const stored = await b.page.evaluate(async () => {
      const client = window.hyphaeClient;
      const room = client.getRooms().find((r) => r.name === "Seeds");
      const ev = room.getLiveTimeline().getEvents().find((e) => e.getContent().body === "secret-seeds.png");
      const content = ev.getContent();
      const url = client.mxcUrlToHttp(content.file.url, undefined, undefined, undefined, false, true, true);
      const resp = await window.hyphae.fetch(url, { headers: { Authorization: `Bearer ${client.getAccessToken()}` } });
      const bytes = new Uint8Array(await resp.arrayBuffer());
      return { plainUrl: content.url ?? null, png: bytes[1] === 0x50 && bytes[2] === 0x4e && bytes[3] === 0x47, size: bytes.length };
    });
    assert.equal(stored.plainUrl, null, "no unencrypted copy is named");
    assert.ok(stored.size > 0 && !stored.png, `the stored file is ciphertext: ${JSON.stringify(stored)}`);
    // Back to the first room for the steps that follow.
    for (const p of [a.page, b.page]) {
      await p.locator(".room-item", { hasText: "Garden" }).click();
      await p.locator("#room-name", { hasText: "Garden" }).waitFor();
    }
  });

  await step("Alice and Bob verify each other's devices by comparing emoji", async () => {
    for (const p of [a.page, b.page]) {
      await p.locator(".room-item", { hasText: "Seeds" }).click();
      await p.locator("#room-encrypted").waitFor();
    }
    await a.page.locator("#members-button").click();
    await a.page.locator(`.member[data-user="${bobId}"] .verify`).click();
    // Every step of it crosses the peers as to-device messages.
    await b.page.locator("#verify-accept").click();
    const emojiOf = async (p) => {
      await p.locator("#verify-emoji .emoji").first().waitFor();
      return p.locator("#verify-emoji .emoji").allTextContents();
    };
    const [onAlice, onBob] = await Promise.all([emojiOf(a.page), emojiOf(b.page)]);
    assert.equal(onAlice.length, 7, `seven emoji: ${onAlice}`);
    assert.deepEqual(onAlice, onBob, "both screens show the same emoji");
    await screenshot(a.page, "verify.png");
    await a.page.locator("#verify-match").click();
    await b.page.locator("#verify-match").click();
    for (const p of [a.page, b.page]) {
      await p.locator("#verify-status", { hasText: "device is verified" }).waitFor();
      await p.locator("#verify-done").click();
    }
    await a.page.locator(`.member[data-user="${bobId}"] .verified`).waitFor();
    await a.page.locator("#members-button").click();
    for (const p of [a.page, b.page]) {
      await p.locator(".room-item", { hasText: "Garden" }).click();
      await p.locator("#room-name", { hasText: "Garden" }).waitFor();
    }
  });

  await step("after a reload both pages come back from IndexedDB and chat goes on", async () => {
    await Promise.all([a.page.reload(), b.page.reload()]);
    await Promise.all([ready(a.page), ready(b.page)]);
    for (const p of [a.page, b.page]) {
      await p.locator("#room-name", { hasText: "Garden" }).waitFor();
      await waitForMessage(p, "Hi Bob, the tomatoes are in");
      await waitForMessage(p, "Hi Alice! Basil next?");
    }
    await send(b.page, "Back after a reload");
    await waitForMessage(a.page, "Back after a reload");
    // The keys of the encrypted room came back with the page: its history still reads.
    for (const p of [a.page, b.page]) {
      await p.locator(".room-item", { hasText: "Seeds" }).click();
      await waitForMessage(p, "Thanks for the invite");
      await waitForMessage(p, "Encrypted on the way");
      await p.locator(".room-item", { hasText: "Garden" }).click();
      await p.locator("#room-name", { hasText: "Garden" }).waitFor();
    }
  });

  await step("Bob misses 50 messages and a rename while offline, and catches up without a reload", async () => {
    await b.context.setOffline(true);
    await b.page.locator("#offline").waitFor();
    const sent = [];
    for (let i = 1; i <= 50; i++) {
      sent.push(`while you were away ${i}`);
      await send(a.page, sent.at(-1));
    }
    await waitForMessage(a.page, sent.at(-1));
    await a.page.locator("#edit-room-button").click();
    await a.page.locator("#edit-room-name").fill("Orchard");
    await a.page.locator("#save-room").click();
    await a.page.locator("#room-name", { hasText: "Orchard" }).waitFor();
    await b.context.setOffline(false);
    await b.page.locator("#room-name", { hasText: "Orchard" }).waitFor({ timeout: 60_000 });
    await waitForMessage(b.page, sent.at(-1));
    await screenshot(b.page, "caught-up.png");
    const newestInView = await b.page.evaluate(() => {
      const timeline = document.getElementById("timeline").getBoundingClientRect();
      const newest = [...document.querySelectorAll("#timeline .msg")].at(-1).getBoundingClientRect();
      return newest.top >= timeline.top && newest.bottom <= timeline.bottom + 1;
    });
    assert.ok(newestInView, "Bob's view followed the newest message");
    await scrollBackTo(b.page, sent[0]);
    const seen = (await messages(b.page)).filter((m) => m.startsWith("while you were away"));
    assert.deepEqual(seen, sent, "all 50, in order");
  });

  await step("a second tab of Alice's profile does not start a second homeserver; take-over works", async () => {
    const second = await a.context.newPage();
    await second.goto(url);
    await second.locator("#elsewhere", { hasText: "open in another tab" }).waitFor();
    assert.equal(await second.evaluate(() => typeof window.hyphae), "undefined", "no homeserver in the second tab");
    assert.equal(await a.page.evaluate(() => typeof window.hyphae), "object");
    await second.locator("#take-over").click();
    await ready(second);
    await a.page.locator("#elsewhere", { hasText: "moved to another tab" }).waitFor();
    assert.equal(await a.page.evaluate(() => typeof window.hyphae), "undefined", "the first tab stopped");
    await send(second, "Sent from the new tab");
    await waitForMessage(b.page, "Sent from the new tab");
    await a.page.close();
    a.page = second;
  });

  await step("Alice exports her profile", async () => {
    // Her encrypted history is backed up under a recovery key, which Settings shows.
    await a.page.waitForFunction(() => document.body.dataset.history === "set up" || document.body.dataset.history === "backing up");
    // The crypto stack uploads room keys to the backup a few seconds after they appear: wait
    // until the Seeds room's two sessions (Alice's and Bob's) are in it.
    await waitUntilResolved(a.page, async () => (await window.hyphaeClient.getCrypto().getKeyBackupInfo())?.count >= 2, null, {
      timeout: 60_000,
    });
    // And until the profile's export holds them: the file is made from it.
    await profileHoldsBackedUpKeys(a.page);
    await a.page.locator("#settings-button").click();
    recoveryKey = await a.page.locator("#settings-recovery-key").inputValue();
    assert.match(recoveryKey, /^(\w{4} ){11}\w{4}$/);
    // Kept outside the browser profile, which goes away with Alice's browser.
    const dir = await mkdtemp(path.join(tmpdir(), "hyphae-backup-"));
    const [download] = await Promise.all([a.page.waitForEvent("download"), a.page.locator("#export").click()]);
    assert.match(download.suggestedFilename(), /^hyphae-alice-.*\.json$/);
    downloaded = path.join(dir, download.suggestedFilename());
    await download.saveAs(downloaded);
    // The file holds the key backup: the restore below reads it.
    const held = backedUpKeys(JSON.parse(await readFile(downloaded, "utf8")));
    assert.ok(held >= 2, `the file holds ${held} backed-up room keys`);
    await a.page.keyboard.press("Escape");
  });

  await step("importing it in a fresh profile gives the same server name, rooms and history", async () => {
    // One identity should run in one place at a time: Alice's old browser goes away first.
    await a.close();
    profiles.splice(profiles.indexOf(a), 1);
    c = await open("c");
    await c.page.goto(url);
    // A file that has lost its recovery key (say, made before there was one): the room keys it
    // carries read the history, and the app asks for the key to restore the backup.
    const saved = JSON.parse(await readFile(downloaded, "utf8"));
    assert.ok(JSON.parse(saved.room_keys).length >= 2, "the export carries the room keys");
    // The key backup is in the file too: the restore below reads it.
    const backedUp = backedUpKeys(saved);
    assert.ok(backedUp >= 2, `the export holds ${backedUp} backed-up room keys`);
    delete saved.session.recovery_key;
    const keyless = downloaded.replace(/\.json$/, "-keyless.json");
    await writeFile(keyless, JSON.stringify(saved));
    await c.page.locator("#restore-file").setInputFiles(keyless);
    await ready(c.page);
    assert.equal(await c.page.locator(".me .server").textContent(), aliceId);
    // Her picture is media in her profile: it came along in the file.
    await c.page.locator(".me .avatar.picture").waitFor();
    await c.page.locator(".room-item", { hasText: "Orchard" }).click();
    await waitForMessage(c.page, "Sent from the new tab");
    await waitForMessage(c.page, "while you were away 50");
    await send(c.page, "Restored in a new browser");
    await waitForMessage(b.page, "Restored in a new browser");
    // The restored profile signs in as a new device, without the old device's keys; its
    // recovery key (in the export) restores the room keys from the server's key backup, so the
    // encrypted room's history reads here too, and what is said now reaches Bob.
    await c.page.locator(".room-item", { hasText: "Seeds" }).click();
    await c.page.locator("#room-encrypted").waitFor();
    await c.page.waitForFunction(() => document.body.dataset.history);
    assert.equal(await c.page.evaluate(() => document.body.dataset.history), "needs the recovery key");
    await waitForMessage(c.page, "Thanks for the invite");
    await waitForMessage(c.page, "Encrypted on the way");
    // A wrong key is refused; the right one restores the backup and makes this device trusted.
    await c.page.locator("#settings-button").click();
    await c.page.locator("#settings-recovery-entry").fill("EsTC 3Ytv 9bvB MbbF pY7j vAGx Qm1Z NxMj 4DyM Fb2X v1uv 2sPo");
    await c.page.locator("#settings-recovery-entry").press("Enter");
    await c.page.locator(".toast", { hasText: "not the recovery key" }).waitFor();
    await c.page.locator("#settings-recovery-entry").fill(recoveryKey);
    await c.page.locator("#settings-recovery-entry").press("Enter");
    await c.page.waitForFunction(() => /^restored/.test(document.body.dataset.history ?? ""));
    const info = await c.page.evaluate(async () => JSON.stringify(await window.hyphaeClient.getCrypto().getKeyBackupInfo()));
    assert.match(await c.page.evaluate(() => document.body.dataset.history), /^restored \d+ of [1-9]\d* keys, backing up$/, info);
    await send(c.page, "Encrypted from the restored profile");
    await b.page.locator(".room-item", { hasText: "Seeds" }).click();
    await waitForMessage(b.page, "Encrypted from the restored profile");
    await b.page.locator(".room-item", { hasText: "Orchard" }).click();
  });

  await step("restoring a backup over the profile it came from shows nothing the backup lacks", async () => {
    // What was said after the backup was made goes with the store the restore replaces: no
    // cache of this page's may bring it back.
    await c.page.locator(".room-item", { hasText: "Orchard" }).click();
    await c.page.locator("#room-name", { hasText: "Orchard" }).waitFor();
    await c.page.locator("#settings-button").click();
    const [download] = await Promise.all([c.page.waitForEvent("download"), c.page.locator("#export").click()]);
    const file = path.join(path.dirname(downloaded), `again-${download.suggestedFilename()}`);
    await download.saveAs(file);
    await c.page.keyboard.press("Escape");
    // Bob is away, so nobody else holds what Alice says next: after the restore it is gone.
    await b.context.setOffline(true);
    await b.page.locator("#offline").waitFor();
    const later = "Said after the second backup";
    await send(c.page, later);
    await waitForMessage(c.page, later);
    // From the first screen on, the restored page must never draw it, not even for a moment.
    await c.context.addInitScript((later) => {
      window.drewLater = false;
      new MutationObserver(() => {
        for (const el of document.querySelectorAll("#timeline .msg .text")) if (el.textContent.includes(later)) window.drewLater = true;
      }).observe(document, { childList: true, subtree: true, characterData: true });
    }, later);
    await c.page.locator("#settings-button").click();
    c.page.once("dialog", (d) => d.accept());
    await Promise.all([c.page.waitForEvent("load"), c.page.locator("form input[type=file][accept='.json,application/json']").setInputFiles(file)]);
    await ready(c.page);
    await c.page.waitForFunction(() => performance.getEntriesByName("hyphae-up-to-date").length > 0);
    await c.page.locator(".room-item", { hasText: "Orchard" }).click();
    await waitForMessage(c.page, "Restored in a new browser");
    assert.ok(!(await messages(c.page)).includes(later), "a message the restored homeserver does not have is not shown");
    assert.equal(await c.page.evaluate(() => window.drewLater), false, "nor was it drawn at any moment since the restore");
    await b.context.setOffline(false);
    await b.page.locator("#offline").waitFor({ state: "hidden" });
  });

  await step("a homeserver that fails in the tab is announced above everything, with a reload", async () => {
    // What the wasm panic hook dispatches (src/web.rs); the module itself is gone by then.
    await b.page.evaluate(() =>
      dispatchEvent(new CustomEvent("hyphae-failed", { detail: { message: "panicked at src/x.rs:1:1: a bug" } })),
    );
    const banner = b.page.locator("#homeserver-stopped");
    await banner.waitFor();
    assert.match(await banner.textContent(), /The homeserver in this tab stopped/);
    await b.page.locator("#homeserver-stopped summary").click();
    assert.match(await banner.locator("pre").textContent(), /a bug/);
    await b.page.locator("#reload").click();
    await ready(b.page);
    assert.equal(await b.page.locator("#homeserver-stopped").count(), 0);
    await waitForMessage(b.page, "Restored in a new browser");
  });

  await step("a tab that takes its profile back chats on", async () => {
    const second = await b.context.newPage();
    await second.goto(url);
    await second.locator("#elsewhere", { hasText: "open in another tab" }).waitFor();
    await second.locator("#take-over").click();
    await ready(second);
    await b.page.locator("#elsewhere", { hasText: "moved to another tab" }).waitFor();
    // And back: the first tab starts its chat again, and what arrives now shows there.
    await b.page.locator("#take-over").click();
    await second.locator("#elsewhere", { hasText: "moved to another tab" }).waitFor();
    await b.page.locator("#room-name", { hasText: "Orchard" }).waitFor();
    await send(c.page, "Welcome back to the first tab");
    await waitForMessage(b.page, "Welcome back to the first tab");
    await second.close();
  });
});
