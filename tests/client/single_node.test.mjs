// alice and bob on one node.

import { test } from "node:test";

import { startNode } from "./harness.mjs";
import { scenario } from "./scenario.mjs";

test("one node: alice and bob share a room", { timeout: 300_000 }, async (t) => {
  const node = await startNode({ name: "node" });
  t.after(() => node.stop());
  await scenario(t, node, node);
});
