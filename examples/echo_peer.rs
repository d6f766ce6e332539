//! A native peer for the browser p2p test: listens on WebSocket (loopback), creates a public room,
//! prints its address and the room id, and answers every message from someone else with
//! `echo: <body>`. Stops by itself after ten minutes.

#[cfg(not(target_arch = "wasm32"))]
#[tokio::main]
async fn main() {
    use std::collections::HashSet;
    use std::sync::Arc;
    use std::time::Duration;

    use hyphae::engine::create_room::{CreateRoom, Preset};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::memory::MemoryStore;
    use hyphae::store::Direction;

    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let config = NodeConfig {
        listen: vec![
            "/ip4/127.0.0.1/tcp/0/ws".parse().unwrap(),
            "/ip4/127.0.0.1/udp/0/webrtc-direct".parse().unwrap(),
        ],
        anti_entropy_every: Duration::from_secs(2),
        ..NodeConfig::default()
    };
    let node = P2pNode::start(Arc::new(MemoryStore::new()), config)
        .await
        .expect("node starts");
    let opts = CreateRoom {
        preset: Preset::PublicChat,
        name: Some("echo".into()),
        ..Default::default()
    };
    let room = node.create_room("echo", &opts).await.expect("room");
    let addrs = node.listen_addrs_at_least(2).await;
    let ws = addrs.iter().find(|a| a.to_string().contains("/ws/"));
    let webrtc = addrs
        .iter()
        .find(|a| a.to_string().contains("/webrtc-direct/"));
    println!("HYPHAE-ECHO-ADDR {}", ws.expect("a WebSocket listener"));
    println!(
        "HYPHAE-ECHO-WEBRTC {}",
        webrtc.expect("a WebRTC-direct listener")
    );
    println!("HYPHAE-ECHO-ROOM {room}");

    let me = node.user("echo");
    let mut answered = HashSet::new();
    let mut changes = node.changes();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    loop {
        let events = node
            .engine()
            .timeline(&room, None, Direction::Forward, usize::MAX)
            .await
            .unwrap();
        for ev in events {
            if ev.pdu.kind.to_string() != "m.room.message"
                || ev.pdu.sender == me
                || !answered.insert(ev.pdu.event_id.clone())
            {
                continue;
            }
            let body: serde_json::Value =
                serde_json::from_str(ev.pdu.content.get()).unwrap_or_default();
            let reply = format!("echo: {}", body["body"].as_str().unwrap_or_default());
            let content = serde_json::json!({"msgtype": "m.text", "body": reply});
            node.send(&room, "echo", "m.room.message", None, content)
                .await
                .expect("reply");
        }
        if tokio::time::timeout_at(deadline, changes.changed())
            .await
            .is_err()
        {
            break;
        }
    }
}

#[cfg(target_arch = "wasm32")]
fn main() {}
