//! Redis-backed router benchmarks, with the memory-backed router measured in the same run:
//!
//! * pinned-room lookups through `Router::place`: Redis-backed throughput over memory-backed
//!   (target: at least 0.9x). The Redis store serves pins from its local cache.
//! * new-room placement through a Redis-backed router: latency percentiles of one decision
//!   plus its compare-and-set in Redis (target: p99 under 1 ms on loopback).
//!
//! Run: `cargo bench --bench redis` (uses REDIS_URL, else redis://127.0.0.1:6379; prints
//! `SKIPPED` without a Redis). Each run uses its own key prefix and deletes nothing else.

use std::hint::black_box;
use std::time::{Duration, Instant};

use roomrouter::cluster::{NodeId, NodeInfo};
use roomrouter::config::{Config, StoreKind};
use roomrouter::placement::{AdminState, Hints};
use roomrouter::room::{Normalization, RoomKey};
use roomrouter::router::{Clock, Heartbeat, Intent, Router};
use roomrouter::store::{self, PinStore};

const NODES: usize = 20;
const ROOMS: usize = 10_000;
const LOOKUPS: usize = 2_000_000;
const NEW_ROOMS: usize = 5_000;

fn info() -> NodeInfo {
    NodeInfo {
        url: "http://127.0.0.1:1".into(),
        upstream: "http://127.0.0.1:1".into(),
        capacity: 1e9,
        region: None,
        tags: vec![],
    }
}

fn room(s: &str) -> RoomKey {
    RoomKey::parse(s, Normalization::None).unwrap()
}

async fn router(cfg: &Config) -> Router<store::AnyStore> {
    let r = Router::new(cfg, store::open(cfg).await.unwrap(), Clock::System);
    beat(&r).await;
    r
}

/// Every node reports (keeps them healthy between phases).
async fn beat(r: &Router<store::AnyStore>) {
    for i in 0..NODES {
        let hb = Heartbeat {
            info: info(),
            load: 0.0,
            cpu: None,
            state: AdminState::Active,
            rooms: None,
        };
        r.heartbeat(&NodeId::parse(&format!("node-{i}")).unwrap(), hb)
            .await
            .unwrap();
    }
}

/// Lookups per second over the pinned rooms (single task, as a request handler runs them).
async fn lookups<S: PinStore>(r: &Router<S>, keys: &[RoomKey]) -> f64 {
    let start = Instant::now();
    for i in 0..LOOKUPS {
        let p = r
            .place(
                black_box(&keys[i % keys.len()]),
                &Hints::default(),
                None,
                Intent::Lookup { create: false },
            )
            .await;
        black_box(p.map(|p| p.node.id.stable_hash()).ok());
    }
    LOOKUPS as f64 / start.elapsed().as_secs_f64()
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let prefix = format!("rrbench-{}", std::process::id());
        let mut rcfg = Config::default();
        rcfg.store.kind = StoreKind::Redis;
        rcfg.store.url = url.clone();
        rcfg.store.key_prefix = prefix.clone();
        let redis_router = match tokio::time::timeout(Duration::from_secs(5), router(&rcfg)).await
        {
            Ok(r) => r,
            Err(_) => {
                eprintln!("SKIPPED: no Redis at {url}");
                return;
            }
        };
        let mut mem = Config::default();
        mem.placement.startup_hold = Some(Duration::ZERO);
        let mem_router = router(&mem).await;
        let keys: Vec<RoomKey> = (0..ROOMS).map(|i| room(&format!("room-{i}"))).collect();
        for k in &keys {
            redis_router
                .place(k, &Hints::default(), Some(1), Intent::Lookup { create: true })
                .await
                .unwrap();
            mem_router
                .place(k, &Hints::default(), Some(1), Intent::Lookup { create: true })
                .await
                .unwrap();
        }
        // Alternate five rounds each; keep the best of each (least disturbed by neighbours).
        let (mut mem, mut red) = (0f64, 0f64);
        for _ in 0..5 {
            beat(&mem_router).await;
            beat(&redis_router).await;
            mem = mem.max(lookups(&mem_router, &keys).await);
            red = red.max(lookups(&redis_router, &keys).await);
        }
        println!(
            "pinned lookups: memory {:.2} M/s, redis {:.2} M/s, ratio {:.3} (target >= 0.9)",
            mem / 1e6,
            red / 1e6,
            red / mem
        );

        let mut lat = Vec::with_capacity(NEW_ROOMS);
        beat(&redis_router).await;
        for i in 0..NEW_ROOMS {
            let k = room(&format!("new-{i}"));
            let t = Instant::now();
            let p = redis_router
                .place(&k, &Hints::default(), Some(1), Intent::Join)
                .await
                .unwrap();
            lat.push(t.elapsed());
            assert!(p.created);
        }
        lat.sort();
        println!(
            "new-room placement through Redis ({NEW_ROOMS} rooms): p50 {:?}, p90 {:?}, p99 {:?}, max {:?} (target p99 < 1 ms)",
            pct(&lat, 0.50),
            pct(&lat, 0.90),
            pct(&lat, 0.99),
            lat[lat.len() - 1]
        );
        // Clean up this run's keys.
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let mut cursor = 0u64;
        for _ in 0..10_000 {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("*{prefix}*"))
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut c)
                .await
                .unwrap();
            if !keys.is_empty() {
                let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut c).await.unwrap();
            }
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    });
}
