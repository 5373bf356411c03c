//! Placement hot-path benchmarks, with references measured in the same run:
//!
//! * `pinned/*`: a pinned room (memory store), next to a bare `DashMap::get` on the same key
//!   type (the floor: one concurrent-map lookup). `decision` is the pinned-room decision on its
//!   own (the store's read of the pin, the node's health, state and load: what
//!   `Router::place` runs first); `router_join` and `router_lookup` are the whole
//!   `Router::place` call, with its bookkeeping (the node's `pending` counter and the room's
//!   reservation for a join, the decision metric, an owned handle on the node).
//! * `new_room/*/N`: the decision for a new room over N nodes with `placement::decide`, next
//!   to the `rendezvous_hash` crate's own `calc_candidates().next()` over the same N nodes
//!   and the same stable hasher.
//!
//! * `join/ticket`: signing the ticket every join carries (HS256 JWT), next to the pinned
//!   `router_join` it follows: the two together are the join's work before HTTP.
//!
//! Run: `cargo bench --bench placement`.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, Waker};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dashmap::DashMap;
use rendezvous_hash::{Capacity, IdNode, RendezvousNodes, WeightedNode};

use roomrouter::cluster::{Cluster, NodeId, NodeInfo};
use roomrouter::config::Config;
use roomrouter::placement::hash::{NodeHash, RoomHash, StableNodeHasher};
use roomrouter::placement::{decide, AdminState, Decision, Hints, Params};
use roomrouter::room::{Normalization, RoomKey};
use roomrouter::router::{Clock, Heartbeat, Intent, Router};
use roomrouter::store::{MemoryStore, Pin, PinStore};

const NOW: u64 = 1_700_000_000_000;

/// Polls a future that is ready at once (the memory store never waits).
fn ready<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    match f.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("the memory store's futures are always ready"),
    }
}

fn info(cap: f64) -> NodeInfo {
    NodeInfo {
        url: "http://127.0.0.1:1".into(),
        upstream: "http://127.0.0.1:1".into(),
        capacity: cap,
        region: None,
        tags: vec![],
    }
}

fn rooms(n: usize) -> Vec<RoomKey> {
    (0..n)
        .map(|i| RoomKey::parse(&format!("room-{i}"), Normalization::None).unwrap())
        .collect()
}

fn pinned(c: &mut Criterion) {
    let mut cfg = Config::default();
    // No startup hold: the benchmark places rooms at once, on nodes it registers itself.
    cfg.placement.startup_hold = Some(std::time::Duration::ZERO);
    let router = Router::new(&cfg, MemoryStore::new(), Clock::Manual(AtomicU64::new(NOW)));
    for i in 0..20 {
        let hb = Heartbeat {
            info: info(1e9),
            load: 0.0,
            cpu: None,
            state: AdminState::Active,
            rooms: None,
        };
        ready(router.heartbeat(&NodeId::parse(&format!("node-{i}")).unwrap(), hb)).unwrap();
    }
    let keys = rooms(10_000);
    let bare: DashMap<RoomKey, Pin> = DashMap::new();
    for k in &keys {
        let p = ready(router.place(
            k,
            &Hints::default(),
            Some(1),
            Intent::Lookup { create: true },
        ))
        .unwrap();
        bare.insert(
            k.clone(),
            Pin {
                node: p.node.id.clone(),
                created_at: NOW,
                confirmed_at: NOW,
            },
        );
    }
    let mut g = c.benchmark_group("pinned");
    g.throughput(Throughput::Elements(1));
    let mut i = 0usize;
    g.bench_function("dashmap_get", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let r = bare.get(black_box(&keys[i])).map(|p| p.node.stable_hash());
            black_box(r)
        })
    });
    let mut i = 0usize;
    g.bench_function("decision", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let d = router.store().peek(black_box(&keys[i]), |pin| {
                router.pinned_decision(pin?, NOW, |node, hold| (node.id.stable_hash(), hold))
            });
            black_box(d.flatten())
        })
    });
    let mut i = 0usize;
    g.bench_function("router_join", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let p = ready(router.place(black_box(&keys[i]), &Hints::default(), None, Intent::Join));
            black_box(p.map(|p| p.node.id.stable_hash()).ok())
        })
    });
    let mut i = 0usize;
    g.bench_function("router_lookup", |b| {
        b.iter(|| {
            i = (i + 1) % keys.len();
            let p = ready(router.place(
                black_box(&keys[i]),
                &Hints::default(),
                None,
                Intent::Lookup { create: false },
            ));
            black_box(p.map(|p| p.node.id.stable_hash()).ok())
        })
    });
    g.finish();
}

fn new_room(c: &mut Criterion) {
    let params = Params::default();
    let keys = rooms(1024);
    let mut g = c.benchmark_group("new_room");
    g.throughput(Throughput::Elements(1));
    for n in [10usize, 100, 1_000, 10_000] {
        let cluster = Cluster::new();
        let mut crate_nodes = RendezvousNodes::new(StableNodeHasher);
        for i in 0..n {
            let id = NodeId::parse(&format!("node-{i}")).unwrap();
            let cap = 100.0 + (i % 7) as f64 * 50.0;
            let (_, e) = cluster.upsert(&id, info(cap), false);
            e.live
                .record_report(cap, (i % 10) as f64 * 5.0, None, AdminState::Active, NOW);
            crate_nodes.insert(WeightedNode::new(
                IdNode::new(NodeHash(id.stable_hash())),
                Capacity::new(cap).unwrap(),
            ));
        }
        let snap = cluster.snapshot_arc();
        // As the router decides: with the room's expected size (here the default guess).
        let hints = Hints {
            expected_load: 10.0,
            ..Hints::default()
        };
        let mut i = 0usize;
        g.bench_with_input(BenchmarkId::new("decide", n), &n, |b, _| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                let d = decide(
                    snap.candidates(),
                    None,
                    black_box(keys[i].stable_hash()),
                    black_box(&hints),
                    NOW,
                    &params,
                );
                assert!(matches!(d, Decision::Place { .. }));
                black_box(d)
            })
        });
        let mut i = 0usize;
        g.bench_with_input(
            BenchmarkId::new("crate_calc_candidates_next", n),
            &n,
            |b, _| {
                b.iter(|| {
                    i = (i + 1) % keys.len();
                    let best = crate_nodes
                        .calc_candidates(&RoomHash(black_box(keys[i].stable_hash())))
                        .next();
                    black_box(best.map(|w| w.node.0))
                })
            },
        );
    }
    g.finish();
}

fn ticket(c: &mut Criterion) {
    let issuer = roomrouter::auth::TicketIssuer::new(
        "bench-ticket-secret-0123456789-0123456789",
        std::time::Duration::from_secs(60),
    );
    let mut g = c.benchmark_group("join");
    g.throughput(Throughput::Elements(1));
    g.bench_function("ticket", |b| {
        b.iter(|| {
            black_box(issuer.issue(
                black_box("room-12345"),
                black_box("media-7"),
                black_box("anonymous"),
                NOW / 1000,
            ))
        })
    });
    g.finish();
}

criterion_group!(benches, pinned, new_room, ticket);
criterion_main!(benches);
