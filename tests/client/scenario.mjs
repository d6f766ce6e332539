// Two users share a private room through matrix-js-sdk: alice on nodeA, bob on nodeB (the same
// node in the single-node test). Everything either of them sees arrives through /sync.

import assert from "node:assert/strict";

import {
  expectErrorResponse,
  expectMatrixError,
  login,
  register,
  request,
  sdk,
  startSyncing,
  stepper,
  uniqueName,
  waitFor,
} from "./harness.mjs";

const PASSWORD = "correct horse battery staple";
const V3 = "/_matrix/client/v3";

/** Pages `/messages` backwards from `from` until the server says there is no more. */
async function pageBack(client, roomId, from) {
  const events = [];
  for (let pages = 0; ; pages++) {
    assert.ok(pages < 100, "pagination comes to an end");
    const res = await client.createMessagesRequest(roomId, from, 5, sdk.Direction.Backward);
    assert.ok(res.chunk.length <= 5, `a page holds at most 5 events, got ${res.chunk.length}`);
    events.push(...res.chunk);
    if (!res.end || res.chunk.length === 0) return events;
    assert.notEqual(res.end, from, "the pagination token moves on");
    from = res.end;
  }
}

export async function scenario(t, nodeA, nodeB) {
  const remote = nodeA !== nodeB;
  const T = remote ? 30_000 : 20_000; // cross-node delivery goes over libp2p
  const via = remote ? { viaServers: [nodeA.serverName] } : {};
  const step = stepper(t, [nodeA, nodeB]);
  const clients = [];

  const aliceName = uniqueName("alice");
  const bobName = uniqueName("bob");
  const aliceId = `@${aliceName}:${nodeA.serverName}`;
  const bobId = `@${bobName}:${nodeB.serverName}`;
  let alice, bob, roomId;
  const ids = {}; // event ids by name
  const sent = []; // every event id alice or bob sent, in order
  const alicePages = []; // the 30 messages for pagination, oldest first

  const room = (client) => client.getRoom(roomId);
  const event = (client, id) => room(client)?.findEventById(id);
  const send = async (client, type, content) => {
    const { event_id } = await client.sendEvent(roomId, type, content);
    sent.push(event_id);
    return event_id;
  };
  const say = (client, body) => send(client, "m.room.message", { msgtype: "m.text", body });

  try {
    await step("alice and bob register and start syncing", async () => {
      for (const node of [nodeA, nodeB]) assert.match(node.serverName, /^[0-9a-f]{64}$/);
      alice = await register(nodeA.url, aliceName, PASSWORD);
      bob = await register(nodeB.url, bobName, PASSWORD);
      clients.push(alice, bob);
      for (const [client, userId] of [[alice, aliceId], [bob, bobId]]) {
        const me = await client.whoami();
        assert.equal(me.user_id, userId);
        assert.equal(me.device_id, client.getDeviceId());
      }
      await Promise.all([startSyncing(alice), startSyncing(bob)]);
    });

    await step("alice creates a private room and bob joins when invited", async () => {
      ({ room_id: roomId } = await alice.createRoom({
        preset: sdk.Preset.PrivateChat,
        name: "Planning",
        topic: "Q3",
        invite: [bobId],
      }));
      assert.match(roomId, /^![A-Za-z0-9_-]{43}$/, "a room id is ! and 43 base64url characters");
      await waitFor(alice, () => room(alice)?.getMyMembership() === "join" && room(alice).name === "Planning", "her new room", T);
      await waitFor(bob, () => room(bob)?.getMyMembership() === "invite", "the invite", T);
      assert.equal(room(bob).getMember(bobId)?.events.member?.getSender(), aliceId, "alice sent the invite");
      await bob.joinRoom(roomId, via);
      await waitFor(bob, () => room(bob)?.getMyMembership() === "join" && room(bob).name === "Planning", "the joined room", T);
      await waitFor(alice, () => room(alice)?.getMember(bobId)?.membership === "join", "bob's join", T);
    });

    await step("messages arrive through /sync, in order", async () => {
      ids.a1 = await say(alice, "hello bob");
      ids.a2 = await say(alice, "agenda first?");
      await waitFor(bob, () => event(bob, ids.a1) && event(bob, ids.a2), "alice's first messages", T);
      ids.b1 = await say(bob, "hi alice, yes");
      await waitFor(alice, () => event(alice, ids.b1), "bob's reply", T);
      ids.a3 = await say(alice, "great");
      await waitFor(bob, () => event(bob, ids.a3), "alice's third message", T);

      assert.equal(event(bob, ids.a1).getContent().body, "hello bob");
      assert.equal(event(bob, ids.a1).getSender(), aliceId);
      assert.equal(event(alice, ids.b1).getContent().body, "hi alice, yes");
      assert.equal(event(alice, ids.b1).getSender(), bobId);
      const order = [ids.a1, ids.a2, ids.b1, ids.a3];
      for (const client of [alice, bob]) {
        const timeline = room(client).getLiveTimeline().getEvents().map((e) => e.getId());
        const at = order.map((id) => timeline.indexOf(id));
        assert.ok(at.every((i, k) => i >= 0 && (k === 0 || i > at[k - 1])), `${client.getUserId()} sees them in order: ${at}`);
      }
    });

    await step("a new name and topic reach bob", async () => {
      await alice.setRoomName(roomId, "Planning 2");
      await alice.setRoomTopic(roomId, "Q4");
      const topic = (client) => room(client)?.currentState.getStateEvents("m.room.topic", "")?.getContent().topic;
      await waitFor(bob, () => room(bob)?.name === "Planning 2" && topic(bob) === "Q4", "the new name and topic", T);
      await waitFor(alice, () => room(alice)?.name === "Planning 2" && topic(alice) === "Q4", "the new name and topic", T);
    });

    await step("an edit, a reaction and a redaction", async () => {
      ids.edit = await send(alice, "m.room.message", {
        msgtype: "m.text",
        body: "* hello bob, again",
        "m.new_content": { msgtype: "m.text", body: "hello bob, again" },
        "m.relates_to": { rel_type: "m.replace", event_id: ids.a1 },
      });
      ids.reaction = await send(bob, "m.reaction", {
        "m.relates_to": { rel_type: "m.annotation", event_id: ids.a2, key: "👍" },
      });
      ids.redaction = (await alice.redactEvent(roomId, ids.a3)).event_id;
      sent.push(ids.redaction);

      const edit = await waitFor(bob, () => event(bob, ids.edit), "alice's edit", T);
      assert.equal(edit.getContent()["m.new_content"]?.body, "hello bob, again");
      assert.equal(edit.getRelation()?.rel_type, "m.replace");
      assert.equal(edit.getRelation()?.event_id, ids.a1);

      const reaction = await waitFor(alice, () => event(alice, ids.reaction), "bob's reaction", T);
      assert.equal(reaction.getSender(), bobId);
      assert.equal(reaction.getRelation()?.rel_type, "m.annotation");
      assert.equal(reaction.getRelation()?.event_id, ids.a2);
      assert.equal(reaction.getRelation()?.key, "👍");

      const redaction = await waitFor(bob, () => event(bob, ids.redaction), "alice's redaction", T);
      assert.equal(redaction.getType(), "m.room.redaction");
      // The SDK (37.x) applies a redaction found under the event's top-level `redacts`; since
      // room version 11 the key is in `content`, and servers serve it in both places.
      assert.equal(redaction.event.redacts, ids.a3, "the redaction names its target at the top level");
      assert.equal(redaction.getContent().redacts, ids.a3, "the redaction names its target in its content");
      const redacted = event(bob, ids.a3);
      assert.ok(redacted?.isRedacted(), "bob's copy of the message is redacted");
      assert.deepEqual(redacted.getContent(), {}, "a redacted message has no content left");
    });

    await step("typing notifications and read receipts", async () => {
      const bobTyping = () => room(alice)?.getMember(bobId)?.typing;
      await bob.sendTyping(roomId, true, 10_000);
      await waitFor(alice, () => bobTyping() === true, "bob to be typing", T);
      await bob.sendTyping(roomId, false, 0);
      await waitFor(alice, () => bobTyping() === false, "bob to stop typing", T);

      ids.b2 = await say(bob, "did you read this?");
      const question = await waitFor(alice, () => event(alice, ids.b2), "bob's question", T);
      await alice.sendReadReceipt(question);
      // The SDK also makes up receipts from who sent what; `true` asks for the server's.
      const receipt = () => room(bob)?.getReadReceiptForUserId(aliceId, true);
      await waitFor(bob, () => receipt()?.eventId === ids.b2, "alice's read receipt", T);
      assert.ok(receipt().data.ts > 0, "the receipt carries a timestamp");
    });

    await step("a new device pages back through the whole history, 5 events at a time", async () => {
      for (let i = 1; i <= 30; i++) alicePages.push(await say(alice, `page ${i}`));
      await waitFor(bob, () => event(bob, alicePages.at(-1)), "alice's last page", T);
      const fresh = await login(nodeB.url, bobName, PASSWORD);
      clients.push(fresh);
      assert.notEqual(fresh.getDeviceId(), bob.getDeviceId(), "a login makes a new device");

      const check = (events, how) => {
        const seen = events.map((e) => e.event_id);
        assert.equal(new Set(seen).size, seen.length, `${how}: no event comes twice`);
        assert.equal(events.at(-1)?.type, "m.room.create", `${how}: the history ends at m.room.create`);
        assert.deepEqual(sent.filter((id) => !seen.includes(id)), [], `${how}: every sent event is there`);
        const at = alicePages.map((id) => seen.indexOf(id));
        assert.ok(at.every((i, k) => k === 0 || i < at[k - 1]), `${how}: newest first`);
      };

      // From the prev_batch of an initial sync, as clients do...
      const sync = await fresh.http.authedRequest(sdk.Method.Get, "/sync", {
        filter: JSON.stringify({ room: { timeline: { limit: 5 } } }),
        timeout: "0",
      });
      const timeline = sync.rooms?.join?.[roomId]?.timeline;
      assert.ok(timeline?.events?.length > 0, "the initial sync has the room's latest events");
      assert.ok(timeline.events.length <= 5, "the initial sync keeps to the filter's limit");
      assert.ok(timeline.prev_batch, "the initial sync has a prev_batch");
      const fromSync = [...timeline.events].reverse().concat(await pageBack(fresh, roomId, timeline.prev_batch));
      check(fromSync, "from the sync's prev_batch");
      // ...and from the end of the room, with no token at all.
      check(await pageBack(fresh, roomId, null), "from the end of the room");
    });

    await step("bob leaves and alice sees it", async () => {
      await bob.leave(roomId);
      await waitFor(alice, () => room(alice)?.getMember(bobId)?.membership === "leave", "bob's leave", T);
      await waitFor(bob, () => room(bob)?.getMyMembership() === "leave", "the room to be left", T);
    });

    await step("refusals carry the right errcode and status", async () => {
      const anonymous = sdk.createClient({ baseUrl: nodeA.url });
      await expectMatrixError(
        anonymous.loginRequest({
          type: "m.login.password",
          identifier: { type: "m.id.user", user: aliceName },
          password: "not the password",
        }),
        403,
        "M_FORBIDDEN",
        "login with a wrong password",
      );
      const stranger = sdk.createClient({ baseUrl: nodeA.url, accessToken: "nope" });
      await expectMatrixError(stranger.whoami(), 401, "M_UNKNOWN_TOKEN", "an unknown access token");
      await expectMatrixError(register(nodeA.url, aliceName, PASSWORD), 400, "M_USER_IN_USE", "registering a taken name");

      const carol = await register(nodeB.url, uniqueName("carol"), PASSWORD);
      clients.push(carol);
      await expectMatrixError(carol.joinRoom(roomId, via), 403, "M_FORBIDDEN", "joining a private room uninvited");
      await expectMatrixError(bob.sendTextMessage(roomId, "still there?"), 403, "M_FORBIDDEN", "sending after leaving");

      const token = alice.getAccessToken();
      for (const auth of [{}, { token }]) {
        const res = await request(nodeA.url, "GET", `${V3}/nonexistent`, auth);
        expectErrorResponse(res, 404, "M_UNRECOGNIZED", `an unknown endpoint (${auth.token ? "with" : "without"} a token)`);
      }
      const login = (body) => request(nodeA.url, "POST", `${V3}/login`, { body });
      expectErrorResponse(await login("not json"), 400, "M_NOT_JSON", "a login body that is not JSON");
      expectErrorResponse(await login({ type: 5 }), 400, "M_BAD_JSON", "a login body of the wrong shape");
      const whoami = await request(nodeA.url, "GET", `${V3}/account/whoami`);
      expectErrorResponse(whoami, 401, "M_MISSING_TOKEN", "a request without a token");
    });
  } finally {
    for (const client of clients) client.stopClient();
  }
}
