//! Memory of one node holding a 10,000-event room: the process's RSS and the engine's event
//! cache against its budget, for short messages and for 8 KiB ones (where the budget bites).
//! Each case runs in a process of its own, so its RSS is that node's alone.
//! Run: `cargo bench --bench memory`.

#[cfg(not(target_arch = "wasm32"))]
mod native {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use hyphae::engine::create_room::{CreateRoom, Preset};
    use hyphae::engine::EVENT_CACHE_BYTES;
    use hyphae::rooms::{NodeConfig, P2pNode};
    use hyphae::store::redb::RedbStore;
    use hyphae::store::Direction;
    use serde_json::json;

    const EVENTS: usize = 10_000;
    const CASE_VAR: &str = "HYPHAE_MEMORY_CASE";

    fn rss_mib() -> f64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    }

    async fn one_case(body_bytes: usize) {
        let dir = tempfile::tempdir().unwrap();
        let rss_start = rss_mib();
        let store = Arc::new(RedbStore::open(&dir.path().join("node.redb")).unwrap());
        let config = NodeConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().unwrap()],
            bootstrap: Vec::new(),
            anti_entropy_every: Duration::from_secs(5),
            mdns: false,
            start_offline: false,
        };
        let a = P2pNode::start(store, config).await.unwrap();
        let rss_idle = rss_mib();
        let opts = CreateRoom {
            preset: Preset::PublicChat,
            ..Default::default()
        };
        let room = a.create_room("alice", &opts).await.unwrap();
        let body = "x".repeat(body_bytes);
        let start = Instant::now();
        for i in 0..EVENTS {
            a.send(
                &room,
                "alice",
                "m.room.message",
                None,
                json!({"msgtype": "m.text", "body": format!("{i} {body}")}),
            )
            .await
            .unwrap();
        }
        let sent_secs = start.elapsed().as_secs_f64();
        let rss_sent = rss_mib();
        // Page back through the whole room twice, 100 events a page, as a client scrolling to
        // the start does (each page is what one `/messages` reads).
        for _ in 0..2 {
            let (mut from, mut read) = (None, 0);
            loop {
                let page = a
                    .engine()
                    .timeline(&room, from, Direction::Backward, 100)
                    .await
                    .unwrap();
                let Some(last) = page.last() else { break };
                from = last.stream;
                read += page.len();
            }
            assert!(read >= EVENTS);
        }
        let (cached, cached_bytes) = a.engine().cached_events().await;
        println!(
            "{EVENTS} events of {body_bytes} B bodies (sent in {sent_secs:.1} s): RSS {:.1} MiB at start, {:.1} idle node, {:.1} after the sends, {:.1} after paging through the room twice; event cache {} events, {:.1} MiB of a {} MiB budget",
            rss_start,
            rss_idle,
            rss_sent,
            rss_mib(),
            cached,
            cached_bytes as f64 / (1 << 20) as f64,
            EVENT_CACHE_BYTES >> 20,
        );
    }

    pub fn run() {
        if let Ok(case) = std::env::var(CASE_VAR) {
            let body_bytes = case.parse().expect("body size");
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(one_case(body_bytes));
            return;
        }
        println!("== memory of one node (its own process, redb) holding a {EVENTS}-event room");
        for body_bytes in [32, 8 << 10] {
            let status = std::process::Command::new(std::env::current_exe().unwrap())
                .env(CASE_VAR, body_bytes.to_string())
                .status()
                .unwrap();
            assert!(status.success());
        }
    }
}

fn main() {
    #[cfg(not(target_arch = "wasm32"))]
    native::run();
}
