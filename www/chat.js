// The chat view: room list, timeline, composer, members and peers, over matrix-js-sdk talking
// to this tab's homeserver.
import {
  ClientEvent,
  EventStatus,
  EventTimeline,
  MatrixEventEvent,
  NotificationCountType,
  RoomEvent,
  RoomMemberEvent,
  RoomStateEvent,
} from "matrix-js-sdk";
import { h, attempt, avatar, colourFor, copy, dialog, describe, short, timeOf, toast } from "./dom.js";
import { openSettings } from "./settings.js";
import { secureHistory } from "./recovery.js";
import { attachment, openPicture, sendFile, upload, useFetch, withPicture } from "./media.js";
import { isVerified, listenForRequests, verifyUser } from "./verify.js";
import { watchForNotifications } from "./notify.js";

const QUICK_REACTIONS = ["👍", "❤️", "😄", "🎉"];
/** Messages from one sender within this long are shown as one group. */
const GROUP_MS = 5 * 60 * 1000;
const PAGE = 30;
/** Events of the open room rendered when following the newest ones. */
const WINDOW = 80;
const TYPING_RENEW_MS = 3000;
const TYPING_IDLE_MS = 4000;
const RECEIPT_PAUSE_MS = 1000;

const serverOf = (userId) => userId.slice(userId.indexOf(":") + 1);

/** The state that turns on end-to-end encryption (megolm) for a new room. */
export const ENCRYPTION = { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } };
/**
 * matrix-js-sdk keeps one crypto store per origin, under a name of its own; which user's device
 * it holds the keys of is noted here, so a store of another device is never opened for this one.
 */
const CRYPTO_HOLDER = "hyphae:crypto-device";
const CRYPTO_STORE_PREFIX = "matrix-js-sdk::";

export function cryptoStoreHolds(userId, deviceId) {
  return localStorage.getItem(CRYPTO_HOLDER) === `${userId}|${deviceId}`;
}

/** Opens end-to-end encryption for the client's device, replacing a store of another device. */
async function startCrypto(client) {
  const holder = `${client.getUserId()}|${client.getDeviceId()}`;
  if (localStorage.getItem(CRYPTO_HOLDER) !== holder) {
    const stores = ((await indexedDB.databases?.()) ?? []).filter((d) => d.name?.startsWith(CRYPTO_STORE_PREFIX));
    await Promise.all(
      stores.map(
        (d) =>
          new Promise((resolve, reject) => {
            const req = indexedDB.deleteDatabase(d.name);
            req.onsuccess = resolve;
            req.onerror = () => reject(req.error);
          }),
      ),
    );
  }
  await client.initRustCrypto();
  localStorage.setItem(CRYPTO_HOLDER, holder);
}

/** An encrypted event this device cannot read (yet): its key has not arrived. */
const undecryptable = (ev) => ev.isDecryptionFailure();

/** The join link for a room: its id, a server in it, and where that peer can be dialled. */
export function joinLink(roomId, via, peerAddr) {
  const query = new URLSearchParams({ via });
  if (peerAddr) query.set("peer", peerAddr);
  return `${location.origin}${location.pathname}${location.search}#/join/${encodeURIComponent(roomId)}?${query}`;
}

export function parseJoinLink(hash) {
  const m = /^#\/join\/([^?]+)(?:\?(.*))?$/.exec(hash);
  if (!m) return null;
  const query = new URLSearchParams(m[2] ?? "");
  return { roomId: decodeURIComponent(m[1]), via: query.get("via"), peer: query.get("peer") };
}

export class Chat {
  constructor({ root, hs, client, session }) {
    this.root = root;
    this.hs = hs;
    useFetch(hs.fetch.bind(hs));
    this.client = client;
    this.me = session.user_id;
    this.roomId = null;
    this.side = null; // "members" | "peers" | null
    this.replyTo = null;
    this.editing = null;
    this.status = { connections: [], bootstrap: [], catch_up: { active: 0, fetched: 0 } };
    this.delivered = new Set();
    this.paginating = false;
    this.shown = WINDOW;
    this.firstShownId = null;
    this.hiddenBefore = 0;
    this.revealEarlier = 0;
    this.readUpTo = new Map();
    this.typingSent = 0;
    this.renderQueued = false;
    this.cleanups = [];
  }

  async start() {
    this.buildShell();
    const c = this.client;
    const rerender = () => this.scheduleRender();
    for (const [emitter, event, fn] of [
      [c, RoomEvent.Timeline, rerender],
      [c, RoomEvent.Name, rerender],
      [c, RoomEvent.Receipt, rerender],
      [c, RoomEvent.LocalEchoUpdated, rerender],
      [c, RoomEvent.Redaction, rerender],
      [c, RoomEvent.MyMembership, rerender],
      [c, RoomEvent.UnreadNotifications, rerender],
      [c, RoomMemberEvent.Typing, rerender],
      [c, RoomStateEvent.Members, rerender],
      [c, ClientEvent.Room, rerender],
      [c, ClientEvent.DeleteRoom, rerender],
      // A message whose key arrives later is shown once it is readable.
      [c, MatrixEventEvent.Decrypted, rerender],
    ]) {
      emitter.on(event, fn);
      this.cleanups.push(() => emitter.off(event, fn));
    }
    this.cleanups.push(
      watchForNotifications(c, { activeRoom: () => this.roomId, open: (roomId) => this.openRoom(roomId) }),
    );
    const online = () => this.setOnline();
    window.addEventListener("online", online);
    window.addEventListener("offline", online);
    const hash = () => this.followJoinLink();
    window.addEventListener("hashchange", hash);
    this.cleanups.push(() => {
      window.removeEventListener("online", online);
      window.removeEventListener("offline", online);
      window.removeEventListener("hashchange", hash);
    });
    this.hs.onPeersChanged(() => this.refreshStatus());
    this.statusTimer = setInterval(() => this.refreshStatus(), 1000);

    const prepared = new Promise((resolve, reject) => {
      const onSync = (state, _prev, data) => {
        if (state === "PREPARED" || state === "SYNCING") {
          c.off(ClientEvent.Sync, onSync);
          resolve();
        } else if (state === "ERROR" && !c.getRooms().length) {
          c.off(ClientEvent.Sync, onSync);
          reject(data?.error ?? new Error("the first sync failed"));
        }
      };
      c.on(ClientEvent.Sync, onSync);
    });
    // The profile and the first sync are independent: ask for both at once. End-to-end
    // encryption (matrix-js-sdk's Rust crypto, its own wasm module in a chunk of its own) loads
    // now, not with the page, and keeps its keys in IndexedDB.
    const profile = c.getProfileInfo(this.me).then(
      (p) => {
        this.displayName = p.displayname;
        this.avatarUrl = p.avatar_url;
      },
      () => {},
    );
    performance.mark("hyphae-crypto-start");
    await startCrypto(c);
    const nameOf = (userId) => this.client.getRoom(this.roomId)?.getMember(userId)?.name ?? userId;
    this.cleanups.push(listenForRequests(c, nameOf, () => this.side && this.renderSide()));
    performance.mark("hyphae-crypto-ready");
    // The first /sync is in and handled (the crypto stack's part too): for the benchmarks.
    const caughtUp = (state) => {
      if (state !== "SYNCING") return;
      c.off(ClientEvent.Sync, caughtUp);
      performance.mark("hyphae-up-to-date");
    };
    c.on(ClientEvent.Sync, caughtUp);
    this.cleanups.push(() => c.off(ClientEvent.Sync, caughtUp));
    await c.startClient({ initialSyncLimit: PAGE, lazyLoadMembers: false });
    await Promise.all([prepared, profile]);
    performance.mark("hyphae-first-sync");
    const last = localStorage.getItem(`hyphae:room:${this.me}`);
    const rooms = this.joinedRooms();
    this.roomId = rooms.find((r) => r.roomId === last)?.roomId ?? rooms[0]?.roomId ?? null;
    this.render();
    performance.mark("hyphae-interactive");
    document.body.dataset.ready = "true";
    this.setOnline();
    this.followJoinLink();
    this.refreshStatus();
    this.protectHistory();
    // Files and history are worth keeping: ask once that the browser not evict them.
    if (!localStorage.getItem("hyphae:persist-asked")) {
      localStorage.setItem("hyphae:persist-asked", "1");
      navigator.storage?.persist?.().catch(() => {});
    }
  }

