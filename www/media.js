// Pictures, files and avatars. Media is authenticated (spec v1.11), so an <img> cannot fetch it
// by URL: every file is fetched through the homeserver with the access token and shown from a
// blob URL. In encrypted rooms attachments are encrypted here first (AES-CTR, as the spec's
// EncryptedFile says), so no server holds them readable.
import { h, describe, toast } from "./dom.js";

/** Files larger than this are refused before they are read (the server's `m.upload.size`). */
const MAX_UPLOAD = 100 * 1024 * 1024;
/** Blob URLs kept for shown media, oldest dropped first. */
const CACHE_SIZE = 200;
/** How long a file that could not be fetched is not asked for again. */
const FAILURE_MS = 60_000;

const cache = new Map();

/** The `fetch` that reaches the homeserver (the tab's own, for the in-tab homeserver). */
let fetchFn = (...args) => fetch(...args);

export function useFetch(fn) {
  fetchFn = fn;
}

function remember(key, promise) {
  cache.set(key, promise);
  while (cache.size > CACHE_SIZE) {
    const [oldest, url] = cache.entries().next().value;
    cache.delete(oldest);
    url.then((u) => URL.revokeObjectURL(u), () => {});
  }
  // A failure is kept a minute, so that renders in between do not ask again and again.
  promise.catch(() => setTimeout(() => cache.get(key) === promise && cache.delete(key), FAILURE_MS));
  return promise;
}

async function fetchBlob(client, url) {
  const resp = await fetchFn(url, { headers: { Authorization: `Bearer ${client.getAccessToken()}` } });
  if (!resp.ok) {
    const err = await resp.json().catch(() => ({}));
    throw new Error(err.error ?? `the file could not be fetched (${resp.status})`);
  }
  return resp.blob();
}

/**
 * Uploads a file (a `Blob`) and resolves to its `mxc://` URI. Through the homeserver's own
 * `fetch`: matrix-js-sdk's `uploadContent` would use XMLHttpRequest, which cannot reach a
 * homeserver in the tab. The tab reads the file a slice at a time into its store.
 */
export async function upload(client, blob, { name, type, roomId }) {
  const params = new URLSearchParams();
  if (name) params.set("filename", name);
  // The servers of this room may fetch it, even when no event they can read names it.
  if (roomId) params.set("org.hyphae.room_id", roomId);
  const query = params.size ? `?${params}` : "";
  const resp = await fetchFn(`${client.baseUrl}/_matrix/media/v3/upload${query}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${client.getAccessToken()}`, "Content-Type": type || "application/octet-stream" },
    body: blob,
  });
  const answer = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(answer.error ?? `the upload failed (${resp.status})`);
  return answer.content_uri;
}

/** A blob URL of `mxc` (scaled by the server to `size` when given: `{ width, height, method }`). */
export function mediaUrl(client, mxc, size) {
  const key = size ? `${mxc}|${size.width}x${size.height}|${size.method}` : mxc;
  if (cache.has(key)) return cache.get(key);
  const url = size
    ? client.mxcUrlToHttp(mxc, size.width, size.height, size.method, false, true, true)
    : client.mxcUrlToHttp(mxc, undefined, undefined, undefined, false, true, true);
  return remember(key, url ? fetchBlob(client, url).then((b) => URL.createObjectURL(b)) : Promise.reject(new Error("not an mxc URI")));
}

const b64 = (bytes) => btoa(String.fromCharCode(...new Uint8Array(bytes)));
const unpadded = (s) => s.replace(/=+$/, "");
const b64url = (s) => s.replace(/\+/g, "-").replace(/\//g, "_");
const fromB64 = (s) => Uint8Array.from(atob(s.replace(/-/g, "+").replace(/_/g, "/")), (c) => c.charCodeAt(0));

/** Encrypts a file for an encrypted room: the ciphertext, and the `file` object that opens it. */
async function encryptFile(data) {
  const key = await crypto.subtle.generateKey({ name: "AES-CTR", length: 256 }, true, ["encrypt", "decrypt"]);
  const iv = new Uint8Array(16);
  crypto.getRandomValues(iv.subarray(0, 8));
  const ciphertext = await crypto.subtle.encrypt({ name: "AES-CTR", counter: iv, length: 64 }, key, data);
  const jwk = await crypto.subtle.exportKey("jwk", key);
  const digest = await crypto.subtle.digest("SHA-256", ciphertext);
  return {
    ciphertext,
    file: {
      v: "v2",
      key: { kty: "oct", key_ops: ["encrypt", "decrypt"], alg: "A256CTR", k: jwk.k, ext: true },
      iv: unpadded(b64(iv)),
      hashes: { sha256: unpadded(b64(digest)) },
    },
  };
}

/** A blob URL of an encrypted attachment, checked against its hash and decrypted. */
export function decryptedUrl(client, file, type) {
  if (cache.has(file.url)) return cache.get(file.url);
  const url = client.mxcUrlToHttp(file.url, undefined, undefined, undefined, false, true, true);
  const decrypted = (async () => {
    const data = await (await fetchBlob(client, url)).arrayBuffer();
    const digest = unpadded(b64(await crypto.subtle.digest("SHA-256", data)));
    if (digest !== unpadded(file.hashes?.sha256 ?? "")) throw new Error("the file does not match its hash");
    const key = await crypto.subtle.importKey("jwk", { ...file.key, k: b64url(unpadded(file.key.k)) }, { name: "AES-CTR" }, false, ["decrypt"]);
    const plain = await crypto.subtle.decrypt({ name: "AES-CTR", counter: fromB64(file.iv), length: 64 }, key, data);
    return URL.createObjectURL(new Blob([plain], { type: type || "application/octet-stream" }));
  })();
  return remember(file.url, decrypted);
}

/** "1.4 MB", for file rows. */
export function sizeOf(bytes) {
  if (!(bytes >= 0)) return "";
  const units = ["bytes", "KB", "MB", "GB"];
  let n = bytes;
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i++;
  }
  return i === 0 ? `${n} bytes` : `${n.toFixed(n < 10 ? 1 : 0)} ${units[i]}`;
}

