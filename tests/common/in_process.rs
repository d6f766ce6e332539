//! The client API in this process, as a [`Transport`]: requests go straight to
//! `ClientApi::handle`, as a local caller.

use std::sync::Arc;
use std::time::Duration;

use super::client::Transport;
use hyphae::api::{Caller, ClientApi, Registration};
use hyphae::rooms::{NodeConfig, P2pNode};
use hyphae::store::memory::MemoryStore;
use hyphae::store::redb::RedbStore;
use hyphae::store::SharedStore;
use serde_json::Value;

pub struct InProcess(pub Arc<ClientApi>);

impl Transport for InProcess {
    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let body = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
        self.raw(method, path, token, body).await
    }
}

impl InProcess {
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> (u16, Value) {
        let mut req = http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("Authorization", format!("Bearer {t}"));
        }
        let resp = self
            .0
            .handle(req.body(body).unwrap(), Caller { local: true })
            .await;
        let status = resp.status().as_u16();
        let json = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        (status, json)
    }
}

impl InProcess {
    /// Sends a request built by the test (headers and all) as a local caller.
    pub async fn send(&self, req: http::Request<Vec<u8>>) -> (u16, Value) {
        let resp = self.0.handle(req, Caller { local: true }).await;
        let json = serde_json::from_slice(resp.body()).unwrap_or(Value::Null);
        (resp.status().as_u16(), json)
    }
}

pub async fn peer(bootstrap: Option<&P2pNode>) -> (P2pNode, InProcess) {
    peer_on(Arc::new(MemoryStore::new()), bootstrap).await
}

/// A peer on a redb store in `dir`, as `hyphae-node` runs: its reads and writes yield, so
/// requests that race each other really interleave.
pub async fn redb_peer(dir: &tempfile::TempDir) -> (P2pNode, InProcess) {
    let store = RedbStore::open(&dir.path().join("hyphae.redb")).unwrap();
    peer_on(Arc::new(store), None).await
}

pub async fn peer_on(store: SharedStore, bootstrap: Option<&P2pNode>) -> (P2pNode, InProcess) {
    let mut addrs = Vec::new();
    if let Some(b) = bootstrap {
        addrs.push(b.listen_addrs().await[0].clone());
    }
    let config = NodeConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap: addrs,
        anti_entropy_every: Duration::from_secs(2),
        mdns: false,
        start_offline: false,
    };
    let node = P2pNode::start(store, config).await.unwrap();
    let api = ClientApi::start(
        node.clone(),
        Registration::Loopback {
            web_origins: vec![],
        },
    )
    .await
    .unwrap();
    (node, InProcess(api))
}

/// Alice (on `api_a`, whose node is `a`) and bob (on `api_b`) joined to a new private room of
/// alice's: registered, invited, and bob's join made through alice's server.
pub async fn alice_and_bob<'a>(
    a: &P2pNode,
    api_a: &'a InProcess,
    api_b: &'a InProcess,
) -> (
    super::client::Client<'a, InProcess>,
    super::client::Client<'a, InProcess>,
    String,
) {
    use super::client::{enc, register};
    let alice = register(api_a, "alice", "pw-alice-1").await;
    let mut bob = register(api_b, "bob", "pw-bob-1").await;
    let room = alice
        .create_room(serde_json::json!({"preset": "private_chat", "invite": [bob.user_id]}))
        .await;
    bob.sync_until("the invite", |v| {
        v["rooms"]["invite"].get(&room).map(|_| ())
    })
    .await;
    let join = format!(
        "/_matrix/client/v3/join/{}?via={}",
        enc(&room),
        a.server_name()
    );
    bob.ok("POST", &join, Some(serde_json::json!({}))).await;
    (alice, bob, room)
}