  /** Key backup after the first screen: set up on a first run, restored on a new device. */
  protectHistory() {
    const c = this.client;
    this.history = secureHistory(c).then(
      (done) => {
        document.body.dataset.history = done;
        this.scheduleRender();
      },
      (err) => {
        document.body.dataset.history = `failed: ${describe(err)}`;
        toast(`Encrypted history is not backed up: ${describe(err)}`, { error: true });
      },
    );
  }

  stop() {
    this.stopped = true;
    this.client.stopClient();
    clearInterval(this.statusTimer);
    clearTimeout(this.deliveryTimer);
    clearTimeout(this.receiptTimer);
    for (const fn of this.cleanups) fn();
  }

  // ---- network status -------------------------------------------------------------------

  setOnline() {
    attempt("Switching the network", async () => this.hs.setOffline(!navigator.onLine));
    this.renderBanner();
  }

  async refreshStatus() {
    if (this.stopped) return;
    try {
      this.status = await this.hs.status();
    } catch {
      return;
    }
    this.renderBanner();
    if (this.side) this.renderSide();
  }

  /** Server names of the peers this tab is connected to (directly or through a relay). */
  onlineServers() {
    const set = new Set(this.status.connections.map((c) => c.server_name).filter(Boolean));
    set.add(this.hs.serverName);
    return set;
  }

  /** This tab's address through its bootstrap node's relay, for join links. */
  relayedAddress() {
    const relay = this.status.bootstrap.find((b) => b.connected) ?? this.status.bootstrap[0];
    return relay ? `${relay.address}/p2p-circuit/p2p/${this.hs.peerId}` : null;
  }

  // ---- layout ---------------------------------------------------------------------------

  buildShell() {
    this.els = {
      banner: h("div", { id: "banner" }),
      roomList: h("nav.room-list", { "aria-label": "Rooms" }),
      me: h("div.me"),
      room: h("main.room"),
      side: h("aside.side.hidden"),
    };
    const tools = h(
      "div.tools",
      {},
      h("button.primary", { id: "new-room", onclick: () => this.newRoomDialog() }, "New room"),
      h("button", { id: "peers-button", onclick: () => this.toggleSide("peers") }, "Peers"),
      h("button", { id: "settings-button", title: "Settings", onclick: () => this.settings() }, "Settings"),
    );
    const sidebar = h("div.sidebar", {}, h("header", {}, this.els.me, tools), this.els.roomList);
    this.els.shell = h("div.shell", {}, sidebar, h("div.room-column", {}, this.els.banner, this.els.room), this.els.side);
    this.root.replaceChildren(this.els.shell);
  }

  scheduleRender() {
    if (this.renderQueued || this.stopped) return;
    this.renderQueued = true;
    requestAnimationFrame(() => {
      this.renderQueued = false;
      if (!this.stopped) this.render();
    });
  }

  render() {
    this.renderMe();
    this.renderRoomList();
    this.renderRoom();
    this.renderBanner();
    if (this.side) this.renderSide();
  }

  renderMe() {
    const name = this.displayName || this.me;
    this.els.me.replaceChildren(
      withPicture(this.client, avatar(name, this.me), this.avatarUrl),
      h(
        "div.who",
        {},
        h("div.name", { id: "my-name" }, name),
        h("div.server", { title: "Your user ID: click to copy", onclick: () => copy(this.me, "User ID copied") }, this.me),
      ),
    );
  }

  renderBanner() {
    const parts = [];
    const connected = this.status.connections.length > 0;
    if (!navigator.onLine) {
      parts.push(h("div.banner", { id: "offline" }, "You're offline. What you send is kept in this browser and goes out when you're back."));
    } else if (!connected) {
      const boot = this.status.bootstrap.length
        ? "Trying to reach the bootstrap node…"
        : "No bootstrap peer is set (Settings).";
      parts.push(h("div.banner", { id: "offline" }, `No peers connected. ${boot} Messages are kept in this browser until a peer is reachable.`));
    }
    const catchUp = this.status.catch_up;
    if (catchUp.active > 0) {
      parts.push(
        h("div.progress", { role: "progressbar", "aria-label": "Catching up" }, h("div")),
        h("div.notice", { id: "catching-up" }, `Catching up from peers… ${catchUp.fetched} events so far`),
      );
    }
    this.els.banner.replaceChildren(...parts);
  }

  joinedRooms() {
    return this.client
      .getRooms()
      .filter((r) => r.getMyMembership() === "join")
      .sort((a, b) => b.getLastActiveTimestamp() - a.getLastActiveTimestamp());
  }

