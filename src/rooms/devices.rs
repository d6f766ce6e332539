//! Devices across peers: key queries and claims, to-device messages and device-list changes.
//!
//! The keys themselves live with the client API, in its store. The room service decides who may
//! ask: a server is told about a user's devices, may claim their keys, may send them to-device
//! messages and may announce its own users' device changes only when the two users' servers
//! share a room (each side joined or invited), or when an invite from that server is pending
//! here. Everything else is refused as if the user had no devices. What passes goes to the
//! client API through a bounded queue; a full queue answers `LimitExceeded`.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use ruma::events::StateEventType;
use ruma::{OwnedUserId, UserId};
use tokio::sync::{mpsc, oneshot};

use super::visibility::Membership;
use super::{NodeError, P2pNode};
use crate::identity::ServerName;
use crate::net::protocol::{FedErrorCode, FedRequest, FedResponse};
use crate::net::rt;

/// Device requests from peers waiting for the client API; past this a peer is told `busy`.
pub const DEVICE_QUEUE: usize = 64;

/// What membership means for one user's device lists, as of now.
#[derive(Debug, Default)]
pub struct DeviceListNews {
    /// Users they newly share a room with, because someone (they, or the other) joined or was
    /// invited: their devices are to be fetched.
    pub changed: BTreeSet<OwnedUserId>,
    /// Users they no longer share any room with: to stop tracking.
    pub left: BTreeSet<OwnedUserId>,
    /// Everyone they share a room with now (each joined or invited).
    pub sharing: HashSet<OwnedUserId>,
}

/// What a peer asks of this server's users' devices, once the room service let it through.
#[derive(Debug)]
pub enum DeviceAsk {
    /// Keys of these users (each shares a room with the asker).
    QueryKeys { user_ids: Vec<OwnedUserId> },
    /// One key per device of these users (each shares a room with the asker).
    ClaimKeys {
        claims: BTreeMap<OwnedUserId, BTreeMap<String, String>>,
    },
    /// Messages from `sender` for these local users (each shares a room with the sender).
    ToDevice {
        seq: u64,
        sender: OwnedUserId,
        kind: String,
        messages: BTreeMap<OwnedUserId, serde_json::Map<String, serde_json::Value>>,
    },
    /// The asker's user changed its devices.
    DeviceListChanged { user_id: OwnedUserId },
}

/// One request for the client API to answer through `reply`.
#[derive(Debug)]
pub struct DeviceRequest {
    pub asker: ServerName,
    pub ask: DeviceAsk,
    pub reply: oneshot::Sender<FedResponse>,
}

/// The two ends of the queue; the client API takes the receiver once.
pub(super) struct DeviceQueue {
    pub(super) tx: mpsc::Sender<DeviceRequest>,
    pub(super) rx: std::sync::Mutex<Option<mpsc::Receiver<DeviceRequest>>>,
}

impl DeviceQueue {
    pub(super) fn new() -> Self {
        let (tx, rx) = mpsc::channel(DEVICE_QUEUE);
        Self {
            tx,
            rx: std::sync::Mutex::new(Some(rx)),
        }
    }
}

fn refuse(code: FedErrorCode, reason: impl Into<String>) -> FedResponse {
    FedResponse::error(code, reason)
}

impl P2pNode {
    /// The queue of device requests peers make (for the client API, which answers them).
    /// `None` once taken.
    pub fn take_device_requests(&self) -> Option<mpsc::Receiver<DeviceRequest>> {
        self.shared.devices.rx.lock().expect("device queue").take()
    }

