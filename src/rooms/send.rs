//! Local sends: creating rooms, and group commit — queued sends share one durable write, then
//! go out to the room's servers.

use ruma::{OwnedRoomId, RoomId};
use tokio::sync::oneshot;

use super::{now, NodeError, P2pNode, TxnSend};
use crate::engine::create_room::CreateRoom;
use crate::engine::{LocalEvent, Received};
use crate::net::rt;

impl P2pNode {
    /// Creates a room as `localpart` and announces it.
    pub async fn create_room(
        &self,
        localpart: &str,
        opts: &CreateRoom,
    ) -> Result<OwnedRoomId, NodeError> {
        let (room_id, ids) = self
            .shared
            .engine
            .create_room(&self.shared.identity, &self.user(localpart), opts, now())
            .await?;
        // Avatars its first events name (the creator's, the room's) may be fetched by the
        // room's servers.
        for ev in self
            .shared
            .engine
            .events(&ids.iter().collect::<Vec<_>>())
            .await?
        {
            let content = serde_json::from_str(ev.pdu.content.get()).unwrap_or_default();
            self.note_media_refs(&room_id, &content, Some(&ev.pdu.event_id))
                .await;
        }
        self.push_events(&room_id, &ids).await;
        for invitee in &opts.invite {
            self.deliver_invite(&room_id, invitee).await?;
        }
        self.changed();
        Ok(room_id)
    }

    /// Sends an event as `localpart`; returns once it is durable here (delivery is in the background).
    pub async fn send(
        &self,
        room_id: &RoomId,
        localpart: &str,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
    ) -> Result<Received, NodeError> {
        self.send_with(room_id, localpart, kind, state_key, content, None)
            .await
    }

    /// [`P2pNode::send`] for a client transaction (see [`TxnSend`]).
    pub async fn send_with(
        &self,
        room_id: &RoomId,
        localpart: &str,
        kind: &str,
        state_key: Option<&str>,
        content: serde_json::Value,
        txn: Option<TxnSend>,
    ) -> Result<Received, NodeError> {
        let (also_write, hold) = match txn {
            Some(TxnSend { record, hold }) => (Some(record), Some(hold)),
            None => (None, None),
        };
        let (reply, rx) = oneshot::channel();
        // Noted before the event is stored (for the room, as its id is not known yet): once
        // anyone can see the event, the servers that may see it can fetch what it names.
        let named = self.note_media_refs(room_id, &content, None).await;
        let event = LocalEvent {
            room_id: room_id.to_owned(),
            sender: self.user(localpart),
            kind: kind.to_owned(),
            state_key: state_key.map(str::to_owned),
            content,
            also_write,
        };
        self.shared
            .send_queue
            .lock()
            .expect("send queue lock")
            .push((event, reply, hold));
        // The commit runs in its own task so that a caller that gives up (a client that hangs
        // up) cannot strand the other senders whose events share the commit.
        let node = self.clone();
        rt::spawn(async move { node.commit_queued_sends().await });
        let sent = rx.await.map_err(|_| NodeError::Stopped)??;
        self.settle_media_refs(room_id, &named, &sent.event_id)
            .await;
        Ok(sent)
    }

    /// Group commit: whoever gets the turn signs and stores every queued send in one durable
    /// write, then answers each sender. Under load one commit carries many events; alone, a send
    /// commits at once. The turn passes on once the batch is sealed, so the next batch is
    /// signed while this one is on the disk; answers and pushes keep the commits' order.
    async fn commit_queued_sends(&self) {
        let turn = self.shared.send_turn.lock().await;
        let jobs = std::mem::take(&mut *self.shared.send_queue.lock().expect("send queue lock"));
        if jobs.is_empty() {
            return;
        }
        // The holds go with the replies: let go once their sender is answered.
        let (events, replies): (Vec<_>, Vec<_>) = jobs
            .into_iter()
            .map(|(event, reply, hold)| (event, (reply, hold)))
            .unzip();
        let sealed = self
            .shared
            .engine
            .seal_many(&self.shared.identity, events, now())
            .await;
        let _answer_turn = self.shared.answer_turn.lock().await;
        drop(turn);
        let stored = match sealed {
            Ok((results, write)) => write.durable().await.map(|()| results),
            Err(e) => Err(e),
        };
        match stored {
            Ok(results) => {
                // Pushed per room, in commit order, before anyone is answered.
                let mut by_room: Vec<(ruma::OwnedRoomId, Vec<ruma::OwnedEventId>)> = Vec::new();
                for r in results.iter().flatten() {
                    match by_room.iter_mut().find(|(room, _)| *room == r.room_id) {
                        Some((_, ids)) => ids.push(r.event_id.clone()),
                        None => by_room.push((r.room_id.clone(), vec![r.event_id.clone()])),
                    }
                }
                for (room_id, ids) in &by_room {
                    self.push_events(room_id, ids).await;
                }
                for (result, (reply, _hold)) in results.into_iter().zip(replies) {
                    let _ = reply.send(result.map_err(NodeError::from));
                }
                self.changed();
            }
            Err(e) => {
                tracing::error!(error = %e, "storing local events failed");
                for (reply, _hold) in replies {
                    let e = crate::store::StoreError::Backend(e.to_string());
                    let _ = reply.send(Err(NodeError::Store(e)));
                }
            }
        }
    }
}
