// alice on nodeA, bob on nodeB; nodeB dials nodeA, and the room travels between them over libp2p.

import { test } from "node:test";

import { startNode } from "./harness.mjs";
import { scenario } from "./scenario.mjs";

test("two nodes: alice and bob share a room across peers", { timeout: 600_000 }, async (t) => {
  const nodeA = await startNode({ name: "nodeA" });
  t.after(() => nodeA.stop());
  const [addr] = nodeA.listen;
  const dial = addr.includes("/p2p/") ? addr : `${addr}/p2p/${nodeA.peerId}`;
  const nodeB = await startNode({ name: "nodeB", bootstrap: [dial] });
  t.after(() => nodeB.stop());
  await scenario(t, nodeA, nodeB);
});
