// Media with matrix-js-sdk over HTTP: alice on nodeA uploads a file and a picture with the
// SDK's own uploadContent, names them in a room, and bob on nodeB downloads both through his
// node (which fetches them from hers over libp2p) and gets a thumbnail.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { deflateSync } from "node:zlib";

import { register, startNode, startSyncing, stepper, uniqueName, waitFor } from "./harness.mjs";

const PASSWORD = "correct horse battery";

/** A 256×192 RGB PNG, made here so the test carries no binary files. */
function png() {
  const [w, h] = [256, 192];
  const table = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (buf) => {
    let c = 0xffffffff;
    for (const b of buf) c = table[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(data.length);
    const body = Buffer.concat([Buffer.from(type), data]);
    const sum = Buffer.alloc(4);
    sum.writeUInt32BE(crc(body));
    return Buffer.concat([len, body, sum]);
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(w, 0);
  ihdr.writeUInt32BE(h, 4);
  ihdr[8] = 8;
  ihdr[9] = 2;
  const rows = [];
  for (let y = 0; y < h; y++) {
    const row = Buffer.alloc(1 + w * 3);
    for (let x = 0; x < w; x++) row.set([x, y, 128], 1 + x * 3);
    rows.push(row);
  }
  const sig = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  return Buffer.concat([sig, chunk("IHDR", ihdr), chunk("IDAT", deflateSync(Buffer.concat(rows))), chunk("IEND", Buffer.alloc(0))]);
}

async function fetchMedia(client, url) {
  const res = await fetch(url, { headers: { Authorization: `Bearer ${client.getAccessToken()}` } });
  return { status: res.status, type: res.headers.get("content-type"), bytes: Buffer.from(await res.arrayBuffer()) };
}

test("two nodes: media with matrix-js-sdk", { timeout: 300_000 }, async (t) => {
  const nodeA = await startNode({ name: "nodeA" });
  t.after(() => nodeA.stop());
  const [addr] = nodeA.listen;
  const dial = addr.includes("/p2p/") ? addr : `${addr}/p2p/${nodeA.peerId}`;
  const nodeB = await startNode({ name: "nodeB", bootstrap: [dial] });
  t.after(() => nodeB.stop());
  const step = stepper(t, [nodeA, nodeB]);
  let alice, bob, roomId, fileUri, pictureUri;
  const file = randomBytes(8 * 1024 * 1024 + 99);
  const picture = png();

  await step("alice and bob share a room across the nodes", async () => {
    alice = await register(nodeA.url, uniqueName("alice"), PASSWORD);
    bob = await register(nodeB.url, uniqueName("bob"), PASSWORD);
    t.after(() => [alice, bob].forEach((c) => c.stopClient()));
    await Promise.all([startSyncing(alice), startSyncing(bob)]);
    ({ room_id: roomId } = await alice.createRoom({ preset: "private_chat", invite: [bob.getUserId()] }));
    await waitFor(bob, () => bob.getRoom(roomId)?.getMyMembership() === "invite", "the invite", 60_000);
    await bob.joinRoom(roomId, { viaServers: [nodeA.serverName] });
  });

  await step("alice uploads with the SDK and names the media in the room", async () => {
    const config = await alice.getMediaConfig(true);
    assert.ok(config["m.upload.size"] >= 100 * 1024 * 1024, JSON.stringify(config));
    ({ content_uri: fileUri } = await alice.uploadContent(new Blob([file]), { name: "data.bin", type: "application/octet-stream" }));
    ({ content_uri: pictureUri } = await alice.uploadContent(new Blob([picture]), { name: "pic.png", type: "image/png" }));
    await alice.sendMessage(roomId, { msgtype: "m.file", body: "data.bin", url: fileUri, info: { size: file.length } });
    await alice.sendMessage(roomId, { msgtype: "m.image", body: "pic.png", url: pictureUri, info: { w: 256, h: 192 } });
    await waitFor(bob, () => bob.getRoom(roomId)?.getLiveTimeline().getEvents().some((e) => e.getContent().url === pictureUri), "the picture message", 60_000);
  });

  await step("bob downloads both byte-identical through his node, and a thumbnail", async () => {
    const got = await fetchMedia(bob, bob.mxcUrlToHttp(fileUri, undefined, undefined, undefined, false, true, true));
    assert.equal(got.status, 200);
    assert.ok(got.bytes.equals(file), "the file came back different");
    const pic = await fetchMedia(bob, bob.mxcUrlToHttp(pictureUri, undefined, undefined, undefined, false, true, true));
    assert.equal(pic.type, "image/png");
    assert.ok(pic.bytes.equals(picture), "the picture came back different");
    const thumb = await fetchMedia(bob, bob.mxcUrlToHttp(pictureUri, 64, 64, "crop", false, true, true));
    assert.equal(thumb.status, 200);
    assert.match(thumb.type, /^image\//);
    assert.ok(thumb.bytes.length > 0 && thumb.bytes.length < picture.length, `thumbnail of ${thumb.bytes.length} bytes`);
    // Without the token: refused.
    const anonymous = await fetch(bob.mxcUrlToHttp(fileUri, undefined, undefined, undefined, false, true, true));
    assert.equal(anonymous.status, 401);
  });
});
