//! Native peers for multi-peer tests: nodes on loopback TCP with a short anti-entropy period,
//! and the waits the tests share.

use std::sync::Arc;
use std::time::Duration;

use hyphae::rooms::{NodeConfig, P2pNode};
use hyphae::store::memory::MemoryStore;
use hyphae::store::SharedStore;
use libp2p::Multiaddr;

pub const PATIENCE: Duration = Duration::from_secs(60);

pub fn config(bootstrap: Vec<Multiaddr>) -> NodeConfig {
    NodeConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
        bootstrap,
        anti_entropy_every: Duration::from_secs(2),
        mdns: false,
        start_offline: false,
    }
}

pub async fn node(bootstrap: &[&P2pNode]) -> P2pNode {
    node_on(Arc::new(MemoryStore::new()), bootstrap).await
}

pub async fn node_on(store: SharedStore, bootstrap: &[&P2pNode]) -> P2pNode {
    // RUST_LOG=hyphae=debug shows what the nodes do, per test thread.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_thread_names(true)
        .with_test_writer()
        .try_init();
    let mut addrs = Vec::new();
    for b in bootstrap {
        addrs.push(b.listen_addrs().await[0].clone());
    }
    P2pNode::start(store, config(addrs)).await.unwrap()
}

pub async fn wait_connected(n: &P2pNode, peers: usize) {
    assert!(
        n.wait_for_peers(peers, PATIENCE).await,
        "peers never connected"
    );
}

/// Waits until `n` holds at least one invite.
pub async fn wait_for_an_invite(n: &P2pNode) {
    let n2 = n.clone();
    let arrived = n
        .wait_until(PATIENCE, || {
            let n2 = n2.clone();
            async move { !n2.invites().is_empty() }
        })
        .await;
    assert!(arrived, "no invite arrived");
}