  renderRoomList() {
    const invites = this.client.getRooms().filter((r) => r.getMyMembership() === "invite");
    const items = [];
    if (invites.length) {
      items.push(h("div.section", {}, "Invites"));
      for (const room of invites) {
        const inviter = room.getMember(this.me)?.events.member?.getSender() ?? "someone";
        items.push(
          h(
            "div.invite-item",
            { dataset: { roomId: room.roomId } },
            h("div", {}, h("strong", {}, room.name), h("div.muted", {}, `Invited by ${inviter}`)),
            h(
              "div.row",
              {},
              h("button.primary", { onclick: () => this.join(room.roomId, [serverOf(inviter)]) }, "Join"),
              h("button", { onclick: () => attempt("Declining", () => this.client.leave(room.roomId)) }, "Decline"),
            ),
          ),
        );
      }
    }
    items.push(h("div.section", {}, "Rooms"));
    const rooms = this.joinedRooms();
    if (!rooms.length) items.push(h("div.notice", {}, "No rooms yet: create one, or open a join link."));
    for (const room of rooms) {
      const here = room.roomId === this.roomId;
      const unread = here ? 0 : room.getUnreadNotificationCount(NotificationCountType.Total);
      const mentions = here ? 0 : room.getUnreadNotificationCount(NotificationCountType.Highlight);
      const last = lastMessage(room);
      items.push(
        h(
          "button.room-item" + (room.roomId === this.roomId ? ".active" : ""),
          { onclick: () => this.openRoom(room.roomId), dataset: { roomId: room.roomId }, title: room.name },
          withPicture(this.client, avatar(room.name, room.roomId), room.getMxcAvatarUrl()),
          h(
            "div.body",
            {},
            h("div.title", {}, room.name),
            h("div.last", {}, last ? `${last.sender?.name ?? last.getSender()}: ${bodyOf(last)}` : "No messages yet"),
          ),
          mentions > 0
            ? h("span.badge.mention", { "aria-label": `${unread} unread, ${mentions} mentioning you` }, `@${unread}`)
            : unread > 0
              ? h("span.badge", { "aria-label": `${unread} unread` }, unread)
              : "",
        ),
      );
    }
    this.els.roomList.replaceChildren(...items);
  }

  openRoom(roomId) {
    if (roomId !== this.roomId) {
      this.roomId = roomId;
      this.replyTo = null;
      this.editing = null;
      this.timelineEl = null;
      this.shown = WINDOW;
      this.firstShownId = null;
      localStorage.setItem(`hyphae:room:${this.me}`, roomId);
    }
    this.els.shell.classList.add("in-room");
    this.render();
    this.els.room.querySelector("textarea")?.focus();
  }

  // ---- the room -------------------------------------------------------------------------

  renderRoom() {
    const room = this.roomId && this.client.getRoom(this.roomId);
    if (!room || room.getMyMembership() !== "join") {
      this.timelineEl = null;
      this.els.room.replaceChildren(
        h("div.empty-room", {}, h("div", {}, h("div.logo", {}, "Hyphae"), h("p", {}, "Pick a room, or create one to start."))),
      );
      return;
    }
    if (!this.timelineEl || this.timelineEl.dataset.roomId !== room.roomId) this.buildRoom(room);
    this.renderHeader(room);
    this.renderTimeline(room);
    this.renderTyping(room);
    this.renderComposerContext();
    this.sendReceipt(room);
  }

  buildRoom(room) {
    this.header = h("header");
    this.timelineEl = h("div.timeline", { id: "timeline", dataset: { roomId: room.roomId }, tabindex: 0 });
    // Whether to keep the newest message in view: follows the person's scrolling, not the
    // content's changes (a timeline reset or a page of history must not move the view).
    this.stickToBottom = true;
    this.timelineEl.addEventListener("scroll", () => {
      const el = this.timelineEl;
      this.stickToBottom = el.scrollHeight - el.scrollTop - el.clientHeight < 60;
      this.maybePaginate(room);
    });
    this.typingEl = h("div.typing", { id: "typing", "aria-live": "polite" });
    this.contextEl = h("div");
    this.composer = h("textarea", { id: "composer", rows: 1, placeholder: `Message ${room.name}`, "aria-label": "Message" });
    this.composer.addEventListener("keydown", (e) => this.onComposerKey(e, room));
    this.composer.addEventListener("input", () => this.onComposerInput(room));
    // Files come by the button, dropped on the room, or pasted into the composer.
    this.composer.addEventListener("paste", (e) => {
      const files = [...(e.clipboardData?.files ?? [])];
      if (files.length) {
        e.preventDefault();
        this.sendFiles(room, files);
      }
    });
    const picker = h("input", { type: "file", multiple: true, class: "hidden", id: "attach-input" });
    picker.addEventListener("change", () => {
      this.sendFiles(room, [...picker.files]);
      picker.value = "";
    });
    this.els.room.ondragover = (e) => {
      if (e.dataTransfer?.types.includes("Files")) {
        e.preventDefault();
        this.els.room.classList.add("dropping");
      }
    };
    this.els.room.ondragleave = () => this.els.room.classList.remove("dropping");
    this.els.room.ondrop = (e) => {
      this.els.room.classList.remove("dropping");
      const files = [...(e.dataTransfer?.files ?? [])];
      if (files.length) {
        e.preventDefault();
        this.sendFiles(room, files);
      }
    };
    this.uploadsEl = h("div.uploads", { id: "uploads" });
    const attach = h("button.icon.attach", { type: "button", id: "attach", "aria-label": "Attach files", title: "Attach files", onclick: () => picker.click() }, "📎");
    this.els.room.replaceChildren(
      this.header,
      this.timelineEl,
      this.typingEl,
      h("div.composer", {}, this.uploadsEl, this.contextEl, h("div.compose-row", {}, attach, this.composer, picker)),
    );
  }

  renderHeader(room) {
    const topic = room.currentState.getStateEvents("m.room.topic", "")?.getContent().topic;
    this.header.replaceChildren(
      h("button.icon.back", { onclick: () => this.els.shell.classList.remove("in-room"), "aria-label": "Back to rooms" }, "←"),
      withPicture(this.client, avatar(room.name, room.roomId), room.getMxcAvatarUrl()),
      h(
        "div.titles",
        {},
        h(
          "h2",
          { id: "room-name" },
          room.hasEncryptionStateEvent()
            ? h("span.lock", { id: "room-encrypted", title: "End-to-end encrypted", "aria-label": "End-to-end encrypted" }, "🔒 ")
            : "",
          room.name,
        ),
        topic ? h("div.topic", { id: "room-topic" }, topic) : "",
      ),
      h("button", { id: "edit-room-button", onclick: () => this.editRoomDialog(room) }, "Edit"),
      h("button", { id: "invite-button", onclick: () => this.inviteDialog(room) }, "Invite"),
      h("button", { id: "share-button", onclick: () => this.shareDialog(room) }, "Share link"),
      h("button", { id: "members-button", onclick: () => this.toggleSide("members") }, "Members"),
      h("button.danger", { id: "leave-button", onclick: () => this.leave(room) }, "Leave"),
    );
  }

