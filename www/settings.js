// Settings kept in this browser (not in the profile): bootstrap peers and the theme.
import { recoveryKey, useRecoveryKey } from "./recovery.js";
import { h, dialog, toast, serverNameBox } from "./dom.js";
import { backup, restore } from "./profile.js";
import { sizeOf } from "./media.js";
import { notificationsWanted, setNotifications } from "./notify.js";

const KEY = "hyphae:settings";

export function loadSettings() {
  try {
    return { theme: "system", bootstrap: null, ...JSON.parse(localStorage.getItem(KEY)) };
  } catch {
    return { theme: "system", bootstrap: null };
  }
}

function saveSettings(settings) {
  localStorage.setItem(KEY, JSON.stringify(settings));
}

export function applyTheme(theme = loadSettings().theme) {
  if (theme === "light" || theme === "dark") document.documentElement.dataset.theme = theme;
  else delete document.documentElement.dataset.theme;
}

/** The settings dialog: server name, display name, bootstrap peers, theme, backup and restore. */
export function openSettings({ hs, client, displayName, onRename, onRecoveryKey, onAvatar }) {
  const settings = loadSettings();
  return dialog((close) => {
    const name = h("input", { type: "text", id: "settings-name", value: displayName, maxlength: 64 });
    const peers = h(
      "textarea",
      { id: "settings-bootstrap", rows: 3, placeholder: "Leave empty to use the node that served this page" },
      (settings.bootstrap ?? []).join("\n"),
    );
    const theme = h(
      "select",
      { id: "settings-theme", onchange: () => applyTheme(theme.value) },
      ["system", "light", "dark"].map((t) =>
        h("option", { value: t, selected: settings.theme === t }, t[0].toUpperCase() + t.slice(1)),
      ),
    );
    const enteredKey = h("input.mono", { id: "settings-recovery-entry", type: "text", autocomplete: "off", placeholder: "EsT1 abcd …" });
    const picture = h("input", { type: "file", accept: "image/png,image/jpeg,image/gif,image/webp", class: "hidden", id: "settings-avatar-input" });
    picture.addEventListener("change", () => picture.files[0] && onAvatar(picture.files[0]));
    const notify = h("input", { type: "checkbox", id: "settings-notify", checked: notificationsWanted() });
    const storage = h("span.muted", { id: "settings-storage" });
    navigator.storage?.estimate?.().then(({ usage, quota }) => {
      storage.textContent = `This browser keeps ${sizeOf(usage)} for Hyphae here, of ${sizeOf(quota)} it allows`;
    });
    const file = h("input", { type: "file", accept: ".json,application/json", class: "hidden" });
    file.addEventListener("change", () => {
      if (file.files[0] && confirm("Restoring replaces everything in this browser's Hyphae profile. Go on?")) {
        close();
        restore(hs, file.files[0]);
      }
    });
    return h(
      "form",
      {
        onsubmit: async (e) => {
          e.preventDefault();
          const lines = peers.value.split(/\s+/).filter(Boolean);
          const bad = lines.find((l) => !l.startsWith("/") || !l.includes("/p2p/"));
          if (bad) {
            toast(`Not a multiaddr with /p2p/<peer id>: ${bad}`, { error: true });
            return;
          }
          if (enteredKey.value.trim()) {
            if (!(await useRecoveryKey(client, enteredKey.value))) {
              toast("That is not the recovery key of this account", { error: true });
              return;
            }
            onRecoveryKey();
          }
          if (notify.checked !== notificationsWanted() && !(await setNotifications(notify.checked))) {
            if (notify.checked) toast("The browser did not allow notifications for this page", { error: true });
          }
          const changedPeers = JSON.stringify(lines) !== JSON.stringify(settings.bootstrap ?? []);
          saveSettings({ ...settings, theme: theme.value, bootstrap: lines.length ? lines : null });
          applyTheme(theme.value);
          if (name.value.trim() && name.value.trim() !== displayName) await onRename(name.value.trim());
          close();
          if (changedPeers) toast("Bootstrap peers are used from the next start (reload the page)");
        },
      },
      h("h2", {}, "Settings"),
      h("label", {}, "Your homeserver's name (your user ID ends with it)"),
      serverNameBox(hs.serverName),
      h("label", { for: "settings-name" }, "Display name"),
      name,
      h("label", {}, "Picture"),
      h("div.link-box", {}, h("button", { type: "button", id: "settings-avatar", onclick: () => picture.click() }, "Choose a picture…"), picture),
      h("label", { for: "settings-bootstrap" }, "Bootstrap peers (one multiaddr per line)"),
      peers,
      h("label", { for: "settings-theme" }, "Theme"),
      theme,
      h("label", { for: "settings-notify" }, "Notifications"),
      h("div.row", {}, notify, h("span.muted", {}, "Tell me of mentions and direct messages while Hyphae is in the background")),
      h("label", {}, "Storage"),
      storage,
      h("label", {}, "Backup"),
      h(
        "div.link-box",
        {},
        h("button", { type: "button", id: "export", onclick: () => backup(hs, displayName, client) }, "Export profile"),
        h("button", { type: "button", id: "import", onclick: () => file.click() }, "Import profile…"),
        file,
      ),
      recoveryKey()
        ? [
            h("label", { for: "settings-recovery-key" }, "Recovery key for encrypted messages (the export holds it too)"),
            h("input.mono", { id: "settings-recovery-key", type: "text", readonly: true, value: recoveryKey(), onfocus: (e) => e.target.select() }),
          ]
        : document.body.dataset.history === "needs the recovery key"
          ? [h("label", { for: "settings-recovery-entry" }, "Your encrypted history is backed up: enter its recovery key to read it here"), enteredKey]
          : "",
      h(
        "div.actions",
        {},
        h("button", { type: "button", onclick: () => { applyTheme(); close(); } }, "Cancel"),
        h("button.primary", { type: "submit" }, "Save"),
      ),
    );
  });
}
