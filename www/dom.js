// Small DOM helpers: the app builds its views with `h` rather than a framework.

/** Creates an element: `h("button.primary", { onclick }, "Send")`. */
export function h(tag, attrs, ...children) {
  const [name, ...classes] = tag.split(".");
  const el = document.createElement(name);
  if (classes.length) el.className = classes.join(" ");
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(el.dataset, value);
    else if (key in el && typeof value !== "string") el[key] = value;
    else el.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

/** Shows a short message; errors stay longer and are styled as such. */
export function toast(message, { error = false } = {}) {
  const el = h("div.toast" + (error ? ".error" : ""), {}, message);
  document.getElementById("toasts").append(el);
  setTimeout(() => el.remove(), error ? 8000 : 3000);
}

/** Words for an error from matrix-js-sdk, the homeserver or the browser. */
export function describe(err) {
  if (err?.data?.error) return err.data.error;
  if (err?.message) return err.message;
  return String(err);
}

/** Runs `action`, showing what went wrong instead of swallowing it. */
export async function attempt(what, action) {
  try {
    return await action();
  } catch (err) {
    console.error(what, err);
    toast(`${what}: ${describe(err)}`, { error: true });
    return undefined;
  }
}

export async function copy(text, what = "Copied") {
  try {
    await navigator.clipboard.writeText(text);
    toast(what);
  } catch {
    toast("Copy failed: select the text and copy it by hand", { error: true });
  }
}

const palette = ["#2f7d5b", "#3b6fb6", "#a14d9c", "#c2562b", "#7a6a1f", "#1f7a7a", "#8a3b4e", "#4b5bbf"];

/** A stable colour for a user or room id. */
export function colourFor(id) {
  let hash = 0;
  for (const c of id) hash = (hash * 31 + c.charCodeAt(0)) | 0;
  return palette[Math.abs(hash) % palette.length];
}

export function avatar(name, id, small = false) {
  const letter = (name || id || "?").replace(/^[@#!]/, "").charAt(0).toUpperCase();
  return h("div.avatar" + (small ? ".small" : ""), { style: `background:${colourFor(id || name)}`, "aria-hidden": "true" }, letter);
}

// Formatting through Intl is slow to set up: one formatter each, made once.
const hourMinute = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayAndTime = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "short" });

export function timeOf(ts) {
  const startOfToday = new Date().setHours(0, 0, 0, 0);
  return ts >= startOfToday ? hourMinute.format(ts) : dayAndTime.format(ts);
}

/** The first few characters of a long id, for lists. */
export function short(id, n = 10) {
  return id.length > n + 2 ? `${id.slice(0, n)}…` : id;
}

/** Opens a <dialog> built by `build(close)`; resolves when it closes. */
export function dialog(build) {
  return new Promise((resolve) => {
    const el = h("dialog", {});
    const close = (value) => {
      el.close();
      el.remove();
      resolve(value);
    };
    el.append(build(close));
    el.addEventListener("cancel", (e) => {
      e.preventDefault();
      close(undefined);
    });
    document.body.append(el);
    el.showModal();
    el.querySelector("[autofocus]")?.focus();
  });
}

/** Replaces the page with one centred card. */
export function screen(...children) {
  document.getElementById("app").replaceChildren(h("div.center-card", {}, h("div.card", {}, ...children)));
}

/** A page-sized error, in words, with a way out. */
export function fail(title, err) {
  console.error(title, err);
  screen(
    h("h1", {}, title),
    h("p", {}, describe(err)),
    h("div.actions", {}, h("button.primary", { onclick: () => location.reload() }, "Reload")),
  );
}

export function serverNameBox(serverName) {
  return h(
    "div.server-name",
    {},
    h("code", { class: "server-name-text" }, serverName),
    h("button.icon", { type: "button", title: "Copy", onclick: () => copy(serverName, "Server name copied") }, "Copy"),
  );
}
