// The profile: which IndexedDB database this page's homeserver lives in, the Matrix session the
// page signs in with, and backups of both.
import { deleteProfile, importProfile } from "../pkg/hyphae.js";
import { h, toast, describe, fail, screen } from "./dom.js";

const params = new URLSearchParams(location.search);
/** One profile = one homeserver = one IndexedDB database; `?profile=` picks another. */
export const PROFILE = params.get("profile") || "default";
export const DB_NAME = `hyphae-${PROFILE}`;
/** The Web Lock that elects the one tab running this profile's homeserver. */
export const LOCK = `hyphae-profile:${PROFILE}`;
const SESSION_KEY = `hyphae:session:${PROFILE}`;

export function loadSession() {
  try {
    return JSON.parse(localStorage.getItem(SESSION_KEY));
  } catch {
    return null;
  }
}

export function saveSession(session) {
  localStorage.setItem(SESSION_KEY, JSON.stringify(session));
}

/** A user id's localpart from a display name: "Ada Lovelace" → "ada.lovelace". */
export function localpartFor(name) {
  const part = name
    .normalize("NFKD")
    .toLowerCase()
    .replace(/[^a-z0-9._=-]+/g, ".")
    .replace(/^\.+|\.+$/g, "")
    .slice(0, 32);
  return part || "me";
}

/** Room keys from an imported file, until the crypto stack has taken them. */
const ROOM_KEYS_KEY = `hyphae:room-keys:${PROFILE}`;

/** Room keys an imported profile brought, as exported (JSON), if any are waiting. */
export function importedRoomKeys() {
  return localStorage.getItem(ROOM_KEYS_KEY);
}

export function forgetImportedRoomKeys() {
  localStorage.removeItem(ROOM_KEYS_KEY);
}

/**
 * Downloads the whole profile (identity, account, rooms, history) as one file, with the room
 * keys this device holds: the key backup may not have the newest of them yet.
 */
export async function backup(hs, displayName, client) {
  const profile = await hs.exportProfile();
  const room_keys = (await client?.getCrypto()?.exportRoomKeysAsJson()) ?? null;
  const file = JSON.stringify({ hyphae_backup: 1, server_name: hs.serverName, session: loadSession(), profile, room_keys });
  const url = URL.createObjectURL(new Blob([file], { type: "application/json" }));
  const day = new Date().toISOString().slice(0, 10);
  const a = h("a", { href: url, download: `hyphae-${localpartFor(displayName || "profile")}-${day}.json` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

/** Replaces this profile with a backup file's, then reloads into it. */
export async function restore(hs, file) {
  let saved;
  try {
    saved = JSON.parse(await file.text());
    if (saved.hyphae_backup !== 1 || typeof saved.profile !== "string") {
      throw new Error("this is not a Hyphae backup file");
    }
  } catch (err) {
    toast(`Cannot restore: ${describe(err)}`, { error: true });
    return;
  }
  screen(h("h1", {}, "Restoring…"), h("p.muted", {}, "Importing your rooms and history."));
  try {
    await hs.shutdown();
    await deleteProfile(DB_NAME);
    await importProfile(DB_NAME, saved.profile);
    saveSession(saved.session);
    if (typeof saved.room_keys === "string") {
      try {
        localStorage.setItem(ROOM_KEYS_KEY, saved.room_keys);
      } catch (err) {
        // Too many for this browser's local storage: the key backup still restores them.
        console.warn("the file's room keys are left to the key backup:", err);
      }
    }
    location.reload();
  } catch (err) {
    fail("The backup could not be restored", err);
  }
}
