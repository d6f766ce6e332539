//! Browser peers for the in-browser p2p tests and benchmark.

use std::rc::Rc;

use hyphae::engine::create_room::CreateRoom;
use hyphae::net::rt::{self, Duration};
use hyphae::rooms::{NodeConfig, P2pNode};
use hyphae::store::indexeddb::IndexedDbStore;
use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use ruma::OwnedRoomId;

/// A tab's peer on a fresh IndexedDB profile, bootstrapped to `bootstrap`.
pub async fn browser_node(profile: &str, bootstrap: Multiaddr, listen: Vec<Multiaddr>) -> P2pNode {
    IndexedDbStore::delete(profile).await.unwrap();
    let store = Rc::new(IndexedDbStore::open(profile).await.unwrap());
    let config = NodeConfig {
        bootstrap: vec![bootstrap],
        listen,
        anti_entropy_every: Duration::from_secs(2),
        ..NodeConfig::default()
    };
    P2pNode::start(store, config).await.unwrap()
}

/// Two tabs, X (user `xavier`) and Y (user `yara`), connected to each other only through a
/// circuit on `relay`, in a room of their own that the relay node never joins: X created it and
/// invited Y, Y joined through X.
pub async fn two_tabs_in_a_room(
    relay: &Multiaddr,
    profile_prefix: &str,
) -> (P2pNode, P2pNode, OwnedRoomId) {
    let circuit = relay.clone().with(Protocol::P2pCircuit);
    let x = browser_node(
        &format!("{profile_prefix}-x"),
        relay.clone(),
        vec![circuit.clone()],
    )
    .await;
    let y = browser_node(&format!("{profile_prefix}-y"), relay.clone(), Vec::new()).await;
    let reachable = rt::timeout(Duration::from_secs(20), x.listen_addrs())
        .await
        .expect("X got a relay reservation");
    assert!(
        reachable[0].iter().any(|p| p == Protocol::P2pCircuit),
        "{reachable:?}"
    );
    y.dial(circuit.with(Protocol::P2p(x.peer_id()))).unwrap();
    assert!(
        y.wait_for_peers(2, Duration::from_secs(30)).await,
        "Y reached X through the relay"
    );
    let opts = CreateRoom {
        invite: vec![y.user("yara")],
        ..CreateRoom::default()
    };
    let room = x.create_room("xavier", &opts).await.unwrap();
    let y2 = y.clone();
    let invited = y
        .wait_until(Duration::from_secs(30), || {
            let y2 = y2.clone();
            async move { !y2.invites().is_empty() }
        })
        .await;
    assert!(invited, "X's invite reached Y");
    y.join(&room, "yara", x.peer_id()).await.unwrap();
    (x, y, room)
}
