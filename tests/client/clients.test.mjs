// What mainstream clients call beyond chatting: threads and edits (bundled), push rules that
// change the counts, tags, search, the room directory, presence, and the account itself
// (password change, signing devices out, deactivation) — through matrix-js-sdk and, for the
// exact shapes and the refusals, over plain HTTP.

import assert from "node:assert/strict";
import { test } from "node:test";

import {
  expectErrorResponse,
  expectMatrixError,
  login,
  register,
  request,
  startNode,
  stepper,
  uniqueName,
} from "./harness.mjs";

const PASSWORD = "correct horse battery staple";
const V3 = "/_matrix/client/v3";
const V1 = "/_matrix/client/v1";
const enc = encodeURIComponent;

test("threads, edits, push rules, tags, search, directory and accounts", { timeout: 300_000 }, async (t) => {
  const node = await startNode({ name: "node", args: ["--registration", "open"] });
  t.after(() => node.stop());
  const step = stepper(t, [node]);
  const aliceName = uniqueName("alice");
  const bobName = uniqueName("bob");
  let alice, bob, roomId, rootId, replyId, originalId, editId;

  const call = (client, method, path, body) =>
    request(node.url, method, path, { token: client.getAccessToken(), body });
  const sync = async (client, since) => {
    const q = since ? `?since=${enc(since)}&timeout=0` : "?timeout=0";
    const res = await call(client, "GET", `${V3}/sync${q}`);
    assert.equal(res.status, 200, res.text);
    return res.json;
  };
  const counts = async (client) => {
    const body = await sync(client);
    return body.rooms.join[roomId]?.unread_notifications;
  };

  await step("registration with m.login.dummy and no session, as matrix-rust-sdk does it", async () => {
    const res = await request(node.url, "POST", `${V3}/register`, {
      body: { username: aliceName, password: PASSWORD, auth: { type: "m.login.dummy" } },
    });
    assert.equal(res.status, 200, res.text);
    assert.ok(res.json.access_token);
    alice = await login(node.url, aliceName, PASSWORD);
    bob = await register(node.url, bobName, PASSWORD);
    await bob.setDisplayName("Bobby");
  });

  await step("/versions and /.well-known say what is served", async () => {
    const versions = await request(node.url, "GET", "/_matrix/client/versions");
    assert.equal(versions.json.unstable_features["org.matrix.simplified_msc3575"], true);
    const wk = await request(node.url, "GET", "/.well-known/matrix/client");
    assert.equal(wk.status, 200, wk.text);
    assert.equal(wk.json["m.homeserver"].base_url, node.url.replace(/\/$/, ""));
  });

  await step("a room with a thread and an edit", async () => {
    ({ room_id: roomId } = await alice.createRoom({ name: "Threads", invite: [bob.getUserId()] }));
    await bob.joinRoom(roomId);
    ({ event_id: rootId } = await alice.sendTextMessage(roomId, "root of a thread"));
    ({ event_id: replyId } = await bob.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "a reply in the thread",
      "m.relates_to": { rel_type: "m.thread", event_id: rootId, is_falling_back: true, "m.in_reply_to": { event_id: rootId } },
    }));
    await bob.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "another reply",
      "m.relates_to": { rel_type: "m.thread", event_id: rootId },
    });
    ({ event_id: originalId } = await alice.sendTextMessage(roomId, "tpyo"));
    ({ event_id: editId } = await alice.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "* typo",
      "m.new_content": { msgtype: "m.text", body: "typo" },
      "m.relates_to": { rel_type: "m.replace", event_id: originalId },
    }));
  });

  await step("the root carries its thread summary, the message its edit", async () => {
    const root = await call(bob, "GET", `${V3}/rooms/${enc(roomId)}/event/${enc(rootId)}`);
    const thread = root.json.unsigned["m.relations"]["m.thread"];
    assert.equal(thread.count, 2);
    assert.equal(thread.current_user_participated, true);
    assert.equal(thread.latest_event.content.body, "another reply");
    const aliceView = await call(alice, "GET", `${V3}/rooms/${enc(roomId)}/event/${enc(rootId)}`);
    assert.equal(aliceView.json.unsigned["m.relations"]["m.thread"].current_user_participated, true, "alice sent the root");
    const edited = await call(bob, "GET", `${V3}/rooms/${enc(roomId)}/event/${enc(originalId)}`);
    assert.equal(edited.json.unsigned["m.relations"]["m.replace"].event_id, editId);
    // A bob edit of alice's message is not an edit.
    await bob.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "* hijacked",
      "m.new_content": { msgtype: "m.text", body: "hijacked" },
      "m.relates_to": { rel_type: "m.replace", event_id: originalId },
    });
    const still = await call(alice, "GET", `${V3}/rooms/${enc(roomId)}/event/${enc(originalId)}`);
    assert.equal(still.json.unsigned["m.relations"]["m.replace"].event_id, editId);
  });

  await step("/threads lists the thread, /relations pages through its replies", async () => {
    const all = await call(alice, "GET", `${V1}/rooms/${enc(roomId)}/threads`);
    assert.equal(all.status, 200, all.text);
    assert.deepEqual(all.json.chunk.map((e) => e.event_id), [rootId]);
    const mine = await call(bob, "GET", `${V1}/rooms/${enc(roomId)}/threads?include=participated`);
    assert.deepEqual(mine.json.chunk.map((e) => e.event_id), [rootId]);
    const page1 = await call(alice, "GET", `${V1}/rooms/${enc(roomId)}/relations/${enc(rootId)}/m.thread?limit=1`);
    assert.equal(page1.json.chunk.length, 1);
    assert.equal(page1.json.chunk[0].content.body, "another reply", "newest first");
    assert.ok(page1.json.next_batch, "a next_batch when more are left");
    const page2 = await call(
      alice,
      "GET",
      `${V1}/rooms/${enc(roomId)}/relations/${enc(rootId)}/m.thread?limit=1&from=${enc(page1.json.next_batch)}`,
    );
    assert.deepEqual(page2.json.chunk.map((e) => e.event_id), [replyId]);
    assert.equal(page2.json.next_batch, undefined);
    // With matrix-js-sdk too.
    const viaSdk = await alice.relations(roomId, rootId, "m.thread", null, { dir: "f" });
    assert.deepEqual(viaSdk.events.map((e) => e.getId())[0], replyId);
  });

  await step("a receipt in a thread leaves the main receipt alone", async () => {
    const { next_batch } = await sync(alice);
    await call(alice, "POST", `${V3}/rooms/${enc(roomId)}/receipt/m.read/${enc(editId)}`, {});
    await call(alice, "POST", `${V3}/rooms/${enc(roomId)}/receipt/m.read/${enc(replyId)}`, { thread_id: rootId });
    const body = await sync(alice, next_batch);
    const receipts = body.rooms.join[roomId].ephemeral.events.find((e) => e.type === "m.receipt").content;
    assert.ok(receipts[editId]["m.read"][alice.getUserId()], "the main receipt");
    assert.equal(receipts[replyId]["m.read"][alice.getUserId()].thread_id, rootId, "the thread receipt");
  });

  await step("push rules: a mention highlights, a muted room stops counting", async () => {
    await call(alice, "POST", `${V3}/rooms/${enc(roomId)}/receipt/m.read/${enc(editId)}`, {});
    await bob.sendTextMessage(roomId, "hello there");
    await bob.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "hey alice, look",
      "m.mentions": { user_ids: [alice.getUserId()] },
    });
    let c = await counts(alice);
    assert.ok(c.notification_count >= 2, `notifications counted: ${JSON.stringify(c)}`);
    assert.equal(c.highlight_count, 1, "the mention highlights");

    // Counts follow the rules as they are now (they are worked out when the client syncs):
    // a mute takes the room's messages out of the count, all but the mention (mentions are
    // override rules, above room rules).
    const unmuted = c.notification_count;
    await alice.addPushRule("global", "room", roomId, { actions: [] });
    const rule = await call(alice, "GET", `${V3}/pushrules/global/room/${enc(roomId)}`);
    assert.equal(rule.status, 200, rule.text);
    assert.deepEqual(rule.json.actions, []);
    const muted = await counts(alice);
    assert.equal(muted.notification_count, 1, "muted: only the mention counts");
    assert.equal(muted.highlight_count, 1);
    await bob.sendTextMessage(roomId, "you won't hear this");
    c = await counts(alice);
    assert.equal(c.notification_count, 1, "a muted room's message does not count");

    await alice.setPushRuleEnabled("global", "room", roomId, false);
    await bob.sendTextMessage(roomId, "now you do");
    c = await counts(alice);
    assert.equal(c.notification_count, unmuted + 2, "the mute disabled: every message counts again");
    await alice.deletePushRule("global", "room", roomId);
    const gone = await call(alice, "GET", `${V3}/pushrules/global/room/${enc(roomId)}`);
    expectErrorResponse(gone, 404, "M_NOT_FOUND", "a deleted rule");
    const rules = await sync(alice);
    const pushRules = rules.account_data.events.filter((e) => e.type === "m.push_rules");
    assert.equal(pushRules.length, 1, "the rules arrive once in account data");
    const notified = await call(alice, "GET", `${V3}/notifications?only=highlight`);
    assert.equal(notified.status, 200, notified.text);
    assert.equal(notified.json.notifications.length, 1);
    assert.equal(notified.json.notifications[0].event.content.body, "hey alice, look");
  });

  await step("push rule refusals change nothing", async () => {
    const before = await call(alice, "GET", `${V3}/pushrules/`);
    expectErrorResponse(
      await call(alice, "PUT", `${V3}/pushrules/global/override/.m.rule.mine`, { actions: [], conditions: [] }),
      400,
      "M_INVALID_PARAM",
      "a rule id starting with a dot",
    );
    expectErrorResponse(
      await call(alice, "PUT", `${V3}/pushrules/global/sideways/rule`, { actions: [] }),
      400,
      "M_INVALID_PARAM",
      "an unknown kind",
    );
    expectErrorResponse(
      await call(alice, "PUT", `${V3}/pushrules/global/room/not-a-room`, { actions: [] }),
      400,
      "M_INVALID_PARAM",
      "a room rule whose id is not a room",
    );
    expectErrorResponse(
      await call(alice, "PUT", `${V3}/pushrules/global/content/words`, { actions: "loud" }),
      400,
      "M_BAD_JSON",
      "actions that are not a list",
    );
    expectErrorResponse(
      await call(alice, "DELETE", `${V3}/pushrules/global/override/.m.rule.master`),
      400,
      "M_INVALID_PARAM",
      "deleting a server-default rule",
    );
    expectErrorResponse(
      await call(alice, "PUT", `${V3}/user/${enc(alice.getUserId())}/account_data/m.push_rules`, {}),
      400,
      "M_BAD_JSON",
      "push rules through account data",
    );
    const after = await call(alice, "GET", `${V3}/pushrules/`);
    assert.deepEqual(after.json, before.json);
  }, { independent: true });

  await step("tags", async () => {
    await alice.setRoomTag(roomId, "m.favourite", { order: 0.5 });
    await alice.setRoomTag(roomId, "u.work", {});
    let tags = await alice.getRoomTags(roomId);
    assert.deepEqual(tags.tags, { "m.favourite": { order: 0.5 }, "u.work": {} });
    await alice.deleteRoomTag(roomId, "u.work");
    tags = await alice.getRoomTags(roomId);
    assert.deepEqual(tags.tags, { "m.favourite": { order: 0.5 } });
    const body = await sync(alice);
    const tagEvent = body.rooms.join[roomId].account_data.events.find((e) => e.type === "m.tag");
    assert.deepEqual(tagEvent.content.tags, { "m.favourite": { order: 0.5 } });
    expectErrorResponse(
      await call(alice, "PUT", `${V3}/user/${enc(alice.getUserId())}/rooms/${enc(roomId)}/tags/x`, { order: 7 }),
      400,
      "M_BAD_JSON",
      "an order out of range",
    );
    expectErrorResponse(
      await call(bob, "GET", `${V3}/user/${enc(alice.getUserId())}/rooms/${enc(roomId)}/tags`),
      403,
      "M_FORBIDDEN",
      "someone else's tags",
    );
    tags = await alice.getRoomTags(roomId);
    assert.deepEqual(tags.tags, { "m.favourite": { order: 0.5 } });
  }, { independent: true });

  await step("search finds words in the user's rooms, and nothing of others'", async () => {
    const { room_id: secret } = await bob.createRoom({ name: "Bob alone" });
    await bob.sendTextMessage(secret, "a hidden pineapple");
    await bob.sendTextMessage(roomId, "pineapples are great");
    const found = await alice.searchRoomEvents({ term: "pineapple" });
    assert.deepEqual(found.results.map((r) => r.context.getEvent().getContent().body), ["pineapples are great"]);
    const res = await call(alice, "POST", `${V3}/search`, {
      search_categories: { room_events: { search_term: "thread root", filter: { limit: 5 }, event_context: { before_limit: 1, after_limit: 1 } } },
    });
    assert.equal(res.status, 200, res.text);
    const results = res.json.search_categories.room_events.results;
    assert.equal(results.length, 1);
    assert.equal(results[0].result.event_id, rootId);
    assert.ok(Array.isArray(results[0].context.events_after));
    expectErrorResponse(
      await call(alice, "POST", `${V3}/search`, { search_categories: { room_events: { search_term: "x".repeat(10_000) } } }),
      400,
      "M_INVALID_PARAM",
      "a huge search term",
    );
    expectErrorResponse(
      await call(alice, "POST", `${V3}/search`, { search_categories: { room_events: { search_term: "  !! " } } }),
      400,
      "M_BAD_JSON",
      "a term without words",
    );
    expectErrorResponse(await call(alice, "POST", `${V3}/search`, {}), 400, "M_BAD_JSON", "no criteria");
  }, { independent: true });

  await step("what relates to an event, search and the directory show only what the reader may see", async () => {
    // A thread reply by someone alice ignores does not show in the root's summary.
    const { event_id: root } = await alice.sendTextMessage(roomId, "another thread");
    const { event_id: seen } = await bob.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "visible reply",
      "m.relates_to": { rel_type: "m.thread", event_id: root },
    });
    const mallory = await register(node.url, uniqueName("mallory"), PASSWORD);
    await alice.invite(roomId, mallory.getUserId());
    await mallory.joinRoom(roomId);
    await mallory.sendEvent(roomId, "m.room.message", {
      msgtype: "m.text",
      body: "ignored reply",
      "m.relates_to": { rel_type: "m.thread", event_id: root },
    });
    await call(alice, "PUT", `${V3}/user/${enc(alice.getUserId())}/account_data/m.ignored_user_list`, {
      ignored_users: { [mallory.getUserId()]: {} },
    });
    const viewed = await call(alice, "GET", `${V3}/rooms/${enc(roomId)}/event/${enc(root)}`);
    const thread = viewed.json.unsigned["m.relations"]["m.thread"];
    assert.equal(thread.latest_event.event_id, seen, "the ignored user's reply is not the latest alice sees");
    assert.equal(thread.count, 1);
    await call(alice, "PUT", `${V3}/user/${enc(alice.getUserId())}/account_data/m.ignored_user_list`, { ignored_users: {} });

    // A deleted message is not found by its words.
    const { event_id: secret } = await bob.sendTextMessage(roomId, "the password is swordfish");
    await bob.redactEvent(roomId, secret);
    const found = await call(alice, "POST", `${V3}/search`, {
      search_categories: { room_events: { search_term: "swordfish" } },
    });
    assert.deepEqual(found.json.search_categories.room_events.results, [], "redacted text is not searchable");

    // A published room that later became invite-only leaves the directory.
    const { room_id: was } = await alice.createRoom({ name: "Was open", visibility: "public", preset: "public_chat" });
    await alice.sendStateEvent(was, "m.room.join_rules", { join_rule: "invite" }, "");
    const listed = await request(node.url, "GET", `${V3}/publicRooms`);
    assert.ok(!listed.json.chunk.some((r) => r.room_id === was), "an invite-only room is not listed");
  }, { independent: true });

  await step("the public room directory", async () => {
    const { room_id: lobby } = await alice.createRoom({ name: "Lobby", visibility: "public", preset: "public_chat" });
    const listed = await request(node.url, "GET", `${V3}/publicRooms`);
    assert.equal(listed.status, 200, listed.text);
    assert.ok(listed.json.chunk.some((r) => r.room_id === lobby && r.name === "Lobby"));
    assert.ok(!listed.json.chunk.some((r) => r.room_id === roomId), "unpublished rooms stay out");
    const vis = await request(node.url, "GET", `${V3}/directory/list/room/${enc(lobby)}`);
    assert.equal(vis.json.visibility, "public");
    expectErrorResponse(
      await call(bob, "PUT", `${V3}/directory/list/room/${enc(lobby)}`, { visibility: "private" }),
      403,
      "M_FORBIDDEN",
      "a non-member unpublishing",
    );
    await call(alice, "PUT", `${V3}/directory/list/room/${enc(lobby)}`, { visibility: "private" });
    const after = await call(alice, "POST", `${V3}/publicRooms`, { filter: { generic_search_term: "lob" } });
    assert.ok(!after.json.chunk.some((r) => r.room_id === lobby));
  }, { independent: true });

  await step("presence reflects what the user set and did", async () => {
    await call(bob, "PUT", `${V3}/presence/${enc(bob.getUserId())}/status`, { presence: "unavailable", status_msg: "lunch" });
    const seen = await call(alice, "GET", `${V3}/presence/${enc(bob.getUserId())}/status`);
    assert.equal(seen.json.presence, "unavailable");
    assert.equal(seen.json.status_msg, "lunch");
    assert.equal(typeof seen.json.last_active_ago, "number");
    const stranger = await register(node.url, uniqueName("stranger"), PASSWORD);
    expectErrorResponse(
      await call(stranger, "GET", `${V3}/presence/${enc(bob.getUserId())}/status`),
      403,
      "M_FORBIDDEN",
      "presence of someone sharing no room",
    );
  }, { independent: true });

  await step("signing devices out with /delete_devices needs the password", async () => {
    const second = await login(node.url, bobName, PASSWORD);
    const third = await login(node.url, bobName, PASSWORD);
    const devices = [second.getDeviceId(), third.getDeviceId(), "NOSUCHDEVICE"];
    const first = await call(bob, "POST", `${V3}/delete_devices`, { devices });
    assert.equal(first.status, 401, first.text);
    const session = first.json.session;
    const wrong = await call(bob, "POST", `${V3}/delete_devices`, {
      devices,
      auth: { type: "m.login.password", session, identifier: { type: "m.id.user", user: bobName }, password: "wrong" },
    });
    expectErrorResponse(wrong, 403, "M_FORBIDDEN", "a wrong password");
    const listed = await bob.getDevices();
    assert.equal(listed.devices.length, 3, "nothing signed out by a failed attempt");
    await bob.deleteMultipleDevices(devices, {
      type: "m.login.password",
      session,
      identifier: { type: "m.id.user", user: bobName },
      password: PASSWORD,
    });
    const left = await bob.getDevices();
    assert.deepEqual(left.devices.map((d) => d.device_id), [bob.getDeviceId()]);
    await expectMatrixError(second.whoami(), 401, "M_UNKNOWN_TOKEN", "a signed-out device");
  }, { independent: true });

  await step("a new password signs the other devices out", async () => {
    const other = await login(node.url, aliceName, PASSWORD);
    const auth = { type: "m.login.password", identifier: { type: "m.id.user", user: aliceName }, password: PASSWORD };
    const first = await call(alice, "POST", `${V3}/account/password`, { new_password: "a better password" });
    assert.equal(first.status, 401);
    const done = await call(alice, "POST", `${V3}/account/password`, {
      new_password: "a better password",
      auth: { ...auth, session: first.json.session },
    });
    assert.equal(done.status, 200, done.text);
    await expectMatrixError(other.whoami(), 401, "M_UNKNOWN_TOKEN", "the other device");
    assert.equal((await alice.whoami()).user_id, alice.getUserId(), "this device stays");
    await expectMatrixError(login(node.url, aliceName, PASSWORD), 403, "M_FORBIDDEN", "the old password");
    await login(node.url, aliceName, "a better password");
  }, { independent: true });

  await step("deactivation leaves the rooms and closes the account for good", async () => {
    await bob.deactivateAccount({
      type: "m.login.password",
      identifier: { type: "m.id.user", user: bobName },
      password: PASSWORD,
    }).catch(async (e) => {
      // matrix-js-sdk sends the auth at once; a server may first want a session.
      if (e.httpStatus !== 401 || !e.data?.session) throw e;
      await bob.deactivateAccount({
        type: "m.login.password",
        session: e.data.session,
        identifier: { type: "m.id.user", user: bobName },
        password: PASSWORD,
      });
    });
    const members = await call(alice, "GET", `${V3}/rooms/${enc(roomId)}/joined_members`);
    assert.ok(!members.json.joined[bob.getUserId()], "bob left the room");
    await expectMatrixError(login(node.url, bobName, PASSWORD), 403, "M_USER_DEACTIVATED", "logging in again");
    await expectMatrixError(bob.whoami(), 401, "M_UNKNOWN_TOKEN", "the old session");
    const again = await request(node.url, "POST", `${V3}/register`, {
      body: { username: bobName, password: PASSWORD, auth: { type: "m.login.dummy" } },
    });
    expectErrorResponse(again, 400, "M_USER_IN_USE", "taking the name again");
  });
});
