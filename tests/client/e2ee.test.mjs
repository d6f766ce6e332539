// End-to-end encryption across two nodes with matrix-js-sdk's Rust crypto: alice on nodeA and
// bob on nodeB exchange encrypted messages both ways (keys queried and claimed across peers,
// room keys sent as to-device messages over libp2p), neither node's store holds a message in
// plaintext, bob's second device reads what alice sends after it signs in, and what alice sends
// while bob's node is away reaches both his devices once it is back.

import assert from "node:assert/strict";
import { readdir, readFile } from "node:fs/promises";
import path from "node:path";
import { test } from "node:test";

import { login, register, sdk, startNode, startSyncing, stepper, uniqueName, waitFor } from "./harness.mjs";

const PASSWORD = "correct horse battery staple";
const T = 60_000;
const { CryptoEvent } = await import("matrix-js-sdk/lib/crypto-api/index.js");

// The Rust crypto module traces at debug level to the console; keep it quiet unless the SDK's
// log is asked for (HYPHAE_SDK_LOG, as in harness.mjs).
if (!process.env.HYPHAE_SDK_LOG) {
  for (const level of ["trace", "debug", "info"]) console[level] = () => {};
}

async function cryptoClient(client) {
  await client.initRustCrypto({ useIndexedDB: false });
  await startSyncing(client);
  return client;
}

/** Every byte of every file under `dir`. */
async function allBytes(dir) {
  const out = [];
  for (const entry of await readdir(dir, { withFileTypes: true, recursive: true })) {
    if (entry.isFile()) out.push(await readFile(path.join(entry.parentPath ?? entry.path, entry.name)));
  }
  return Buffer.concat(out);
}

/** Resolves once `client`'s crypto knows `n` devices of `user`, checking on every update. */
function deviceCount(client, user, n) {
  return new Promise((resolve, reject) => {
    const crypto = client.getCrypto();
    let done = false;
    const check = async () => {
      const devices = await crypto.getUserDeviceInfo([user], true);
      if (!done && devices.get(user)?.size === n) {
        done = true;
        clearTimeout(timer);
        client.off(CryptoEvent.DevicesUpdated, check);
        resolve();
      }
    };
    const timer = setTimeout(() => {
      done = true;
      client.off(CryptoEvent.DevicesUpdated, check);
      reject(new Error(`${client.getUserId()} never saw ${n} devices of ${user}`));
    }, T);
    client.on(CryptoEvent.DevicesUpdated, check);
    check().catch(reject);
  });
}

/** The clear text of the message with `body` in `roomId`, once `client` has decrypted it. */
function decrypted(client, roomId, body) {
  return waitFor(
    client,
    () =>
      client
        .getRoom(roomId)
        ?.getLiveTimeline()
        .getEvents()
        .find((e) => e.isEncrypted() && e.getContent()?.body === body),
    `the decrypted message "${body}"`,
    T,
  );
}

test("two nodes: encrypted messages with matrix-js-sdk's Rust crypto", { timeout: 600_000 }, async (t) => {
  const nodeA = await startNode({ name: "nodeA" });
  t.after(() => nodeA.stop());
  const [addr] = nodeA.listen;
  const dial = addr.includes("/p2p/") ? addr : `${addr}/p2p/${nodeA.peerId}`;
  let nodeB = await startNode({ name: "nodeB", bootstrap: [dial] });
  t.after(() => nodeB.stop());
  const step = stepper(t, [nodeA, nodeB]);
  const clients = [];
  t.after(() => clients.forEach((c) => c.stopClient()));

  const bobName = uniqueName("bob");
  let alice, bob, bob2, roomId;

  await step("alice and bob start clients with crypto", async () => {
    alice = await cryptoClient(await register(nodeA.url, uniqueName("alice"), PASSWORD));
    bob = await cryptoClient(await register(nodeB.url, bobName, PASSWORD));
    clients.push(alice, bob);
  });

  await step("alice makes an encrypted room and bob joins it across the peers", async () => {
    ({ room_id: roomId } = await alice.createRoom({
      preset: "private_chat",
      invite: [bob.getUserId()],
      initial_state: [
        { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } },
      ],
    }));
    await waitFor(bob, () => bob.getRoom(roomId)?.getMyMembership() === "invite", "the invite", T);
    await bob.joinRoom(roomId, { viaServers: [nodeA.serverName] });
    await waitFor(
      alice,
      () => alice.getRoom(roomId)?.getMember(bob.getUserId())?.membership === "join",
      "bob's join",
      T,
    );
    assert.ok(await alice.getCrypto().isEncryptionEnabledInRoom(roomId));
  });

  await step("encrypted messages go both ways", async () => {
    await alice.sendTextMessage(roomId, "the owl flies at midnight");
    await decrypted(bob, roomId, "the owl flies at midnight");
    await bob.sendTextMessage(roomId, "the river runs north");
    await decrypted(alice, roomId, "the river runs north");
  });

  await step("bob's second device reads alice's next message", async () => {
    bob2 = await cryptoClient(await login(nodeB.url, bobName, PASSWORD));
    clients.push(bob2);
    // Alice's client learns of the new device from her sync (device_lists.changed).
    await deviceCount(alice, bob.getUserId(), 2);
    await alice.sendTextMessage(roomId, "a second device listens");
    await decrypted(bob2, roomId, "a second device listens");
  });

  await step("room keys sent while bob's node is away reach him once it is back", async () => {
    // Bob's node stops (his clients keep running and retry); alice sends. Her node keeps the
    // message's room key for bob's devices in its outbox, and bob's node, started again on its
    // data and address, gets the key and the message when it is back.
    const { data, url } = nodeB;
    await nodeB.stop({ keep: true });
    await alice.sendTextMessage(roomId, "sent while you were away");
    nodeB = await startNode({ name: "nodeB", bootstrap: [dial], data, http: new URL(url).host });
    await decrypted(bob, roomId, "sent while you were away");
    await decrypted(bob2, roomId, "sent while you were away");
  });

  await step("neither node's store holds a message in plaintext", async () => {
    for (const node of [nodeA, nodeB]) {
      const bytes = await allBytes(node.data);
      for (const secret of [
        "the owl flies at midnight",
        "the river runs north",
        "a second device listens",
        "sent while you were away",
      ]) {
        assert.equal(bytes.indexOf(secret), -1, `${node.name}'s store holds "${secret}"`);
      }
      assert.notEqual(bytes.indexOf("m.room.encrypted"), -1, `${node.name} holds the encrypted events`);
    }
  });
});
