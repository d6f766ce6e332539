//! Peer-to-peer figures over real libp2p on loopback (TCP): delivery latency from publish at one
//! peer to durable at another, aggregate throughput of a 3-peer room with every peer sending,
//! catch-up of a peer that missed 5,000 events, and node memory.
//! Run: `cargo bench --bench p2p`.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hyphae::engine::create_room::{CreateRoom, Preset};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use hyphae::store::{Direction, SharedStore};
    use ruma::OwnedRoomId;
    use serde_json::json;

    async fn node(store: SharedStore, bootstrap: &[&P2pNode]) -> P2pNode {
        let mut addrs = Vec::new();
        for b in bootstrap {
            addrs.push(b.listen_addrs().await[0].clone());
        }
        let config = NodeConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: addrs,
            anti_entropy_every: Duration::from_secs(5),
            mdns: false,
            start_offline: false,
        };
        P2pNode::start(store, config).await.unwrap()
    }

    fn redb(dir: &tempfile::TempDir, name: &str) -> SharedStore {
        Arc::new(RedbStore::open(&dir.path().join(name)).unwrap())
    }

    async fn messages(n: &P2pNode, room: &OwnedRoomId) -> usize {
        let all = n
            .engine()
            .timeline(room, None, Direction::Forward, usize::MAX)
            .await
            .unwrap();
        all.iter()
            .filter(|e| e.pdu.kind.to_string() == "m.room.message")
            .count()
    }

    async fn wait_messages(n: &P2pNode, room: &OwnedRoomId, count: usize) {
        let ok = n
            .wait_until(Duration::from_secs(120), || {
                let n = n.clone();
                let room = room.clone();
                async move { messages(&n, &room).await >= count }
            })
            .await;
        assert!(ok, "messages never arrived");
    }

    async fn connected(n: &P2pNode, peers: usize) {
        assert!(n.wait_for_peers(peers, Duration::from_secs(30)).await);
    }

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }

    fn rss_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or(0)
    }

    pub async fn run() {
        let dir = tempfile::tempdir().unwrap();
        let rss_start = rss_kib();
        let a = node(redb(&dir, "a.redb"), &[]).await;
        let rss_idle = rss_kib();
        let b = node(redb(&dir, "b.redb"), &[&a]).await;
        connected(&a, 1).await;
        let opts = CreateRoom {
            preset: Preset::PublicChat,
            ..Default::default()
        };
        let room = a.create_room("alice", &opts).await.unwrap();
        b.join(&room, "bob", a.peer_id()).await.unwrap();

        // Latency: one message at a time, from `send` at A to durable in B's store.
        let mut lat = Vec::new();
        for i in 0..300 {
            let start = Instant::now();
            let r = a
                .send(
                    &room,
                    "alice",
                    "m.room.message",
                    None,
                    json!({"msgtype": "m.text", "body": format!("ping {i}")}),
                )
                .await
                .unwrap();
            let id = r.event_id;
            let ok = b
                .wait_until(Duration::from_secs(10), || {
                    let b = b.clone();
                    let id = id.clone();
                    async move { b.engine().event(&id).await.unwrap().is_some() }
                })
                .await;
            assert!(ok);
            lat.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let warm: Vec<f64> = lat[20..].to_vec();
        let mut sorted = warm.clone();
        sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
        println!(
            "== delivery latency, send at A -> durable at B (redb both sides), {} messages",
            sorted.len()
        );
        println!(
            "p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms",
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99),
            sorted[sorted.len() - 1]
        );

        // Three peers all sending at once.
        let c = node(redb(&dir, "c.redb"), &[&a]).await;
        connected(&a, 2).await;
        c.join(&room, "carol", a.peer_id()).await.unwrap();
        let base = messages(&a, &room).await;
        let per_peer = 1000;
        let start = Instant::now();
        let mut tasks = Vec::new();
        for (n, who) in [
            (a.clone(), "alice"),
            (b.clone(), "bob"),
            (c.clone(), "carol"),
        ] {
            let room = room.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..per_peer {
                    n.send(
                        &room,
                        who,
                        "m.room.message",
                        None,
                        json!({"msgtype": "m.text", "body": format!("{who} {i}")}),
                    )
                    .await
                    .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        for n in [&a, &b, &c] {
            wait_messages(n, &room, base + 3 * per_peer).await;
        }
        let secs = start.elapsed().as_secs_f64();
        let mut counts = Vec::new();
        for n in [&a, &b, &c] {
            counts.push(messages(n, &room).await - base);
        }
        println!("== 3 peers sending {per_peer} each at once (redb, every send durable)");
        println!("{} events delivered everywhere in {:.2} s: {:.0} events/s; per-peer counts {:?} (lost: {})",
            3 * per_peer, secs, (3 * per_peer) as f64 / secs, counts, counts.iter().map(|c| 3 * per_peer - c).sum::<usize>());

        // Catch-up: C goes away, A sends 5,000, C comes back.
        c.set_offline(true).unwrap();
        for i in 0..5000 {
            a.send(
                &room,
                "alice",
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": format!("missed {i}")}),
            )
            .await
            .unwrap();
        }
        let target = messages(&a, &room).await;
        let start = Instant::now();
        c.set_offline(false).unwrap();
        wait_messages(&c, &room, target).await;
        println!("== catch-up of a peer that missed 5,000 events");
        println!(
            "converged in {:.2} s; events lost: {}",
            start.elapsed().as_secs_f64(),
            target - messages(&c, &room).await.min(target)
        );

        println!("== memory (process RSS, three nodes in one process)");
        println!("before any node: {} MiB; after one idle node: +{} KiB; now, holding a {}-event room on each of three nodes: {} MiB",
            rss_start / 1024, rss_idle.saturating_sub(rss_start), messages(&a, &room).await, rss_kib() / 1024);
        drop((a, b, c));

        for servers in [2, 10, 100] {
            fan_out(servers).await;
        }
    }

    /// One message from the origin to `servers` other member servers (memory stores, all in
    /// this process): time to the last durable copy, and the PDU bytes the origin sends.
    async fn fan_out(servers: usize) {
        let origin = node(Arc::new(hyphae::store::memory::MemoryStore::new()), &[]).await;
        let opts = CreateRoom {
            preset: Preset::PublicChat,
            ..Default::default()
        };
        let room = origin.create_room("alice", &opts).await.unwrap();
        let mut members = Vec::new();
        for _ in 0..servers {
            let m = node(
                Arc::new(hyphae::store::memory::MemoryStore::new()),
                &[&origin],
            )
            .await;
            connected(&m, 1).await;
            m.join(&room, "member", origin.peer_id()).await.unwrap();
            members.push(m);
        }
        let rounds = 20;
        let mut times = Vec::new();
        let mut bytes = 0;
        for i in 0..rounds {
            let start = Instant::now();
            let r = origin
                .send(
                    &room,
                    "alice",
                    "m.room.message",
                    None,
                    json!({"msgtype": "m.text", "body": format!("fan-out {i}")}),
                )
                .await
                .unwrap();
            let pdu_len = origin
                .engine()
                .event(&r.event_id)
                .await
                .unwrap()
                .unwrap()
                .pdu
                .json
                .get()
                .len();
            bytes += pdu_len * servers;
            for m in &members {
                let id = r.event_id.clone();
                let m2 = m.clone();
                assert!(
                    m.wait_until(Duration::from_secs(30), || {
                        let m2 = m2.clone();
                        let id = id.clone();
                        async move { m2.engine().event(&id).await.unwrap().is_some() }
                    })
                    .await
                );
            }
            times.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|x, y| x.partial_cmp(y).unwrap());
        println!(
            "== fan-out of one message to {servers} member servers (memory stores, one process)"
        );
        println!(
            "time to the last durable copy p50 {:.2} ms  p99 {:.2} ms; PDU bytes sent by the origin per message {}",
            percentile(&times, 0.5),
            percentile(&times, 0.99),
            bytes / rounds
        );
        for m in &members {
            m.shutdown().await;
        }
        origin.shutdown().await;
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(native::run());
}

#[cfg(target_arch = "wasm32")]
fn main() {}
