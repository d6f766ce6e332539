//! To-device messages: `/sendToDevice` stores messages for local devices at once and queues
//! those for other servers' devices in a durable outbox, in the same write, before it answers.
//! The outbox is delivered in order, one batch at a time per server, and retried until that
//! server takes it (when new messages are queued, when the server's peer connects, and every
//! [`RETRY_EVERY`]). The receiving server takes a batch once: each carries a sequence number
//! that grows per sending server, and a batch at or below the last one taken is acknowledged
//! without being stored again.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use ruma::{OwnedUserId, UserId};
use serde_json::{json, Map, Value};

use super::accounts::Session;
use super::error::{ApiError, ApiResult};
use super::key_data::Outgoing;
use super::{ok, parse, ApiRequest, ApiResponse, ClientApi};
use crate::identity::ServerName;
use crate::net::protocol::{FedErrorCode, FedRequest, MAX_TO_DEVICE_BYTES};
use crate::net::rt;
use crate::rooms::NodeError;

/// How often the outbox is retried when nothing else wakes it.
pub const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(30);
/// How long one delivery may take before it is retried later.
const DELIVERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// How long to wait when the receiving server says this one is over its request rate, or a
/// delivery failed on the network.
const RATE_BACKOFF: std::time::Duration = std::time::Duration::from_millis(500);
/// Network failures in a row retried at once before waiting for the next wake-up.
const NETWORK_RETRIES: u32 = 3;
/// Batches kept for one server that is away; past this, senders are told to wait.
pub const MAX_OUTBOX_PER_SERVER: usize = 1000;

impl ClientApi {
    pub(super) async fn send_to_device(
        &self,
        req: &ApiRequest,
        s: &Session,
        kind: &str,
        txn: &str,
    ) -> ApiResult<ApiResponse> {
        use ruma::api::client::to_device::send_event_to_device::v3::Request;
        let r: Request = parse(req, &[kind, txn])?;
        let txn_key = format!("todevice:{txn}");
        let _one_at_a_time = self.txn_lock(s, &txn_key).await;
        if self.data.txn(s, &txn_key).await?.is_some() {
            return ok(json!({}));
        }
        let me = self.node.server_name();
        let mut local = Vec::new();
        let mut remote: BTreeMap<ServerName, Map<String, Value>> = BTreeMap::new();
        for (user, targets) in &r.messages {
            let server = ServerName::try_from(user.server_name()).map_err(|_| {
                ApiError::invalid_param(format!("{user} is not on a Hyphae server"))
            })?;
            let mut per_device = Map::new();
            for (target, content) in targets {
                let content: Value = serde_json::from_str(content.json().get())
                    .map_err(|e| ApiError::bad_json(e.to_string()))?;
                per_device.insert(target.to_string(), content);
            }
            if server == me {
                local.extend(
                    self.expand_devices(user, &s.user_id, kind, per_device)
                        .await?,
                );
            } else {
                remote
                    .entry(server)
                    .or_default()
                    .insert(user.to_string(), Value::Object(per_device));
            }
        }
        let mut batches = Vec::new();
        for (server, messages) in remote {
            if self
                .data
                .outgoing_count(&server, MAX_OUTBOX_PER_SERVER)
                .await?
                >= MAX_OUTBOX_PER_SERVER
            {
                // That server has been away long enough to hold this many: try again later.
                return Err(ApiError::limit_exceeded(RETRY_EVERY.as_millis() as u64));
            }
            let messages = Value::Object(messages);
            if messages.to_string().len() > MAX_TO_DEVICE_BYTES {
                return Err(ApiError::new(
                    http::StatusCode::PAYLOAD_TOO_LARGE,
                    "M_TOO_LARGE",
                    format!("to-device messages for one server are limited to {MAX_TO_DEVICE_BYTES} bytes"),
                ));
            }
            batches.push((
                server,
                Outgoing {
                    sender: s.user_id.clone(),
                    kind: kind.to_owned(),
                    messages,
                },
            ));
        }
        if !local.is_empty() {
            self.data.put_to_device(local).await?;
        }
        if !batches.is_empty() {
            self.data.queue_outgoing(batches).await?;
            self.outbox_wake.notify_one();
        }
        let marker: ruma::OwnedEventId = ruma::OwnedEventId::try_from("$to_device")
            .map_err(|e| ApiError::unknown(e.to_string()))?;
        self.data.put_txn(s, &txn_key, &marker).await?;
        self.node.changed();
        ok(json!({}))
    }

