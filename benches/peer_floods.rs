//! An honest member's delivery latency while hostile peers flood a node, against the same
//! without a flood: outsiders (no room) asking for everything, a member server asking for the
//! largest answers it may get, and a member server sending typing EDUs as fast as it can.
//! Run: `cargo bench --bench peer_floods`.

// The hostile peers of the tests, shared with them (this bench uses only part of each).
#[cfg(not(target_arch = "wasm32"))]
#[allow(dead_code)]
#[path = "../tests/common/outsider.rs"]
mod outsider;

#[cfg(not(target_arch = "wasm32"))]
#[allow(dead_code)]
#[path = "../tests/common/mallory.rs"]
mod mallory;

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::mallory::Mallory;
    use super::outsider::Outsider;
    use hyphae::engine::create_room::{CreateRoom, Preset};
    use hyphae::net::protocol::{Edu, FedErrorCode, FedRequest, FedResponse};
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use hyphae::store::SharedStore;
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

    fn percentile(sorted: &[f64], p: f64) -> f64 {
        sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
    }

    /// Alice sends on `a`, one message at a time; each is timed until it is durable at `b`.
    async fn honest_latency(a: &P2pNode, b: &P2pNode, room: &OwnedRoomId, label: &str) {
        let mut lat = Vec::new();
        for i in 0..220 {
            let start = Instant::now();
            let id = a
                .send(
                    room,
                    "alice",
                    "m.room.message",
                    None,
                    json!({"msgtype": "m.text", "body": format!("{label} {i}")}),
                )
                .await
                .unwrap()
                .event_id;
            let b2 = b.clone();
            assert!(
                b.wait_until(Duration::from_secs(30), || {
                    let b2 = b2.clone();
                    let id = id.clone();
                    async move { b2.engine().event(&id).await.unwrap().is_some() }
                })
                .await
            );
            lat.push(start.elapsed().as_secs_f64() * 1000.0);
        }
        let mut sorted = lat[20..].to_vec();
        sorted.sort_by(|x, y| x.partial_cmp(y).unwrap());
        print!(
            "{label}: honest send at A -> durable at B p50 {:.2} ms, p99 {:.2} ms",
            percentile(&sorted, 0.5),
            percentile(&sorted, 0.99)
        );
    }

    /// Keeps `per_peer` requests from each of `peers` in flight until stopped; counts what the
    /// node answered, and how much of that was a refusal for the peer's rate.
    struct Flood {
        stop: Arc<AtomicBool>,
        answered: Arc<AtomicU64>,
        throttled: Arc<AtomicU64>,
        tasks: Vec<tokio::task::JoinHandle<()>>,
        started: Instant,
    }

    impl Flood {
        fn start(
            peers: Vec<Arc<Outsider>>,
            per_peer: usize,
            request: impl Fn(u64) -> FedRequest + Send + Sync + 'static,
        ) -> Self {
            let stop = Arc::new(AtomicBool::new(false));
            let answered = Arc::new(AtomicU64::new(0));
            let throttled = Arc::new(AtomicU64::new(0));
            let request = Arc::new(request);
            let mut tasks = Vec::new();
            for p in peers {
                for _ in 0..per_peer {
                    let (p, stop, answered, throttled, request) = (
                        p.clone(),
                        stop.clone(),
                        answered.clone(),
                        throttled.clone(),
                        request.clone(),
                    );
                    tasks.push(tokio::spawn(async move {
                        while !stop.load(Ordering::Relaxed) {
                            let n = answered.fetch_add(1, Ordering::Relaxed);
                            if let Ok(FedResponse::Error {
                                code: FedErrorCode::LimitExceeded,
                                ..
                            }) = p.ask(request(n)).await
                            {
                                throttled.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }));
                }
            }
            Self {
                stop,
                answered,
                throttled,
                tasks,
                started: Instant::now(),
            }
        }

        async fn stop(self) {
            let secs = self.started.elapsed().as_secs_f64();
            self.stop.store(true, Ordering::Relaxed);
            for t in self.tasks {
                let _ = t.await;
            }
            let answered = self.answered.load(Ordering::Relaxed);
            println!(
                "; flood: {answered} requests answered ({:.0}/s), {} of them refused for rate",
                answered as f64 / secs,
                self.throttled.load(Ordering::Relaxed)
            );
        }
    }

    pub async fn run() {
        let dir = tempfile::tempdir().unwrap();
        let redb = |name: &str| -> SharedStore {
            Arc::new(RedbStore::open(&dir.path().join(name)).unwrap())
        };
        let a = node(redb("a.redb"), &[]).await;
        let b = node(redb("b.redb"), &[&a]).await;
        assert!(a.wait_for_peers(1, Duration::from_secs(30)).await);
        let opts = CreateRoom {
            preset: Preset::PublicChat,
            ..Default::default()
        };
        let room = a.create_room("alice", &opts).await.unwrap();
        b.join(&room, "bob", a.peer_id()).await.unwrap();
        // History for a member's flood to ask for.
        for i in 0..2000 {
            a.send(
                &room,
                "alice",
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": format!("history {i} {}", "h".repeat(200))}),
            )
            .await
            .unwrap();
        }
        let extremities = a
            .engine()
            .room(&room)
            .await
            .unwrap()
            .unwrap()
            .forward_extremities;
        let addr = a.listen_addrs().await[0].clone();
        println!("== an honest member's latency (A -> B, redb) while hostile peers flood A");

        honest_latency(&a, &b, &room, "no flood").await;
        println!();

        // Outsiders: four fresh keys, 16 requests each in flight, for the room's history.
        let mut outsiders = Vec::new();
        for _ in 0..4 {
            outsiders.push(Arc::new(
                Outsider::dial(addr.clone(), a.peer_id(), Vec::new()).await,
            ));
        }
        let (r, latest) = (room.clone(), extremities.clone());
        let flood = Flood::start(outsiders, 16, move |n| match n % 3 {
            0 => FedRequest::GetMissingEvents {
                room_id: r.clone(),
                earliest: Vec::new(),
                latest: latest.clone(),
                limit: 500,
            },
            1 => FedRequest::Extremities { room_id: r.clone() },
            _ => FedRequest::GetEvent {
                event_id: latest[0].clone(),
            },
        });
        honest_latency(
            &a,
            &b,
            &room,
            "outsiders' request flood (4 peers x 16 in flight)",
        )
        .await;
        flood.stop().await;

        // A member server asking for the largest answers it may have, 16 at a time.
        let mallory = Mallory::new().await;
        let m = Arc::new(
            Outsider::dial_as(
                mallory.identity.libp2p_keypair().clone(),
                addr.clone(),
                a.peer_id(),
                Vec::new(),
                Arc::new(|_| FedResponse::error(FedErrorCode::NotFound, "no")),
            )
            .await,
        );
        mallory.join(&m, &room).await;
        let (r, latest) = (room.clone(), extremities.clone());
        let flood = Flood::start(vec![m.clone()], 16, move |_| FedRequest::GetMissingEvents {
            room_id: r.clone(),
            earliest: Vec::new(),
            latest: latest.clone(),
            limit: 500,
        });
        honest_latency(
            &a,
            &b,
            &room,
            "member's request flood (500-event answers, 16 in flight)",
        )
        .await;
        flood.stop().await;

        // The same member sending signed typing EDUs, 16 at a time.
        let edu = Edu::Typing {
            room_id: room.clone(),
            user_id: mallory.user.clone(),
            typing: true,
        };
        let mallory = Arc::new(mallory);
        let flood = Flood::start(vec![m.clone()], 16, move |_| FedRequest::Edu {
            edu: String::from_utf8(edu.sign(&mallory.identity)).unwrap(),
        });
        honest_latency(
            &a,
            &b,
            &room,
            "member's EDU flood (signed typing, 16 in flight)",
        )
        .await;
        flood.stop().await;
    }
}

fn main() {
    #[cfg(not(target_arch = "wasm32"))]
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(native::run());
}