  renderTimeline(room) {
    const el = this.timelineEl;
    const atBottom = this.stickToBottom;
    const fromBottom = el.scrollHeight - el.scrollTop;
    const events = loadedEvents(room);
    // Only a window of the loaded events becomes DOM, so that a long session or a big catch-up
    // costs the same per update as a short one. At the bottom the window slides with new
    // events; while the person reads further up it stays where it is.
    const anchor = !atBottom && this.firstShownId ? events.findIndex((e) => e.getId() === this.firstShownId) : -1;
    let start = anchor >= 0 ? anchor : Math.max(0, events.length - this.shown);
    if (this.revealEarlier) {
      start = Math.max(0, start - this.revealEarlier);
      this.revealEarlier = 0;
    }
    this.shown = Math.max(WINDOW, events.length - start);
    this.firstShownId = events[start]?.getId();
    this.hiddenBefore = start;
    const edits = new Map();
    const reactions = new Map();
    // Edits and reactions come after what they change, so the window holds those it shows.
    for (const ev of events.slice(start)) {
      if (ev.isRedacted()) continue;
      const rel = ev.getWireContent()["m.relates_to"];
      if (!rel?.event_id) continue;
      if (rel.rel_type === "m.replace" && ev.getType() === "m.room.message") {
        // Keyed by target and editor: only the original sender's edits count (editKey).
        const key = editKey(rel.event_id, ev.getSender());
        const prev = edits.get(key);
        if (!prev || prev.getTs() <= ev.getTs()) edits.set(key, ev);
      } else if (rel.rel_type === "m.annotation" && ev.getType() === "m.reaction") {
        const byKey = reactions.get(rel.event_id) ?? new Map();
        const list = byKey.get(rel.key) ?? [];
        list.push(ev);
        byKey.set(rel.key, list);
        reactions.set(rel.event_id, byKey);
      }
    }
    // Kept for the actions on the rows just rendered (edit, react).
    this.edits = edits;
    this.reactions = reactions;
    const rows = [];
    const hasMore = start > 0 || !!oldestTimeline(room).getPaginationToken(EventTimeline.BACKWARDS);
    rows.push(h("div.start", { id: "timeline-start" }, hasMore ? (this.paginating ? "Loading earlier messages…" : "") : "This is the start of the room."));
    let previous = null;
    const shown = events.slice(start);
    const laterFromOthers = laterForeignIndex(shown, this.hs.serverName);
    const hidden = (ev) => {
      const type = ev.getType();
      return type === "m.reaction" || type === "m.room.redaction" || ev.getWireContent()["m.relates_to"]?.rel_type === "m.replace";
    };
    // Who has read up to each shown message. A receipt on an event that has no row of its own
    // (a reaction, an edit, a state change) counts for the message shown before it.
    const readers = new Map();
    const readHere = shown.map(() => false);
    let lastMessage = null;
    shown.forEach((ev, i) => {
      const isMessage = (ev.getType() === "m.room.message" || undecryptable(ev)) && !hidden(ev);
      if (isMessage) lastMessage = ev.getId();
      const target = isMessage ? ev.getId() : lastMessage;
      const users = room.getUsersReadUpTo(ev).filter((u) => u !== this.me);
      readHere[i] = users.length > 0;
      if (target && users.length) readers.set(target, [...(readers.get(target) ?? []), ...users]);
    });
    // Someone else's receipt at or after an event means their peer has it.
    const readLater = [...readHere];
    for (let i = readLater.length - 2; i >= 0; i--) readLater[i] ||= readLater[i + 1];
    shown.forEach((ev, i) => {
      if (hidden(ev)) return;
      if (undecryptable(ev)) {
        const sender = room.getMember(ev.getSender())?.name ?? ev.getSender();
        rows.push(
          h(
            "div.msg.undecryptable",
            { dataset: { eventId: ev.getId() ?? "", sender: ev.getSender() } },
            avatar(sender, ev.getSender()),
            h(
              "div.main",
              {},
              h("div.meta", {}, h("span.sender", { style: `color:${colourFor(ev.getSender())}` }, sender), h("span.time", {}, timeOf(ev.getTs()))),
              h("div.content", {}, h("div.undecrypted", {}, "🔒 This message cannot be read yet: its key has not reached this device.")),
            ),
          ),
        );
        previous = null;
      } else if (ev.getType() === "m.room.message") {
        const edit = edits.get(editKey(ev.getId(), ev.getSender()));
        const cont = previous && previous.getSender() === ev.getSender() && ev.getTs() - previous.getTs() < GROUP_MS;
        rows.push(
          this.messageRow(room, ev, {
            edit,
            reactions: reactions.get(ev.getId()),
            cont,
            peerHasIt: laterFromOthers[i] || readLater[i],
            readBy: readers.get(ev.getId()) ?? [],
          }),
        );
        previous = ev;
      } else if (ev.isState()) {
        const text = describeState(room, ev);
        if (text) rows.push(h("div.notice", {}, text));
        previous = null;
      }
    });
    el.replaceChildren(...rows);
    if (atBottom) el.scrollTop = el.scrollHeight;
    else el.scrollTop = el.scrollHeight - fromBottom;
    this.checkDelivery(shown);
    // A short room on a tall screen: fetch more until the timeline scrolls or the room starts.
    if (hasMore && el.scrollHeight <= el.clientHeight + 10) this.maybePaginate(room);
  }