    /// Answers a device request from `asker` (through the client API, if it passes).
    pub(super) async fn answer_devices(
        &self,
        asker: &ServerName,
        request: FedRequest,
    ) -> Result<FedResponse, NodeError> {
        let own = |user: &UserId| ServerName::try_from(user.server_name()).ok();
        let ask = match request {
            FedRequest::QueryKeys { user_ids } => {
                let sharing = self.local_users_sharing_with(asker, None).await?;
                let allowed = user_ids
                    .into_iter()
                    .filter(|u| sharing.contains(u))
                    .collect();
                DeviceAsk::QueryKeys { user_ids: allowed }
            }
            FedRequest::ClaimKeys { claims } => {
                let sharing = self.local_users_sharing_with(asker, None).await?;
                let allowed = claims
                    .into_iter()
                    .filter(|(u, _)| sharing.contains(u))
                    .collect();
                DeviceAsk::ClaimKeys { claims: allowed }
            }
            FedRequest::ToDevice {
                seq,
                sender,
                kind,
                messages,
            } => {
                if own(&sender) != Some(*asker) {
                    tracing::warn!(server = %asker, %sender, "to-device for another server's user refused");
                    return Ok(refuse(
                        FedErrorCode::Forbidden,
                        "a server sends to-device only for its own users",
                    ));
                }
                let Ok(parsed) = serde_json::from_str::<
                    BTreeMap<OwnedUserId, serde_json::Map<String, serde_json::Value>>,
                >(&messages) else {
                    tracing::warn!(server = %asker, "malformed to-device messages refused");
                    return Ok(refuse(
                        FedErrorCode::BadRequest,
                        "messages: not user → device → content",
                    ));
                };
                let sharing = self.local_users_sharing_with(asker, Some(&sender)).await?;
                let mut allowed = BTreeMap::new();
                for (user, devices) in parsed {
                    if sharing.contains(&user) {
                        allowed.insert(user, devices);
                    } else {
                        tracing::info!(server = %asker, %user, "to-device for a user sharing no room dropped");
                    }
                }
                DeviceAsk::ToDevice {
                    seq,
                    sender,
                    kind,
                    messages: allowed,
                }
            }
            FedRequest::DeviceListChanged { user_id, .. } => {
                if own(&user_id) != Some(*asker) {
                    return Ok(refuse(
                        FedErrorCode::Forbidden,
                        "a server speaks only for its own users",
                    ));
                }
                if self.servers_sharing_with(&user_id).await?.is_empty() {
                    return Ok(FedResponse::Ok);
                }
                DeviceAsk::DeviceListChanged { user_id }
            }
            _ => return Ok(refuse(FedErrorCode::BadRequest, "not a device request")),
        };
        let (reply, answer) = oneshot::channel();
        let request = DeviceRequest {
            asker: *asker,
            ask,
            reply,
        };
        if self.shared.devices.tx.try_send(request).is_err() {
            return Ok(refuse(FedErrorCode::LimitExceeded, "busy"));
        }
        Ok(answer
            .await
            .unwrap_or_else(|_| refuse(FedErrorCode::Internal, "the client API is not running")))
    }

    /// The local users who share a room with `server` (with its user `other`, if named): both
    /// joined or invited to one room held here, or an invite from that server (user) pending
    /// here. One pass over the rooms, however many users a request names.
    async fn local_users_sharing_with(
        &self,
        server: &ServerName,
        other: Option<&UserId>,
    ) -> Result<HashSet<OwnedUserId>, NodeError> {
        let me = self.server_name();
        let server_of = |u: &UserId| ServerName::try_from(u.server_name()).ok();
        let theirs = |u: &UserId| match other {
            Some(o) => u == o,
            None => server_of(u) == Some(*server),
        };
        let mut sharing: HashSet<OwnedUserId> = self
            .invites()
            .into_iter()
            .filter(|i| theirs(&i.sender))
            .map(|i| i.invitee)
            .collect();
        for room in self.shared.engine.rooms().await? {
            let members = present_members(self, &room).await?;
            if members.iter().any(|m| theirs(m)) {
                sharing.extend(members.into_iter().filter(|m| server_of(m) == Some(me)));
            }
        }
        Ok(sharing)
    }

    /// The other servers with a member (joined or invited) in a room where `user` is joined or
    /// invited: who is told of `user`'s device changes.
    pub async fn servers_sharing_with(
        &self,
        user: &UserId,
    ) -> Result<BTreeSet<ServerName>, NodeError> {
        let mut servers = BTreeSet::new();
        for room in self.shared.engine.rooms().await? {
            let members = present_members(self, &room).await?;
            if !members.contains(user) {
                continue;
            }
            servers.extend(
                members
                    .iter()
                    .filter_map(|m| ServerName::try_from(m.server_name()).ok()),
            );
        }
        for invite in self.invites() {
            if invite.invitee == user {
                servers.extend(ServerName::try_from(invite.sender.server_name()).ok());
            }
        }
        servers.remove(&self.server_name());
        Ok(servers)
    }

