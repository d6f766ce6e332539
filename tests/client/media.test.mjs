// Media with matrix-js-sdk over HTTP: alice on nodeA uploads a file and a picture with the
// SDK's own uploadContent, names them in a room, and bob on nodeB downloads both through his
// node (which fetches them from hers over libp2p) and gets a thumbnail.

import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";

import { png } from "../png.mjs";
import { register, startNode, startSyncing, stepper, uniqueName, waitFor } from "./harness.mjs";

const PASSWORD = "correct horse battery";

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
  const picture = png(256, 192);

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
