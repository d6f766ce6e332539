use hyphae::store::redb::RedbStore;
use hyphae::store::{Store, Table, WriteBatch};
use std::time::Instant;
#[tokio::main]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open(&dir.path().join("p.redb")).unwrap();
    let v = vec![7u8; 1100];
    let (mut tw, mut tr) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
    for c in 0..100u64 {
        let keys: Vec<String> = (0..100u64)
            .map(|i| format!("$ev{:x}", (c * 100 + i).wrapping_mul(0x9E3779B97F4A7C15)))
            .collect();
        let t = Instant::now();
        let refs: Vec<&[u8]> = keys.iter().map(|k| k.as_bytes()).collect();
        s.get_many(Table::Events, &refs).await.unwrap();
        tr += t.elapsed();
        let mut b = WriteBatch::new();
        for k in &keys {
            b.put(Table::Events, k.as_bytes().to_vec(), v.clone());
        }
        let t = Instant::now();
        s.write(b).await.unwrap();
        tw += t.elapsed();
    }
    println!("writes {:?} reads {:?}", tw, tr);
}