  messageRow(room, ev, { edit, reactions, cont, peerHasIt, readBy }) {
    const mine = ev.getSender() === this.me;
    const sender = room.getMember(ev.getSender())?.name ?? ev.getSender();
    // An edit's new text is inside its (possibly encrypted) content.
    const content = edit ? edit.getOriginalContent()["m.new_content"] ?? ev.getOriginalContent() : ev.getOriginalContent();
    const body = h("div.content");
    const replyId = ev.getWireContent()["m.relates_to"]?.["m.in_reply_to"]?.event_id;
    if (replyId && !ev.isRedacted()) {
      const target = room.findEventById(replyId);
      body.append(
        h(
          "div.quote",
          { onclick: () => this.timelineEl.querySelector(`[data-event-id="${CSS.escape(replyId)}"]`)?.scrollIntoView({ block: "center" }) },
          target ? `${room.getMember(target.getSender())?.name ?? target.getSender()}: ${bodyOf(target)}` : "Reply to an earlier message",
        ),
      );
    }
    if (ev.isRedacted()) body.append(h("div.text.deleted", {}, "Message deleted"));
    else if (content.msgtype === "m.image" || content.msgtype === "m.file") {
      body.append(attachment(this.client, content, { onOpen: (url) => openPicture(url, content.body) }));
    } else {
      body.append(h("div.text", {}, stripReplyFallback(content.body ?? "")));
      if (edit) body.append(h("span.edited", {}, "(edited)"));
    }
    if (reactions?.size) {
      body.append(
        h(
          "div.reactions",
          {},
          [...reactions].map(([key, list]) => {
            const own = list.find((r) => r.getSender() === this.me);
            return h(
              "button" + (own ? ".mine" : ""),
              { title: list.map((r) => room.getMember(r.getSender())?.name ?? r.getSender()).join(", "), onclick: () => this.react(room, ev, key) },
              `${key} ${list.length}`,
            );
          }),
        ),
      );
    }
    const meta = h("div.meta", {}, h("span.sender", { style: `color:${colourFor(ev.getSender())}` }, sender), h("span.time", {}, timeOf(ev.getTs())));
    if (mine) meta.append(this.stateOf(room, ev, peerHasIt));
    const seenBy = [...new Set(readBy)].map((u) => room.getMember(u)?.name ?? u);
    const row = h(
      "div.msg" + (cont ? ".cont" : ""),
      { dataset: { eventId: ev.getId() ?? "", sender: ev.getSender() } },
      withPicture(this.client, avatar(sender, ev.getSender()), room.getMember(ev.getSender())?.getMxcAvatarUrl()),
      h("div.main", {}, meta, body),
      ev.isRedacted() ? "" : this.actions(room, ev, mine),
      seenBy.length ? h("div.seen", {}, `Seen by ${seenBy.join(", ")}`) : "",
    );
    return row;
  }

  /** Uploads and sends files one after another, each with a progress bar until it is sent. */
  async sendFiles(room, files) {
    for (const file of files) {
      const bar = h("progress", { max: 1, value: 0 });
      const row = h("div.upload", {}, h("span", {}, file.name), bar);
      this.uploadsEl.append(row);
      try {
        await sendFile(this.client, room, file, (fraction) => {
          if (fraction === null) bar.removeAttribute("value");
          else bar.value = fraction;
        });
      } catch (err) {
        toast(`${file.name} was not sent: ${describe(err)}`, { error: true });
      } finally {
        row.remove();
      }
    }
  }

  /** Where one of my messages is: sending, kept here, or on at least one other peer. */
  stateOf(room, ev, peerHasIt) {
    const status = ev.status;
    if (status === EventStatus.NOT_SENT) {
      return h(
        "span.state.failed",
        {},
        "Not sent ",
        h("button.icon", { onclick: () => attempt("Sending again", () => this.client.resendEvent(ev, room)) }, "Retry"),
      );
    }
    if (status && status !== EventStatus.SENT) return h("span.state.pending", { title: "Being saved in this browser" }, "Sending…");
    if (this.delivered.has(ev.getId()) || peerHasIt) {
      return h("span.state.delivered", { title: "Delivered to at least one other peer" }, "✓✓ Delivered");
    }
    return h("span.state.saved", { title: "Saved in this browser; goes out when a peer in the room is reachable" }, "✓ Saved");
  }

  /** Asks the homeserver which of my recent messages gossip has handed to a peer. */
  checkDelivery(events) {
    clearTimeout(this.deliveryTimer);
    const waiting = events
      .filter((ev) => ev.getSender() === this.me && !ev.status && ev.getId()?.startsWith("$") && !this.delivered.has(ev.getId()))
      .slice(-200)
      .map((ev) => ev.getId());
    if (!waiting.length) return;
    const answers = this.hs.delivered(waiting);
    let changed = false;
    waiting.forEach((id, i) => {
      if (answers[i]) {
        this.delivered.add(id);
        changed = true;
      }
    });
    if (changed) this.scheduleRender();
    else this.deliveryTimer = setTimeout(() => this.scheduleRender(), 1000);
  }

  actions(room, ev, mine) {
    return h(
      "div.actions",
      {},
      QUICK_REACTIONS.map((key) => h("button.icon", { title: `React ${key}`, onclick: () => this.react(room, ev, key) }, key)),
      h("button.icon", { title: "Reply", onclick: () => this.startReply(ev) }, "Reply"),
      mine ? h("button.icon", { title: "Edit", onclick: () => this.startEdit(ev) }, "Edit") : "",
      mine ? h("button.icon", { title: "Delete", onclick: () => attempt("Deleting", () => this.client.redactEvent(room.roomId, ev.getId())) }, "Delete") : "",
    );
  }

  async maybePaginate(room) {
    const el = this.timelineEl;
    if (this.paginating || !el || el.scrollTop > 300) return;
    if (this.hiddenBefore > 0) {
      // Loaded already: show more of it.
      this.revealEarlier = PAGE;
      this.scheduleRender();
      return;
    }
    const oldest = oldestTimeline(room);
    if (!oldest.getPaginationToken(EventTimeline.BACKWARDS)) return;
    this.paginating = true;
    try {
      await this.client.paginateEventTimeline(oldest, { backwards: true, limit: PAGE });
      this.revealEarlier = PAGE;
    } catch (err) {
      toast(`Could not load earlier messages: ${describe(err)}`, { error: true });
    } finally {
      this.paginating = false;
      this.scheduleRender();
    }
  }

