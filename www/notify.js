// Browser notifications for what the user's push rules highlight (mentions, keywords) and for
// direct messages, once the user allowed them in Settings. Only live events from others, and
// only when the page is hidden or another room is open.
import { MatrixEventEvent, RoomEvent } from "matrix-js-sdk";

const KEY = "hyphae:notify";

export const notificationsWanted = () => localStorage.getItem(KEY) === "on";

/** Turns browser notifications on (asking the browser's permission) or off; resolves to the outcome. */
export async function setNotifications(on) {
  if (!on) {
    localStorage.removeItem(KEY);
    return false;
  }
  if (typeof Notification === "undefined") return false;
  const permission = Notification.permission === "granted" ? "granted" : await Notification.requestPermission();
  if (permission !== "granted") return false;
  localStorage.setItem(KEY, "on");
  return true;
}

function isDirect(client, room) {
  const direct = client.getAccountData("m.direct")?.getContent() ?? {};
  return Object.values(direct).some((rooms) => Array.isArray(rooms) && rooms.includes(room.roomId));
}

/**
 * Shows a notification for each live event the rules make notify and highlight, or that is in
 * a direct chat. `activeRoom()` names the room on screen; `open(roomId)` shows one. Returns a
 * function that stops it.
 */
export function watchForNotifications(client, { activeRoom, open }) {
  const consider = (ev, room) => {
    if (!notificationsWanted() || typeof Notification === "undefined" || Notification.permission !== "granted") return;
    if (ev.getSender() === client.getUserId() || ev.getType() !== "m.room.message") return;
    if (!document.hidden && room.roomId === activeRoom()) return;
    const actions = client.getPushActionsForEvent(ev, true);
    if (!actions?.notify) return;
    if (!actions.tweaks?.highlight && !isDirect(client, room)) return;
    const sender = room.getMember(ev.getSender())?.name ?? ev.getSender();
    const shown = new Notification(room.name, { body: `${sender}: ${ev.getContent().body ?? ""}`, tag: ev.getId() });
    shown.onclick = () => {
      window.focus();
      open(room.roomId);
      shown.close();
    };
  };
  const onTimeline = (ev, room, toStart, removed, data) => {
    if (toStart || removed || !data?.liveEvent || !room) return;
    // An encrypted message is judged once it is readable.
    if (ev.isEncrypted() && ev.isBeingDecrypted()) ev.once(MatrixEventEvent.Decrypted, () => consider(ev, room));
    else consider(ev, room);
  };
  client.on(RoomEvent.Timeline, onTimeline);
  return () => client.off(RoomEvent.Timeline, onTimeline);
}
