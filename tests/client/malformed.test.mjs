// Bodies that are not JSON, JSON of the wrong shape, missing fields and oversized bodies, sent
// straight over HTTP to every endpoint family: each is refused with the right errcode and
// status, and none of them changes anything.

import assert from "node:assert/strict";
import { test } from "node:test";

import { expectErrorResponse, register, request, startNode, stepper, uniqueName } from "./harness.mjs";

const PASSWORD = "correct horse battery staple";
const V3 = "/_matrix/client/v3";
const TOO_LARGE = { pad: "x".repeat(2 * 1024 * 1024) }; // valid JSON, 2 MiB
const NOT_AN_OBJECT = ['["not", "an", "object"]', '"a string"', "42"]; // sent as is
const enc = encodeURIComponent;

test("malformed requests are refused and change nothing", { timeout: 300_000 }, async (t) => {
  const node = await startNode({ name: "node" });
  t.after(() => node.stop());
  const step = stepper(t, [node]);

  const name = uniqueName("mallory");
  const unusedName = uniqueName("nobody"); // only ever in refused registrations
  let txnCounter = 0;
  const txn = () => `malformed-${++txnCounter}`;
  let token, userId, deviceId, roomId, messageId, openRoomId, before;

  const call = (method, path, body, auth = true) =>
    request(node.url, method, path, { body, token: auth ? token : undefined });
  // One reading of some state: the picked part of a 200 answer, or the error's status and errcode.
  const read = async (path, pick, { method = "GET", body, auth = true } = {}) => {
    const res = await call(method, path, body, auth);
    return res.status === 200 ? pick(res.json) : `${res.status} ${res.json?.errcode ?? res.text}`;
  };
  const snapshot = async () => ({
    joinedRooms: await read(`${V3}/joined_rooms`, (j) => j.joined_rooms.sort()),
    devices: await read(`${V3}/devices`, (j) => j.devices.map((d) => d.device_id).sort()),
    displayname: await read(`${V3}/profile/${enc(userId)}/displayname`, (j) => j.displayname),
    roomName: await read(`${V3}/rooms/${enc(roomId)}/state/m.room.name`, (j) => j.name),
    roomEvents: await read(`${V3}/rooms/${enc(roomId)}/messages?dir=b&limit=100`, (j) => j.chunk.map((e) => e.event_id)),
    accountData: await read(`${V3}/user/${enc(userId)}/account_data/org.hyphae.test`, (j) => j),
    deviceKeys: await read(`${V3}/keys/query`, (j) => j.device_keys?.[userId] ?? {}, {
      method: "POST",
      body: { device_keys: { [userId]: [] } },
    }),
    unusedName: await read(`${V3}/register/available?username=${unusedName}`, (j) => j.available, { auth: false }),
  });

  await step("a user with a room, a message and a display name", async () => {
    const user = await register(node.url, name, PASSWORD);
    token = user.getAccessToken();
    userId = user.getUserId();
    deviceId = user.getDeviceId();
    await user.setDisplayName("Mallory");
    ({ room_id: roomId } = await user.createRoom({ name: "Mine" }));
    ({ event_id: messageId } = await user.sendTextMessage(roomId, "hello"));
    const owner = await register(node.url, uniqueName("owner"), PASSWORD);
    ({ room_id: openRoomId } = await owner.createRoom({ preset: "public_chat", name: "Open" }));
    before = await snapshot();
    assert.deepEqual(before.joinedRooms, [roomId]);
    assert.deepEqual(before.devices, [deviceId]);
    assert.equal(before.displayname, "Mallory");
    assert.equal(before.roomName, "Mine");
    assert.ok(before.roomEvents.includes(messageId), `the room's history: ${before.roomEvents}`);
    assert.equal(before.accountData, "404 M_NOT_FOUND");
    assert.deepEqual(before.deviceKeys, {}, "no device keys uploaded yet");
    assert.equal(before.unusedName, true);
  });

  // For each family: bodies of the wrong types (→ M_BAD_JSON) and bodies missing a required
  // field (→ M_BAD_JSON or M_MISSING_PARAM). Every family also gets a body that is not JSON and
  // one that is too large. Built once the user and rooms above exist.
  const families = () => [
    {
      name: "register",
      auth: false,
      method: "POST",
      path: () => `${V3}/register`,
      wrong: [{ username: 5, password: PASSWORD }, { username: unusedName, password: ["not", "a", "string"] }],
    },
    {
      name: "login",
      auth: false,
      method: "POST",
      path: () => `${V3}/login`,
      wrong: [{ type: 5 }, { type: "m.login.password", identifier: { type: "m.id.user", user: name }, password: 12345 }],
      missing: [{}, { type: "m.login.password", password: PASSWORD }],
    },
    {
      name: "createRoom",
      method: "POST",
      path: () => `${V3}/createRoom`,
      wrong: [{ name: 5 }, { invite: "@someone:example.org" }, { preset: 7 }, { initial_state: {} }],
    },
    {
      name: "join",
      method: "POST",
      path: () => `${V3}/join/${enc(openRoomId)}`,
      wrong: [{ reason: 5 }, NOT_AN_OBJECT[0]],
    },
    {
      name: "send",
      method: "PUT",
      path: () => `${V3}/rooms/${enc(roomId)}/send/m.room.message/${txn()}`,
      wrong: NOT_AN_OBJECT,
    },
    {
      name: "state",
      method: "PUT",
      path: () => `${V3}/rooms/${enc(roomId)}/state/m.room.name`,
      wrong: NOT_AN_OBJECT,
    },
    {
      name: "profile",
      method: "PUT",
      path: () => `${V3}/profile/${enc(userId)}/displayname`,
      // `{}` is left out: the spec does not mark `displayname` as required.
      wrong: [{ displayname: 5 }, { displayname: ["Eve"] }],
    },
    {
      name: "filter",
      method: "POST",
      path: () => `${V3}/user/${enc(userId)}/filter`,
      wrong: [{ room: { timeline: { limit: "ten" } } }, { event_fields: "content" }, NOT_AN_OBJECT[1]],
    },
    {
      name: "account_data",
      method: "PUT",
      path: () => `${V3}/user/${enc(userId)}/account_data/org.hyphae.test`,
      wrong: NOT_AN_OBJECT,
    },
    {
      name: "typing",
      method: "PUT",
      path: () => `${V3}/rooms/${enc(roomId)}/typing/${enc(userId)}`,
      wrong: [{ typing: "yes" }, { typing: true, timeout: "soon" }],
      missing: [{}, { timeout: 1000 }],
    },
    {
      name: "receipt",
      method: "POST",
      path: () => `${V3}/rooms/${enc(roomId)}/receipt/m.read/${enc(messageId)}`,
      wrong: [{ thread_id: 5 }, NOT_AN_OBJECT[0]],
    },
    {
      name: "keys/upload",
      method: "POST",
      path: () => `${V3}/keys/upload`,
      wrong: [{ one_time_keys: "none" }, { device_keys: 5 }],
      missing: [{ device_keys: { user_id: userId, device_id: deviceId } }],
    },
    {
      name: "sendToDevice",
      method: "PUT",
      path: () => `${V3}/sendToDevice/org.hyphae.test/${txn()}`,
      wrong: [{ messages: "none" }, { messages: { "@someone:example.org": "none" } }],
      missing: [{}],
    },
  ];

  for (const f of families()) {
    await step(
      `${f.method} ${f.name}`,
      async () => {
        const send = (body) => call(f.method, f.path(), body, f.auth !== false);
        const what = (body) => `${f.name} with ${typeof body === "string" ? body : JSON.stringify(body)}`;
        expectErrorResponse(await send("not json"), 400, "M_NOT_JSON", `${f.name} with a body that is not JSON`);
        for (const body of f.wrong ?? []) {
          expectErrorResponse(await send(body), 400, "M_BAD_JSON", what(body));
        }
        for (const body of f.missing ?? []) {
          expectErrorResponse(await send(body), 400, ["M_BAD_JSON", "M_MISSING_PARAM"], what(body));
        }
        expectErrorResponse(await send(TOO_LARGE), 413, "M_TOO_LARGE", `${f.name} with a 2 MiB body`);
      },
      { independent: true },
    );
  }

  await step(
    "GET sync with a bad since or filter",
    async () => {
      const sync = (query) => call("GET", `${V3}/sync?timeout=0&${query}`);
      const inline = (filter) => `filter=${enc(typeof filter === "string" ? filter : JSON.stringify(filter))}`;
      const cases = [
        ["a since token never issued", "since=not-a-token", 400, "M_INVALID_PARAM"],
        ["an unknown filter id", "filter=no-such-filter", [400, 404], ["M_INVALID_PARAM", "M_NOT_FOUND"]],
        ["an inline filter that is not JSON", inline("{not json"), 400, ["M_NOT_JSON", "M_BAD_JSON", "M_INVALID_PARAM"]],
        ["an inline filter of the wrong shape", inline({ room: { timeline: { limit: "ten" } } }), 400, ["M_BAD_JSON", "M_INVALID_PARAM"]],
      ];
      for (const [what, query, status, errcode] of cases) {
        expectErrorResponse(await sync(query), status, errcode, what);
      }
    },
    { independent: true },
  );

  await step(
    "unknown endpoints and methods",
    async () => {
      const cases = [
        ["GET", `${V3}/nonexistent`, 404],
        ["POST", `${V3}/rooms/${enc(roomId)}/frobnicate`, 404],
        ["DELETE", `${V3}/login`, [404, 405]],
        ["PATCH", `${V3}/sync`, [404, 405]],
        ["GET", `${V3}/createRoom`, [404, 405]],
        ["PUT", `${V3}/account/whoami`, [404, 405]],
      ];
      for (const [method, path, status] of cases) {
        expectErrorResponse(await call(method, path), status, "M_UNRECOGNIZED", `${method} ${path}`);
      }
    },
    { independent: true },
  );

  await step("nothing changed", async () => {
    assert.deepEqual(await snapshot(), before);
  });
});