/** The width and height of a picture, if the browser can read it. */
async function dimensions(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const size = { w: bitmap.width, h: bitmap.height };
    bitmap.close();
    return size;
  } catch {
    return null;
  }
}

/**
 * Uploads `file` and sends it to `room` (a picture as `m.image`, anything else as `m.file`),
 * encrypted first when the room is. `progress(fraction)` hears how far the upload is (`null`
 * while it is stored without telling how far it got).
 */
export async function sendFile(client, room, file, progress) {
  if (file.size > MAX_UPLOAD) throw new Error(`${file.name} is larger than ${sizeOf(MAX_UPLOAD)}`);
  const isImage = file.type.startsWith("image/");
  const info = { mimetype: file.type || "application/octet-stream", size: file.size };
  if (isImage) {
    const size = await dimensions(file);
    if (size) Object.assign(info, size);
  }
  const encrypted = client.isRoomEncrypted(room.roomId);
  let body = file;
  let secret = null;
  if (encrypted) {
    secret = await encryptFile(await file.arrayBuffer());
    body = new Blob([secret.ciphertext], { type: "application/octet-stream" });
  }
  progress(null);
  const content_uri = await upload(client, body, {
    name: encrypted ? undefined : file.name,
    type: encrypted ? "application/octet-stream" : info.mimetype,
    roomId: encrypted ? room.roomId : undefined,
  });
  progress(1);
  const content = { msgtype: isImage && info.w ? "m.image" : "m.file", body: file.name, filename: file.name, info };
  if (secret) content.file = { ...secret.file, url: content_uri };
  else content.url = content_uri;
  await client.sendMessage(room.roomId, content);
}

/** A row's attachment: a thumbnail that opens the picture, or a file row that downloads it. */
export function attachment(client, content, { onOpen }) {
  const info = content.info ?? {};
  const source = content.file?.url ?? content.url;
  if (!source) return "";
  const full = () => (content.file ? decryptedUrl(client, content.file, info.mimetype) : mediaUrl(client, source));
  if (content.msgtype === "m.image") {
    const img = h("img.thumb", { alt: content.body ?? "picture", width: fit(info).w, height: fit(info).h });
    const shown = content.file ? full() : mediaUrl(client, source, { width: 800, height: 600, method: "scale" });
    shown.then(
      (url) => (img.src = url),
      (err) => img.replaceWith(h("div.file.failed", {}, `🖼 ${content.body}: ${describe(err)}`)),
    );
    return h("button.image", { type: "button", "aria-label": `Open ${content.body}`, onclick: () => full().then(onOpen, (err) => toast(describe(err), { error: true })) }, img);
  }
  const name = content.filename ?? content.body ?? "file";
  return h(
    "button.file",
    {
      type: "button",
      onclick: () =>
        full().then(
          (url) => {
            const a = h("a", { href: url, download: name });
            document.body.append(a);
            a.click();
            a.remove();
          },
          (err) => toast(`Cannot download ${name}: ${describe(err)}`, { error: true }),
        ),
    },
    h("span.file-icon", {}, "📄"),
    h("span.file-name", {}, name),
    h("span.file-size", {}, sizeOf(info.size)),
  );
}

/** The size a picture is shown at in the timeline (at most 320×240), so rows do not jump. */
function fit(info) {
  const w = info.w ?? 320;
  const hgt = info.h ?? 240;
  const scale = Math.min(1, 320 / w, 240 / hgt);
  return { w: Math.round(w * scale), h: Math.round(hgt * scale) };
}

/** A full-size picture over everything; a click or Escape closes it. */
export function openPicture(url, name) {
  const close = () => {
    overlay.remove();
    document.removeEventListener("keydown", onKey);
  };
  const onKey = (e) => e.key === "Escape" && close();
  const overlay = h("div.lightbox", { id: "lightbox", onclick: close }, h("img", { src: url, alt: name }));
  document.addEventListener("keydown", onKey);
  document.body.append(overlay);
}

/** A user's (or room's) picture in place of their initial, once it is fetched. */
export function withPicture(client, el, mxc) {
  if (!mxc || !mxc.startsWith("mxc://")) return el;
  mediaUrl(client, mxc, { width: 96, height: 96, method: "crop" }).then(
    (url) => {
      el.textContent = "";
      el.style.backgroundImage = `url("${url}")`;
      el.classList.add("picture");
    },
    () => {},
  );
  return el;
}