  renderTyping(room) {
    const names = room
      .getMembers()
      .filter((m) => m.typing && m.userId !== this.me)
      .map((m) => m.name);
    this.typingEl.textContent =
      names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.slice(0, -1).join(", ")} and ${names.at(-1)} are typing…`;
  }

  /** Marks the newest event read when the person is looking at it. */
  sendReceipt(room) {
    if (document.hidden) return;
    const events = room.getLiveTimeline().getEvents();
    let last;
    for (let i = events.length - 1; i >= 0 && !last; i--) {
      if (!events[i].status && events[i].getId()?.startsWith("$")) last = events[i];
    }
    if (!last || this.readUpTo.get(room.roomId) === last.getId()) return;
    this.readUpTo.set(room.roomId, last.getId());
    if (last.getSender() === this.me) return;
    // One receipt per burst of messages: each is an EDU to every peer in the room and a sync
    // for them, so a fast conversation sends the newest one after a short pause.
    clearTimeout(this.receiptTimer);
    const send = () => attempt("Sending a read receipt", () => this.client.sendReadReceipt(last));
    const now = Date.now();
    if (now - (this.lastReceiptAt ?? 0) > RECEIPT_PAUSE_MS) {
      this.lastReceiptAt = now;
      send();
    } else {
      this.receiptTimer = setTimeout(() => {
        this.lastReceiptAt = Date.now();
        send();
      }, RECEIPT_PAUSE_MS);
    }
  }

  // ---- composing ------------------------------------------------------------------------

  renderComposerContext() {
    const target = this.editing ?? this.replyTo;
    if (!target) {
      this.contextEl.replaceChildren();
      return;
    }
    const what = this.editing ? "Editing" : `Replying to ${target.sender?.name ?? target.getSender()}`;
    this.contextEl.replaceChildren(
      h("div.context", {}, h("span", {}, `${what}: ${bodyOf(target)}`), h("button.icon", { onclick: () => this.cancelContext(), title: "Cancel (Esc)" }, "✕")),
    );
  }

  startReply(ev) {
    this.editing = null;
    this.replyTo = ev;
    this.renderComposerContext();
    this.composer.focus();
  }

  startEdit(ev) {
    this.replyTo = null;
    this.editing = ev;
    const current = this.edits?.get(editKey(ev.getId(), ev.getSender()))?.getWireContent()["m.new_content"]?.body ?? ev.getOriginalContent().body ?? "";
    this.composer.value = stripReplyFallback(current);
    this.renderComposerContext();
    this.composer.focus();
  }

  cancelContext() {
    if (this.editing) this.composer.value = "";
    this.editing = null;
    this.replyTo = null;
    this.renderComposerContext();
  }

  onComposerKey(e, room) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      this.send(room);
    } else if (e.key === "Escape") {
      this.cancelContext();
    } else if (e.key === "ArrowUp" && !this.composer.value) {
      const mine = room
        .getLiveTimeline()
        .getEvents()
        .filter((ev) => ev.getSender() === this.me && ev.getType() === "m.room.message" && !ev.isRedacted() && !ev.getWireContent()["m.relates_to"]?.rel_type)
        .at(-1);
      if (mine) {
        e.preventDefault();
        this.startEdit(mine);
      }
    }
  }

  onComposerInput(room) {
    const now = Date.now();
    clearTimeout(this.typingIdle);
    if (!this.composer.value) {
      this.stopTyping(room);
      return;
    }
    if (now - this.typingSent > TYPING_RENEW_MS) {
      this.typingSent = now;
      this.client.sendTyping(room.roomId, true, TYPING_IDLE_MS + 2000).catch(() => {});
    }
    this.typingIdle = setTimeout(() => this.stopTyping(room), TYPING_IDLE_MS);
  }

  stopTyping(room) {
    clearTimeout(this.typingIdle);
    if (!this.typingSent) return;
    this.typingSent = 0;
    this.client.sendTyping(room.roomId, false).catch(() => {});
  }

  send(room) {
    const text = this.composer.value.trim();
    if (!text) return;
    let content = { msgtype: "m.text", body: text };
    if (this.editing) {
      content = {
        msgtype: "m.text",
        body: `* ${text}`,
        "m.new_content": { msgtype: "m.text", body: text },
        "m.relates_to": { rel_type: "m.replace", event_id: this.editing.getId() },
      };
    } else if (this.replyTo) {
      content["m.relates_to"] = { "m.in_reply_to": { event_id: this.replyTo.getId() } };
    }
    this.composer.value = "";
    this.editing = null;
    this.replyTo = null;
    this.renderComposerContext();
    this.stopTyping(room);
    // The local echo shows at once; the promise settles when the homeserver has it on disk.
    this.client.sendMessage(room.roomId, content).catch((err) => toast(`Not sent: ${describe(err)}`, { error: true }));
    this.stickToBottom = true;
  }

  react(room, ev, key) {
    const own = this.reactions
      ?.get(ev.getId())
      ?.get(key)
      ?.find((r) => r.getSender() === this.me);
    if (own) {
      attempt("Removing the reaction", () => this.client.redactEvent(room.roomId, own.getId()));
    } else {
      attempt("Reacting", () =>
        this.client.sendEvent(room.roomId, "m.reaction", { "m.relates_to": { rel_type: "m.annotation", event_id: ev.getId(), key } }),
      );
    }
  }

  // ---- side panels ----------------------------------------------------------------------

  toggleSide(which) {
    this.side = this.side === which ? null : which;
    this.els.side.classList.toggle("hidden", !this.side);
    if (this.side) this.renderSide();
  }

  renderSide() {
    const close = h("button.icon", { onclick: () => this.toggleSide(this.side), "aria-label": "Close" }, "✕");
    if (this.side === "peers") this.els.side.replaceChildren(...this.peersPanel(close));
    else this.els.side.replaceChildren(...this.membersPanel(close));
  }

  membersPanel(close) {
    const room = this.roomId && this.client.getRoom(this.roomId);
    if (!room) return [h("h3", {}, "Members", close)];
    const online = this.onlineServers();
    // In an encrypted room, each other member's device can be verified by emoji.
    const encrypted = room.hasEncryptionStateEvent();
    const row = (m) => {
      const el = h(
        "div.member",
        { title: m.userId, dataset: { user: m.userId } },
        h("span.dot" + (online.has(serverOf(m.userId)) ? ".on" : ""), { title: online.has(serverOf(m.userId)) ? "Peer connected" : "Peer not connected" }),
        withPicture(this.client, avatar(m.name, m.userId, true), m.getMxcAvatarUrl()),
        h("span.who", {}, m.userId === this.me ? `${m.name} (you)` : m.name),
      );
      if (encrypted && m.userId !== this.me && m.membership === "join") {
        const verify = h(
          "button.small.verify",
          { type: "button", onclick: () => verifyUser(this.client, m.userId, m.name).then(() => this.side && this.renderSide()) },
          "Verify",
        );
        el.append(verify);
        isVerified(this.client, m.userId).then(
          (yes) => yes && verify.replaceWith(h("span.tag.verified", { title: "You verified this person's device" }, "✓ Verified")),
          () => {},
        );
      }
      return el;
    };
    const joined = room.getJoinedMembers().sort((a, b) => a.name.localeCompare(b.name));
    const invited = room.getMembersWithMembership("invite");
    return [
      h("h3", {}, `Members (${joined.length})`, close),
      h("div", { id: "members" }, joined.map(row)),
      invited.length ? h("h3", {}, "Invited") : "",
      invited.map(row),
    ];
  }

  peersPanel(close) {
    const { bootstrap, catch_up } = this.status;
    // One line per peer; a peer reached both ways counts as direct.
    const byPeer = new Map();
    for (const c of this.status.connections) {
      const seen = byPeer.get(c.peer_id);
      if (!seen || (seen.relayed && !c.relayed)) byPeer.set(c.peer_id, c);
    }
    const connections = [...byPeer.values()];
    return [
      h("h3", {}, "Peers", close),
      h("label", {}, "This homeserver"),
      h("div.mono", { style: "word-break:break-all" }, this.hs.serverName),
      h("label", {}, "Bootstrap"),
      bootstrap.length
        ? bootstrap.map((b) =>
            h(
              "div.peer",
              {},
              h("span.dot" + (b.connected ? ".on" : "")),
              h("span.who.mono", { title: b.address }, b.address),
              h("span.tag", {}, b.connected ? "connected" : "connecting…"),
            ),
          )
        : h("div.muted", {}, "None: set one in Settings."),
      h("label", {}, `Connected peers (${connections.length})`),
      h(
        "div",
        { id: "peer-list" },
        connections.length
          ? connections.map((c) =>
              h(
                "div.peer",
                { title: `${c.peer_id}\n${c.address}` },
                h("span.dot.on"),
                h("span.who.mono", {}, c.bootstrap ? `${short(c.peer_id, 14)} (bootstrap)` : short(c.server_name ?? c.peer_id, 14)),
                h("span.tag", {}, c.relayed ? "relayed" : "direct"),
              ),
            )
          : h("div.muted", {}, "Nobody yet."),
      ),
      catch_up.active ? h("p.muted", {}, `Catching up: ${catch_up.fetched} events fetched`) : "",
    ];
  }

  // ---- dialogs and actions --------------------------------------------------------------

  async settings() {
    await openSettings({
      hs: this.hs,
      client: this.client,
      displayName: this.displayName ?? "",
      onRecoveryKey: () => this.protectHistory(),
      onAvatar: async (file) => {
        const done = await attempt("Setting your picture", async () => {
          const content_uri = await upload(this.client, file, { name: file.name, type: file.type });
          await this.client.setAvatarUrl(content_uri);
          return content_uri;
        });
        if (done !== undefined) {
          this.avatarUrl = done;
          this.renderMe();
        }
      },
      onRename: async (name) => {
        const done = await attempt("Changing your name", () => this.client.setDisplayName(name));
        if (done !== undefined) this.displayName = name;
      },
    });
    this.render();
  }

  newRoomDialog() {
    return dialog((close) => {
      const name = h("input", { type: "text", id: "room-name-input", required: true, maxlength: 80, autofocus: true });
      const topic = h("input", { type: "text", id: "room-topic-input", maxlength: 200 });
      const priv = h("input", { type: "radio", name: "visibility", value: "private", checked: true });
      const pub = h("input", { type: "radio", name: "visibility", value: "public" });
      // Private rooms are encrypted unless asked otherwise; open rooms only when asked.
      const encrypted = h("input", { type: "checkbox", id: "room-encrypted-input", checked: true });
      let touched = false;
      encrypted.addEventListener("change", () => (touched = true));
      for (const radio of [priv, pub]) {
        radio.addEventListener("change", () => {
          if (!touched) encrypted.checked = priv.checked;
        });
      }
      const create = h("button.primary", { type: "submit", id: "create-room" }, "Create");
      return h(
        "form",
        {
          onsubmit: async (e) => {
            e.preventDefault();
            create.disabled = true;
            const res = await attempt("Creating the room", () =>
              this.client.createRoom({
                name: name.value.trim(),
                topic: topic.value.trim() || undefined,
                preset: pub.checked ? "public_chat" : "private_chat",
                visibility: pub.checked ? "public" : "private",
                initial_state: encrypted.checked ? [ENCRYPTION] : [],
              }),
            );
            close();
            if (res?.room_id) await this.openWhenKnown(res.room_id);
          },
        },
        h("h2", {}, "New room"),
        h("label", { for: "room-name-input" }, "Name"),
        name,
        h("label", { for: "room-topic-input" }, "Topic (optional)"),
        topic,
        h("label", {}, "Who can join"),
        h("div.radio", {}, h("label", {}, priv, "Invited people only"), h("label", {}, pub, "Anyone with the link")),
        h("label.check", { for: "room-encrypted-input" }, encrypted, "End-to-end encrypted"),
        h("div.actions", {}, h("button", { type: "button", onclick: () => close() }, "Cancel"), create),
      );
    });
  }

  editRoomDialog(room) {
    const topicNow = room.currentState.getStateEvents("m.room.topic", "")?.getContent().topic ?? "";
    const nameNow = room.currentState.getStateEvents("m.room.name", "")?.getContent().name ?? "";
    return dialog((close) => {
      const name = h("input", { type: "text", id: "edit-room-name", value: nameNow, maxlength: 80, autofocus: true });
      const topic = h("input", { type: "text", id: "edit-room-topic", value: topicNow, maxlength: 200 });
      return h(
        "form",
        {
          onsubmit: async (e) => {
            e.preventDefault();
            close();
            if (name.value.trim() !== nameNow) {
              await attempt("Renaming the room", () => this.client.setRoomName(room.roomId, name.value.trim()));
            }
            if (topic.value.trim() !== topicNow) {
              await attempt("Changing the topic", () => this.client.setRoomTopic(room.roomId, topic.value.trim()));
            }
          },
        },
        h("h2", {}, "Room details"),
        h("label", { for: "edit-room-name" }, "Name"),
        name,
        h("label", { for: "edit-room-topic" }, "Topic"),
        topic,
        h("div.actions", {}, h("button", { type: "button", onclick: () => close() }, "Cancel"), h("button.primary", { type: "submit", id: "save-room" }, "Save")),
      );
    });
  }

  inviteDialog(room) {
    return dialog((close) => {
      const user = h("input", { type: "text", id: "invite-user", placeholder: "@name:server", autofocus: true, required: true });
      return h(
        "form",
        {
          onsubmit: async (e) => {
            e.preventDefault();
            const id = user.value.trim();
            if (!/^@[^:\s]+:\S+$/.test(id)) {
              toast("A user ID looks like @name:server", { error: true });
              return;
            }
            close();
            const ok = await attempt(`Inviting ${id}`, () => this.client.invite(room.roomId, id));
            if (ok !== undefined) toast(`Invited ${id}`);
          },
        },
        h("h2", {}, `Invite to ${room.name}`),
        h("label", { for: "invite-user" }, "User ID"),
        user,
        h("p.muted", {}, "Their peer must be reachable: they get the invite the next time it is."),
        h("div.actions", {}, h("button", { type: "button", onclick: () => close() }, "Cancel"), h("button.primary", { type: "submit" }, "Invite")),
      );
    });
  }

  shareDialog(room) {
    const link = joinLink(room.roomId, this.hs.serverName, this.relayedAddress());
    const joinRule = room.getJoinRule();
    return dialog((close) => {
      const input = h("input", { type: "text", id: "join-link", readonly: true, value: link });
      return h(
        "div.dialog-body",
        {},
        h("h2", {}, "Share a join link"),
        h("p.muted", {}, "Opened in another browser running Hyphae, this link joins the room through this tab's peer."),
        joinRule === "public" ? "" : h("p.muted", {}, "This room is invite-only: invite the person too, or the join is refused."),
        h("div.link-box", {}, input, h("button.primary", { onclick: () => copy(link, "Link copied") }, "Copy")),
        h("div.actions", {}, h("button", { onclick: () => close() }, "Done")),
      );
    });
  }

  async leave(room) {
    if (!confirm(`Leave ${room.name}?`)) return;
    const ok = await attempt("Leaving the room", () => this.client.leave(room.roomId));
    if (ok !== undefined) {
      this.roomId = this.joinedRooms().find((r) => r.roomId !== room.roomId)?.roomId ?? null;
      this.render();
    }
  }

  /** Waits until sync has delivered `roomId` as joined, then opens it. */
  openWhenKnown(roomId) {
    return new Promise((resolve) => {
      const check = () => {
        if (this.client.getRoom(roomId)?.getMyMembership() === "join") {
          this.client.off(ClientEvent.Sync, check);
          this.client.off(RoomEvent.MyMembership, check);
          this.openRoom(roomId);
          resolve();
          return true;
        }
        return false;
      };
      if (!check()) {
        this.client.on(ClientEvent.Sync, check);
        this.client.on(RoomEvent.MyMembership, check);
      }
    });
  }

  /** Joins the room a `#/join/…` link names (dialling the peer it names first). */
  async followJoinLink() {
    const link = parseJoinLink(location.hash);
    if (!link) return;
    history.replaceState(null, "", location.pathname + location.search);
    if (this.client.getRoom(link.roomId)?.getMyMembership() === "join") {
      this.openRoom(link.roomId);
      return;
    }
    if (link.peer) attempt("Reaching the peer in the link", async () => this.hs.dial(link.peer));
    await this.join(link.roomId, link.via ? [link.via] : []);
  }