    /// `(user, device, message)` for each device of local `user` that `per_device` names
    /// (`*`: every device).
    async fn expand_devices(
        &self,
        user: &UserId,
        sender: &UserId,
        kind: &str,
        per_device: Map<String, Value>,
    ) -> ApiResult<Vec<(OwnedUserId, String, Value)>> {
        let devices: Vec<String> = self
            .accounts
            .devices(user)
            .await?
            .into_iter()
            .map(|d| d.device_id.to_string())
            .collect();
        let mut out = Vec::new();
        for (target, content) in per_device {
            let msg = json!({"type": kind, "sender": sender, "content": content});
            if target == "*" {
                for d in &devices {
                    out.push((user.to_owned(), d.clone(), msg.clone()));
                }
            } else if devices.contains(&target) {
                out.push((user.to_owned(), target, msg));
            }
        }
        Ok(out)
    }

    /// Messages another server's user sent to devices here.
    pub(super) async fn take_remote_to_device(
        &self,
        from: &ServerName,
        seq: u64,
        sender: &UserId,
        kind: &str,
        messages: BTreeMap<OwnedUserId, Map<String, Value>>,
    ) -> ApiResult<()> {
        let mut out = Vec::new();
        for (user, per_device) in messages {
            out.extend(self.expand_devices(&user, sender, kind, per_device).await?);
        }
        if self.data.take_incoming(from, seq, out).await? {
            self.node.changed();
        } else {
            tracing::debug!(server = %from, seq, "to-device batch already taken");
        }
        Ok(())
    }

    /// Sends `server` its queued batches, oldest first, until it is empty (`true`) or a batch
    /// fails (`false`).
    async fn deliver_to(&self, server: ServerName) -> ApiResult<bool> {
        // Failed attempts in a row: a stream or connection that drops mid-burst is retried
        // after a moment, a server that stays unreachable waits for the next wake-up.
        let mut failures = 0;
        while let Some((key, seq, out)) = self.data.next_outgoing(&server).await? {
            let request = FedRequest::ToDevice {
                seq,
                sender: out.sender.clone(),
                kind: out.kind.clone(),
                messages: out.messages.to_string(),
            };
            match rt::timeout(
                DELIVERY_TIMEOUT,
                self.node.request(server.peer_id(), request),
            )
            .await
            {
                Some(Ok(_)) => {
                    failures = 0;
                    self.data.drop_outgoing(key).await?;
                }
                Some(Err(NodeError::Refused(FedErrorCode::LimitExceeded, _))) => {
                    // Over that server's request rate (a long outbox drains in a burst): wait
                    // a moment, then go on with the same batch.
                    rt::sleep(RATE_BACKOFF).await;
                }
                Some(Err(NodeError::Refused(
                    code @ (FedErrorCode::Forbidden | FedErrorCode::BadRequest),
                    reason,
                ))) => {
                    // The server will never take it: drop it rather than block the rest.
                    tracing::warn!(%server, ?code, reason, "to-device batch refused; dropped");
                    self.data.drop_outgoing(key).await?;
                }
                Some(Err(e)) if failures < NETWORK_RETRIES => {
                    tracing::debug!(%server, error = %e, "to-device not delivered; retrying");
                    failures += 1;
                    rt::sleep(RATE_BACKOFF).await;
                }
                Some(Err(e)) => {
                    tracing::debug!(%server, error = %e, "to-device not delivered yet");
                    return Ok(false);
                }
                None => {
                    tracing::debug!(%server, "to-device delivery timed out; retried later");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// What the outbox task waits on: its wake-ups, and peers connecting.
pub(super) struct OutboxWaker {
    pub(super) connected: tokio::sync::broadcast::Receiver<libp2p::PeerId>,
}

/// Delivers the outbox: at start, when woken, when a peer connects, and every
/// [`RETRY_EVERY`]. Each server is served by one delivery at a time.
pub(super) async fn deliver_outbox(api: Weak<ClientApi>, waker: &mut OutboxWaker) {
    let busy: Arc<Mutex<HashSet<ServerName>>> = Arc::default();
    let mut retry = rt::Interval::new(RETRY_EVERY);
    loop {
        let Some(strong) = api.upgrade() else { return };
        let wake = strong.outbox_wake.clone();
        match strong.data.outgoing_servers().await {
            Ok(servers) => {
                for server in servers {
                    if !busy.lock().expect("outbox").insert(server) {
                        continue;
                    }
                    let (api, busy) = (strong.clone(), busy.clone());
                    rt::spawn(async move {
                        let emptied = match api.deliver_to(server).await {
                            Ok(emptied) => emptied,
                            Err(e) => {
                                tracing::warn!(%server, error = %e.message, "to-device outbox");
                                false
                            }
                        };
                        busy.lock().expect("outbox").remove(&server);
                        if emptied {
                            // Anything queued while this delivery was finishing goes now.
                            api.outbox_wake.notify_one();
                        }
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e.message, "to-device outbox unreadable"),
        }
        drop(strong);
        tokio::select! {
            _ = wake.notified() => {}
            connected = waker.connected.recv() => {
                if matches!(connected, Err(tokio::sync::broadcast::error::RecvError::Closed)) {
                    return;
                }
            }
            _ = retry.tick() => {}
        }
    }
}
