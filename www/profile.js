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

/** Downloads the whole profile (identity, account, rooms, history) as one file. */
export async function backup(hs, displayName) {
  const profile = await hs.exportProfile();
  const file = JSON.stringify({ hyphae_backup: 1, server_name: hs.serverName, session: loadSession(), profile });
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
    location.reload();
  } catch (err) {
    fail("The backup could not be restored", err);
  }
}