  /**
   * Joins through `via`, retrying while the peer that can let us in is still being reached
   * (a fresh tab needs a moment to connect through the relay).
   */
  async join(roomId, via) {
    const note = h("div.banner", { id: "joining" }, "Joining the room…");
    this.els.banner.append(note);
    let delay = 250;
    const deadline = Date.now() + 30_000;
    for (;;) {
      try {
        await this.client.joinRoom(roomId, { viaServers: via });
        note.remove();
        await this.openWhenKnown(roomId);
        return;
      } catch (err) {
        const retry = Date.now() < deadline && (err.errcode === "M_UNKNOWN" || err.errcode === "M_NOT_FOUND" || !err.errcode);
        if (!retry) {
          note.remove();
          toast(`Could not join: ${describe(err)}`, { error: true });
          return;
        }
        note.textContent = `Joining the room… (${describe(err)}; trying again)`;
        await new Promise((r) => setTimeout(r, delay));
        delay = Math.min(delay * 2, 4000);
      }
    }
  }
}

/**
 * The live timeline with the ones linked before it. After a gap (a limited sync) the SDK starts
 * a new live timeline; paginating back links it to the older one once they meet.
 */
function oldestTimeline(room) {
  let timeline = room.getLiveTimeline();
  for (let before; (before = timeline.getNeighbouringTimeline(EventTimeline.BACKWARDS)); ) timeline = before;
  return timeline;
}

