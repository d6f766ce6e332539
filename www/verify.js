// Emoji verification (SAS) of another person's device. Everything it says travels as to-device
// messages between the two peers. Either side starts it from the members panel; the other
// accepts; both compare seven emoji and confirm that they match.
import {
  CryptoEvent,
  VerificationPhase,
  VerificationRequestEvent,
  VerifierEvent,
} from "matrix-js-sdk/lib/crypto-api/index.js";
import { h, dialog, describe, toast } from "./dom.js";

/** The device of `userId` to verify: their only one, or the one seen last. */
async function deviceOf(crypto, userId) {
  const devices = [...((await crypto.getUserDeviceInfo([userId], true)).get(userId)?.values() ?? [])];
  return devices.at(-1);
}

/** Whether this device has verified `userId`'s device. */
export async function isVerified(client, userId) {
  const crypto = client.getCrypto();
  const device = crypto && (await deviceOf(crypto, userId));
  if (!device) return false;
  return (await crypto.getDeviceVerificationStatus(userId, device.deviceId))?.isVerified() ?? false;
}

/** Starts verifying `userId`'s device from this side. Resolves to whether it was verified. */
export async function verifyUser(client, userId, name) {
  const crypto = client.getCrypto();
  const device = await deviceOf(crypto, userId);
  if (!device) {
    toast(`${name} has no device to verify yet`, { error: true });
    return false;
  }
  return run(await crypto.requestDeviceVerification(userId, device.deviceId), name, true);
}

/** Offers every verification request another device sends; returns how to stop listening. */
export function listenForRequests(client, nameOf, onDone) {
  const received = (request) => {
    if (!request.initiatedByMe) run(request, nameOf(request.otherUserId), false).then(onDone);
  };
  client.on(CryptoEvent.VerificationRequestReceived, received);
  return () => client.off(CryptoEvent.VerificationRequestReceived, received);
}

/** The dialog that follows one request from start to verified (or cancelled). */
function run(request, name, mine) {
  return dialog((close) => {
    const status = h(
      "p",
      { id: "verify-status" },
      mine ? `Waiting for ${name} to accept…` : `${name} wants to verify your device, and you theirs.`,
    );
    const emoji = h("div.sas", { id: "verify-emoji" });
    const actions = h("div.actions");
    const cancel = h(
      "button",
      {
        type: "button",
        onclick: () => {
          request.cancel().catch(() => {});
          close(false);
        },
      },
      "Cancel",
    );
    const finish = (text, verified) => {
      status.textContent = text;
      emoji.replaceChildren();
      actions.replaceChildren(h("button.primary", { type: "button", id: "verify-done", onclick: () => close(verified) }, "Done"));
    };
    let verifying = false;
    const follow = (verifier) => {
      if (verifying) return;
      verifying = true;
      verifier.on(VerifierEvent.ShowSas, (sas) => {
        status.textContent = `Check that ${name} sees the same emoji, in the same order.`;
        emoji.replaceChildren(
          ...sas.sas.emoji.map(([glyph, label]) => h("div.emoji", {}, h("span.glyph", {}, glyph), h("span.label", {}, label))),
        );
        actions.replaceChildren(
          h(
            "button.danger",
            { type: "button", id: "verify-mismatch", onclick: () => sas.mismatch() },
            "They don't match",
          ),
          h(
            "button.primary",
            {
              type: "button",
              id: "verify-match",
              onclick: () => {
                status.textContent = `Waiting for ${name} to confirm…`;
                actions.replaceChildren();
                sas.confirm().catch(() => {});
              },
            },
            "They match",
          ),
        );
      });
      verifier.verify().then(
        () => finish(`${name}'s device is verified.`, true),
        (err) => finish(`Verification stopped: ${describe(err)}`, false),
      );
    };
    let starting = false;
    const onChange = () => {
      if (request.phase === VerificationPhase.Cancelled && !verifying) {
        finish(`${name} cancelled the verification.`, false);
      } else if (request.verifier) {
        follow(request.verifier);
      } else if (mine && request.phase === VerificationPhase.Ready && !starting) {
        starting = true;
        request.startVerification("m.sas.v1").then(follow, (err) => finish(`Verification failed: ${describe(err)}`, false));
      }
    };
    request.on(VerificationRequestEvent.Change, onChange);
    actions.replaceChildren(cancel);
    if (!mine) {
      actions.append(
        h(
          "button.primary",
          {
            type: "button",
            id: "verify-accept",
            onclick: () => {
              actions.replaceChildren(cancel);
              status.textContent = "Starting…";
              request.accept().catch((err) => finish(`Verification failed: ${describe(err)}`, false));
            },
          },
          "Accept",
        ),
      );
    }
    onChange();
    return h("div.dialog-body", { id: "verify-dialog" }, h("h2", {}, `Verify ${name}`), status, emoji, actions);
  });
}
