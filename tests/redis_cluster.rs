//! The Redis store on a real Redis Cluster: three `redis-server` processes started by the
//! test (skipped with a printed reason when `redis-server`/`redis-cli` are missing).

mod redis_support;

use std::process::{Command, Stdio};
use std::time::Duration;

use redis_support::*;
use roomrouter::cluster::reservations::Learned;
use roomrouter::cluster::NodeId;
use roomrouter::config::{Config, StoreKind};
use roomrouter::room::{Normalization, RoomKey};
use roomrouter::store::{self, PinOutcome, PinStore};

fn have_redis_cli() -> bool {
    Command::new("redis-cli")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A free port whose cluster-bus port (+10000) is free too (ephemeral ports may be too high).
fn cluster_port() -> u16 {
    use rand::Rng;
    for _ in 0..200 {
        let port = rand::rng().random_range(20_000..45_000u16);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair for a cluster shard");
}

fn cluster_ok(port: u16) -> bool {
    let Ok(client) = redis::Client::open(format!("redis://127.0.0.1:{port}")) else {
        return false;
    };
    let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(500)) else {
        return false;
    };
    redis::cmd("CLUSTER")
        .arg("INFO")
        .query::<String>(&mut c)
        .is_ok_and(|i| i.contains("cluster_state:ok"))
}

fn dbsize(port: u16) -> i64 {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut c = client.get_connection().unwrap();
    redis::cmd("DBSIZE").query(&mut c).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pins_work_on_a_three_shard_redis_cluster() {
    if !have_redis_server() || !have_redis_cli() {
        skip(
            "redis_cluster",
            "redis-server and redis-cli are needed to start a cluster",
        );
        return;
    }
    let mut shards = Vec::new();
    for _ in 0..3 {
        let port = cluster_port();
        let conf = format!("nodes-{port}.conf");
        shards.push(
            PrivateRedis::start_with(
                port,
                vec![
                    "--cluster-enabled".into(),
                    "yes".into(),
                    "--cluster-config-file".into(),
                    conf,
                ],
            )
            .expect("redis-server starts"),
        );
    }
    let addrs: Vec<String> = shards
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let out = Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli --cluster create");
    assert!(
        out.status.success(),
        "cluster create: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        eventually(Duration::from_secs(20), || async {
            shards.iter().all(|s| cluster_ok(s.port))
        })
        .await,
        "cluster reached state ok"
    );

    let mut cfg = Config::default();
    cfg.store.kind = StoreKind::Redis;
    cfg.store.cluster_nodes = shards.iter().map(|s| s.url()).collect();
    cfg.store.key_prefix = prefix("cluster");
    cfg.validate().unwrap();
    let a = store::open(&cfg).await.expect("open on the cluster");
    let b = store::open(&cfg)
        .await
        .expect("second router on the cluster");
    let n1 = NodeId::parse("n1").unwrap();
    let n2 = NodeId::parse("n2").unwrap();
    let rooms: Vec<RoomKey> = (0..60)
        .map(|i| RoomKey::parse(&format!("room-{i}"), Normalization::None).unwrap())
        .collect();
    for r in &rooms {
        assert!(matches!(
            a.pin_if(r, &n1, None, 1000).await.unwrap(),
            PinOutcome::Won(_)
        ));
        // Every single-room operation is one script on one slot: CAS works across shards.
        match b.pin_if(r, &n2, None, 1001).await.unwrap() {
            PinOutcome::Lost(Some(p)) => assert_eq!(p.node, n1),
            o => panic!("{r}: {o:?}"),
        }
        assert!(b.confirm(r, &n1, 2000).await.unwrap());
    }
    // Pins spread over the shards (the room is the hash tag).
    let sizes: Vec<i64> = shards.iter().map(|s| dbsize(s.port)).collect();
    assert!(
        sizes.iter().filter(|n| **n > 0).count() >= 2,
        "keys on several shards: {sizes:?}"
    );
    // Pub/sub reaches the other router whichever shard published.
    assert!(
        a.release_if(&rooms[0], &n1).await.unwrap(),
        "compare-and-delete"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            b.get(&rooms[0]).await.unwrap().is_none()
        })
        .await
    );
    // A router opened later loads every pin (index + MGET across slots).
    let c = store::open(&cfg).await.unwrap();
    assert_eq!(c.count().await.unwrap(), 59);
    assert_eq!(c.get(&rooms[5]).await.unwrap().map(|p| p.node), Some(n1));

    // The first seed node gone (where the subscription used to open, for good): a router
    // still opens, subscribes on another seed, and hears the other routers' changes.
    let mut first_gone = cfg.clone();
    first_gone
        .store
        .cluster_nodes
        .insert(0, format!("redis://127.0.0.1:{}", cluster_port()));
    first_gone.validate().unwrap();
    let d = store::open(&first_gone)
        .await
        .expect("open with the first seed gone");
    assert!(matches!(
        a.pin_if(&rooms[0], &n2, None, 3000).await.unwrap(),
        PinOutcome::Won(_)
    ));
    assert!(
        eventually(Duration::from_secs(3), || async {
            d.peek(&rooms[0], |p| p.map(|p| p.node.clone())) == Some(Some(n2.clone()))
        })
        .await,
        "the router without its first seed heard the pin"
    );

    // Learned sizes on the cluster: saved, announced to the other routers, loaded by a
    // router opened later, forgotten by the two-key script (both keys in the prefix's slot).
    let learned = |peak, last_seen| Learned {
        peaks: [peak, 0, 0],
        last_seen,
    };
    a.save_learned(&rooms[1], learned(40, 5_000));
    a.save_learned(&rooms[2], learned(7, 1_000));
    let heard = std::sync::Mutex::new(Vec::new());
    assert!(
        eventually(Duration::from_secs(3), || async {
            let mut h = heard.lock().unwrap();
            h.extend(b.take_learned());
            h.sort_by_key(|(_, l): &(RoomKey, Learned)| l.last_seen);
            h.len() == 2 && h[1] == (rooms[1].clone(), learned(40, 5_000))
        })
        .await,
        "router B heard both: {:?}",
        heard.lock().unwrap()
    );
    let later = store::open(&cfg).await.unwrap();
    assert_eq!(later.load_learned().await.unwrap().len(), 2);
    a.forget_learned(2_000, 10_000);
    assert!(
        eventually(Duration::from_secs(3), || async {
            later.load_learned().await.unwrap() == vec![(rooms[1].clone(), learned(40, 5_000))]
        })
        .await,
        "the older one forgotten: {:?}",
        later.load_learned().await
    );

    // Node state on the cluster: a heartbeat and a drain on router A reach router B (each
    // written with its announcement in one MULTI/EXEC on the prefix's slot).
    let mut routers = config("redis://unused", &prefix("clusternodes"));
    routers.store.url = String::new();
    routers.store.cluster_nodes = cfg.store.cluster_nodes.clone();
    routers.validate().unwrap();
    let ra = serve(routers.clone()).await;
    let rb = serve(routers).await;
    let http = client();
    heartbeat(&http, &ra.base(), "n1", 0.0, &[]).await;
    admin_action(&http, &ra.base(), "n1", "drain").await;
    assert!(
        eventually(Duration::from_secs(3), || async {
            rb.node_state("n1").as_deref() == Some("draining")
        })
        .await,
        "router B heard of n1 and its drain"
    );
    ra.stop().await;
    rb.stop().await;
}