    /// What membership between event-stream positions `from..to` means for `user`'s device
    /// lists (see [`DeviceListNews`]).
    pub async fn membership_device_changes(
        &self,
        user: &UserId,
        from: u64,
        to: u64,
    ) -> Result<DeviceListNews, NodeError> {
        let engine = &self.shared.engine;
        let window = from..to;
        let moved =
            |ev: &crate::engine::pdu::StoredEvent| ev.stream.is_some_and(|p| window.contains(&p));
        let mut changed = BTreeSet::new();
        let mut gone = BTreeSet::new();
        let mut still_shared = HashSet::new();
        for room in engine.rooms().await? {
            let Some(state) = engine.current_state_map(&room).await? else {
                continue;
            };
            let ids: Vec<&ruma::OwnedEventId> = state
                .iter()
                .filter(|((kind, _), _)| *kind == StateEventType::RoomMember)
                .map(|(_, id)| id)
                .collect();
            let members = engine.events(&ids).await?;
            let Some(mine) = members
                .iter()
                .find(|ev| ev.pdu.state_key.as_deref() == Some(user.as_str()))
            else {
                continue;
            };
            let i_present = is_present(mine);
            let i_moved = moved(mine);
            if !i_present && !i_moved {
                continue;
            }
            for ev in &members {
                let Some(other) = ev
                    .pdu
                    .state_key
                    .as_deref()
                    .and_then(|k| OwnedUserId::try_from(k).ok())
                else {
                    continue;
                };
                if other == user {
                    continue;
                }
                let present = is_present(ev);
                if i_present && present {
                    if i_moved || moved(ev) {
                        changed.insert(other.clone());
                    }
                    still_shared.insert(other);
                } else if (i_present && moved(ev)) || (i_moved && present) {
                    // They left a room of ours, or we left one of theirs.
                    gone.insert(other);
                }
            }
        }
        gone.retain(|u| !still_shared.contains(u));
        Ok(DeviceListNews {
            changed,
            left: gone,
            sharing: still_shared,
        })
    }

    /// Tells every server sharing a room with `user` (of this server) that its devices changed.
    /// Best effort: a server that is away re-queries when its cache entry expires.
    pub fn announce_device_change(&self, user: &UserId, stream_id: u64) {
        let node = self.clone();
        let user = user.to_owned();
        rt::spawn(async move {
            let Ok(servers) = node.servers_sharing_with(&user).await else {
                return;
            };
            for server in servers {
                let request = FedRequest::DeviceListChanged {
                    user_id: user.clone(),
                    stream_id,
                };
                let node = node.clone();
                rt::spawn(async move {
                    if let Err(e) = node.request_with(server.peer_id(), request, false).await {
                        tracing::debug!(%server, error = %e, "device change not delivered");
                    }
                });
            }
        });
    }

    /// Peers as they connect, so work waiting for one (to-device retries) can go on.
    pub fn connected_peer_events(&self) -> tokio::sync::broadcast::Receiver<libp2p::PeerId> {
        self.shared.connected.subscribe()
    }
}

/// The users joined to or invited to `room`, as its current state says.
async fn present_members(
    node: &P2pNode,
    room: &ruma::RoomId,
) -> Result<HashSet<OwnedUserId>, NodeError> {
    let engine = &node.shared.engine;
    let Some(state) = engine.current_state_map(room).await? else {
        return Ok(HashSet::new());
    };
    let members: Vec<(OwnedUserId, &ruma::OwnedEventId)> = state
        .iter()
        .filter(|((kind, _), _)| *kind == StateEventType::RoomMember)
        .filter_map(|((_, key), id)| Some((OwnedUserId::try_from(key.as_str()).ok()?, id)))
        .collect();
    let ids: Vec<&ruma::OwnedEventId> = members.iter().map(|(_, id)| *id).collect();
    let present: HashSet<ruma::OwnedEventId> = engine
        .events(&ids)
        .await?
        .into_iter()
        .filter(|ev| is_present(ev))
        .map(|ev| ev.pdu.event_id.clone())
        .collect();
    Ok(members
        .into_iter()
        .filter(|(_, id)| present.contains(*id))
        .map(|(user, _)| user)
        .collect())
}

/// Whether a member event leaves its user joined or invited.
fn is_present(member: &crate::engine::pdu::StoredEvent) -> bool {
    let content = serde_json::from_str(member.pdu.content.get()).unwrap_or_default();
    matches!(
        Membership::parse(&content),
        Membership::Join | Membership::Invite
    )
}