/** An edit applies only when its sender sent the original: the key pairs the two. */
function editKey(eventId, sender) {
  return `${eventId} ${sender}`;
}

/** Every event loaded for the room's live timeline chain, oldest first. */
function loadedEvents(room) {
  const parts = [];
  for (let t = room.getLiveTimeline(); t; t = t.getNeighbouringTimeline(EventTimeline.BACKWARDS)) parts.push(t.getEvents());
  return parts.reverse().flat();
}

function bodyOf(ev) {
  if (ev.isRedacted()) return "Message deleted";
  const content = ev.getContent();
  return stripReplyFallback(content.body ?? `(${ev.getType()})`).split("\n")[0].slice(0, 120);
}

/** Drops the `> <@user> quoted` lines older clients put in front of a reply. */
function stripReplyFallback(body) {
  if (!body.startsWith("> ")) return body;
  const lines = body.split("\n");
  const start = lines.findIndex((l) => !l.startsWith("> "));
  return start < 0 ? body : lines.slice(start).join("\n").replace(/^\n/, "");
}

function lastMessage(room) {
  const events = room.getLiveTimeline().getEvents();
  for (let i = events.length - 1; i >= 0; i--) {
    const ev = events[i];
    if (ev.getType() === "m.room.message" && ev.getWireContent()["m.relates_to"]?.rel_type !== "m.replace") return ev;
  }
  return null;
}

/** For each index: whether a later event came from another server (which then had ours). */
function laterForeignIndex(events, myServer) {
  const result = new Array(events.length).fill(false);
  let seen = false;
  for (let i = events.length - 1; i >= 0; i--) {
    result[i] = seen;
    if (!events[i].status && serverOf(events[i].getSender()) !== myServer) seen = true;
  }
  return result;
}

/** Words for a state change: membership, name, topic, creation. */
function describeState(room, ev) {
  const who = room.getMember(ev.getSender())?.name ?? ev.sender?.name ?? ev.getSender();
  const content = ev.getContent();
  const prev = ev.getPrevContent();
  switch (ev.getType()) {
    case "m.room.create":
      return `${who} created the room`;
    case "m.room.name":
      return content.name ? `${who} renamed the room to “${content.name}”` : `${who} removed the room name`;
    case "m.room.topic":
      return content.topic ? `${who} set the topic: ${content.topic}` : `${who} removed the topic`;
    case "m.room.member": {
      const target = content.displayname ?? ev.target?.name ?? ev.getStateKey();
      const was = prev.membership;
      switch (content.membership) {
        case "join":
          if (was === "join") {
            return prev.displayname !== content.displayname ? `${prev.displayname ?? ev.getStateKey()} is now ${content.displayname ?? ev.getStateKey()}` : null;
          }
          return `${target} joined`;
        case "invite":
          return `${who} invited ${target}`;
        case "leave":
          if (ev.getSender() !== ev.getStateKey()) return was === "ban" ? `${who} unbanned ${prev.displayname ?? ev.getStateKey()}` : `${who} removed ${prev.displayname ?? ev.getStateKey()}`;
          return was === "invite" ? `${target} declined the invite` : `${prev.displayname ?? target} left`;
        case "ban":
          return `${who} banned ${prev.displayname ?? ev.getStateKey()}`;
        default:
          return null;
      }
    }
    case "m.room.join_rules":
      return `${who} made the room ${content.join_rule === "public" ? "open to anyone with the link" : "invite-only"}`;
    default:
      return null;
  }
}
