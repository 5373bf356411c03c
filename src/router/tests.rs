//! The router's rules, driven through `Router` with a manual clock and the memory store.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::*;
use crate::store::MemoryStore;

const T0: Millis = 1_700_000_000_000;
/// `placement.heartbeat_interval`'s default.
const HEARTBEAT_INTERVAL_MS: Millis = 2_000;

/// A router on the defaults, without the startup hold (the tests register nodes first).
fn router() -> Router<MemoryStore> {
    with_store(MemoryStore::new())
}

/// `router()` on `store`.
fn with_store<S: PinStore>(store: S) -> Router<S> {
    Router::new(&no_hold(), store, Clock::Manual(AtomicU64::new(T0)))
}

fn no_hold() -> Config {
    let mut cfg = Config::default();
    cfg.placement.startup_hold = Some(std::time::Duration::ZERO);
    cfg
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

fn id(s: &str) -> NodeId {
    NodeId::parse(s).unwrap()
}

fn room(s: &str) -> RoomKey {
    RoomKey::parse(s, Normalization::Lowercase).unwrap()
}

async fn beat<S: PinStore>(
    r: &Router<S>,
    node: &str,
    cap: f64,
    load: f64,
    rooms: Option<Vec<(&str, u32)>>,
) -> HeartbeatReply {
    beat_state(r, node, cap, load, rooms, AdminState::Active).await
}

async fn beat_state<S: PinStore>(
    r: &Router<S>,
    node: &str,
    cap: f64,
    load: f64,
    rooms: Option<Vec<(&str, u32)>>,
    state: AdminState,
) -> HeartbeatReply {
    try_beat(r, node, cap, load, rooms, state).await.unwrap()
}

/// A heartbeat that may fail (the tests' stores can refuse).
async fn try_beat<S: PinStore>(
    r: &Router<S>,
    node: &str,
    cap: f64,
    load: f64,
    rooms: Option<Vec<(&str, u32)>>,
    state: AdminState,
) -> Result<HeartbeatReply, StoreError> {
    let hb = Heartbeat {
        info: info(cap),
        load,
        cpu: None,
        state,
        rooms: rooms.map(|v| v.into_iter().map(|(k, p)| (room(k), p)).collect()),
    };
    r.heartbeat(&id(node), hb).await
}

async fn join<S: PinStore>(r: &Router<S>, k: &str) -> Result<Placement, JoinError> {
    r.place(&room(k), &Hints::default(), None, Intent::Join)
        .await
}

/// A placement lookup that places the room if it has no pin (`create`), sized `size`.
async fn create<S: PinStore>(r: &Router<S>, k: &str, size: Option<u32>) -> Placement {
    r.place(
        &room(k),
        &Hints::default(),
        size,
        Intent::Lookup { create: true },
    )
    .await
    .unwrap()
}

/// `router()` with `new_room_limit` at `join_limit` (1.0), where reservations count in full
/// against the joins of rooms already placed.
fn limits_equal() -> Router<MemoryStore> {
    let mut cfg = no_hold();
    cfg.placement.new_room_limit = 1.0;
    Router::new(&cfg, MemoryStore::new(), Clock::Manual(AtomicU64::new(T0)))
}

async fn node_of<S: PinStore>(r: &Router<S>, k: &str) -> String {
    join(r, k).await.unwrap().node.id.to_string()
}

#[tokio::test]
async fn never_split_a_room_under_concurrent_joins() {
    let r = Arc::new(router());
    for n in ["a", "b", "c", "d"] {
        beat(&r, n, 10_000.0, 0.0, None).await;
    }
    let mut tasks = Vec::new();
    for t in 0..16 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for i in 0..400 {
                let k = format!("room-{}", (i * 7 + t) % 100);
                let p = r
                    .place(&room(&k), &Hints::default(), None, Intent::Join)
                    .await
                    .unwrap();
                seen.push((k, p.node.id.to_string()));
            }
            seen
        }));
    }
    let mut by_room: HashMap<String, HashSet<String>> = HashMap::new();
    for t in tasks {
        for (k, n) in t.await.unwrap() {
            by_room.entry(k).or_default().insert(n);
        }
    }
    assert_eq!(by_room.len(), 100);
    for (k, nodes) in by_room {
        assert_eq!(nodes.len(), 1, "room {k} split over {nodes:?}");
    }
}

#[tokio::test]
async fn scale_out_moves_nothing() {
    let r = router();
    for n in ["a", "b", "c"] {
        beat(&r, n, 1_000_000.0, 0.0, None).await;
    }
    let mut before = HashMap::new();
    for i in 0..300 {
        before.insert(i, node_of(&r, &format!("r{i}")).await);
    }
    beat(&r, "d", 5_000_000.0, 0.0, None).await;
    for i in 0..300 {
        assert_eq!(
            node_of(&r, &format!("r{i}")).await,
            before[&i],
            "room r{i} moved on scale-out"
        );
    }
    // New rooms do use the new node.
    let mut on_d = 0;
    for i in 0..100 {
        if node_of(&r, &format!("new{i}")).await == "d" {
            on_d += 1;
        }
    }
    assert!(on_d > 30, "the big new node took {on_d} of 100 new rooms");
}

#[tokio::test]
async fn a_node_that_dies_as_the_wall_clock_steps_back_is_still_found_dead() {
    let r = router();
    beat(&r, "a", 1_000.0, 0.0, None).await;
    beat(&r, "b", 1_000.0, 0.0, None).await;
    // b dies; then NTP steps the router's clock back an hour (it ran ahead).
    r.clock().step_back(3_600_000);
    // a keeps reporting; one sweep later and past the heartbeat timeout, b is dead, not
    // healthy until the clock has caught up with its last report an hour from now.
    r.sweep().await.unwrap();
    r.clock().advance(7_000);
    beat(&r, "a", 1_000.0, 0.0, None).await;
    let healthy: Vec<String> = r
        .nodes()
        .into_iter()
        .filter(|n| n.healthy)
        .map(|n| n.id.to_string())
        .collect();
    assert_eq!(healthy, ["a"]);
    for i in 0..20 {
        assert_eq!(node_of(&r, &format!("r{i}")).await, "a");
    }
}

#[tokio::test]
async fn a_room_joined_before_the_wall_clock_stepped_back_goes_idle_on_time() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "idle").await.unwrap();
    r.clock().step_back(3_600_000);
    // Idle for room_idle_ttl and the confirmation interval after the step (idle_pins_are_swept),
    // not for an hour more.
    assert_eq!(r.sweep().await.unwrap(), 0);
    r.clock().advance(676_000);
    assert_eq!(r.sweep().await.unwrap(), 1);
    assert!(r.room(&room("idle")).await.unwrap().is_none());
}

#[tokio::test]
async fn failure_moves_only_what_failed() {
    let r = router();
    for n in ["a", "b", "c"] {
        beat(&r, n, 1_000_000.0, 0.0, None).await;
    }
    let mut before = HashMap::new();
    for i in 0..300 {
        before.insert(i, node_of(&r, &format!("r{i}")).await);
    }
    // b stops beating; a and c keep going past b's timeout.
    r.clock().advance(7_000);
    beat(&r, "a", 1_000_000.0, 0.0, None).await;
    beat(&r, "c", 1_000_000.0, 0.0, None).await;
    let mut moved = 0;
    for i in 0..300 {
        let now = node_of(&r, &format!("r{i}")).await;
        if before[&i] == "b" {
            assert_ne!(now, "b");
            moved += 1;
        } else {
            assert_eq!(now, before[&i], "room r{i} moved though its node is alive");
        }
    }
    assert!(moved > 50);
    // b returns: the rooms re-placed while it was away stay where they are.
    beat(&r, "b", 1_000_000.0, 0.0, None).await;
    for i in 0..300 {
        if before[&i] == "b" {
            assert_ne!(node_of(&r, &format!("r{i}")).await, "b");
        }
    }
}

#[tokio::test]
async fn a_full_pinned_node_refuses_joins_instead_of_splitting() {
    let r = router();
    beat(&r, "a", 10.0, 0.0, None).await;
    beat(&r, "b", 10.0, 0.0, None).await;
    let home = node_of(&r, "busy").await;
    beat(&r, &home, 10.0, 10.0, None).await;
    match join(&r, "busy").await {
        Err(JoinError::NodeFull { node }) => assert_eq!(node.as_str(), home),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn draining_keeps_rooms_disabled_moves_them_enable_restores() {
    let r = router();
    beat(&r, "a", 100_000.0, 0.0, None).await;
    beat(&r, "b", 100_000.0, 0.0, None).await;
    let mut on_a = Vec::new();
    for i in 0..60 {
        if node_of(&r, &format!("r{i}")).await == "a" {
            on_a.push(format!("r{i}"));
        }
    }
    assert!(!on_a.is_empty());
    assert!(r.set_admin_state(&id("a"), AdminState::Draining));
    for k in &on_a {
        assert_eq!(node_of(&r, k).await, "a", "draining keeps its rooms");
    }
    for i in 0..50 {
        assert_eq!(
            node_of(&r, &format!("new{i}")).await,
            "b",
            "draining takes no new rooms"
        );
    }
    // A node's own "active" does not lift the admin's drain.
    let reply = beat(&r, "a", 100_000.0, 0.0, None).await;
    assert_eq!(reply.state, AdminState::Draining);
    assert!(r.set_admin_state(&id("a"), AdminState::Disabled));
    for k in &on_a {
        assert_eq!(
            node_of(&r, k).await,
            "b",
            "disabled: rooms re-placed on next join"
        );
    }
    assert!(r.set_admin_state(&id("a"), AdminState::Active));
    let mut back = 0;
    for i in 0..60 {
        if node_of(&r, &format!("later{i}")).await == "a" {
            back += 1;
        }
    }
    assert!(back > 0, "enabled node takes new rooms again");
}

#[tokio::test]
async fn a_room_joined_just_before_the_clock_jumped_ahead_keeps_its_pin_while_its_ticket_may_arrive(
) {
    // The router's clock steps an hour forward seconds after a join; the node's does not,
    // so the join's ticket is still good there. The room's end must not release its pin
    // while that ticket may arrive: the next join could go elsewhere (a split).
    let r = router();
    r.watch(T0);
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let home = node_of(&r, "jump").await;
    r.clock().advance(10_000);
    r.watch(r.now());
    r.clock().advance(3_600_000);
    r.watch(r.now());
    beat(&r, &home, 1000.0, 0.0, Some(vec![("jump", 0)])).await;
    assert!(
        r.room(&room("jump")).await.unwrap().is_some(),
        "the pin outlives the report while the ticket may arrive"
    );
    // Once the ticket's window has passed with the router awake, the room's end releases it.
    let mut awake = 0;
    while awake <= TICKET_WINDOW_MS {
        r.clock().advance(500);
        awake += 500;
        r.watch(r.now());
    }
    beat(&r, &home, 1000.0, 0.0, Some(vec![])).await;
    assert!(r.room(&room("jump")).await.unwrap().is_none());
}

#[tokio::test]
async fn a_room_joined_before_the_clock_stepped_back_ends_a_ticket_window_later_not_an_hour() {
    // The join's time, an hour ahead after NTP steps the clock back, must not keep the
    // room looking joined for that hour: its pin would outlive the room's end as long.
    let r = router();
    r.watch(T0);
    beat(&r, "a", 1000.0, 0.0, None).await;
    let home = node_of(&r, "stepped").await;
    r.clock().step_back(3_600_000);
    r.watch(r.now());
    r.sweep().await.unwrap();
    let mut awake = 0;
    while awake <= TICKET_WINDOW_MS {
        r.clock().advance(500);
        awake += 500;
        r.watch(r.now());
    }
    beat(&r, &home, 1000.0, 0.0, Some(vec![("stepped", 0)])).await;
    assert!(r.room(&room("stepped")).await.unwrap().is_none());
}

#[tokio::test]
async fn heartbeat_rooms_confirm_release_and_evict() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let home = node_of(&r, "shared").await;
    let other = if home == "a" { "b" } else { "a" };
    // The other node claims the room too: a split. It is told to evict.
    let reply = beat(&r, other, 1000.0, 3.0, Some(vec![("shared", 3)])).await;
    assert_eq!(reply.evict, vec![room("shared")]);
    assert_eq!(node_of(&r, "shared").await, home);
    // The home node lists it: confirmed, not evicted.
    let reply = beat(&r, &home, 1000.0, 3.0, Some(vec![("shared", 3)])).await;
    assert!(reply.evict.is_empty());
    // Once the last ticket has expired, it stops listing the room: the pin is released.
    r.clock().advance(TICKET_WINDOW_MS + 1);
    beat(&r, &home, 1000.0, 3.0, Some(vec![("shared", 3)])).await;
    beat(&r, &home, 1000.0, 0.0, Some(vec![])).await;
    assert!(r.room(&room("shared")).await.unwrap().is_none());
    // A room reported with 0 participants is released too.
    let home = node_of(&r, "short").await;
    r.clock().advance(TICKET_WINDOW_MS + 1);
    beat(&r, &home, 1000.0, 0.0, Some(vec![("short", 0)])).await;
    assert!(r.room(&room("short")).await.unwrap().is_none());
}

/// `tickets.ttl` of the default configuration.
const TICKET_TTL_MS: u64 = 60_000;

/// How long after issue such a ticket may still be accepted: its life, the 60 s verification
/// leeway, and the second its `iat` was rounded down by.
const TICKET_WINDOW_MS: u64 = TICKET_TTL_MS + 61_000;

#[tokio::test]
async fn a_room_ended_while_tickets_are_out_keeps_its_pin_so_latecomers_are_not_split() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let home = node_of(&r, "late").await;
    let other = if home == "a" { "b" } else { "a" };
    // The room empties on its node seconds after a ticket for it was issued, and the other
    // node is now far emptier.
    r.clock().advance(5_000);
    beat(&r, &home, 1000.0, 700.0, Some(vec![("late", 0)])).await;
    beat(&r, other, 1000.0, 0.0, None).await;
    assert_eq!(
        r.room(&room("late")).await.unwrap().unwrap().node.as_str(),
        home,
        "the pin outlives the report while the ticket is valid"
    );
    assert_eq!(
        node_of(&r, "late").await,
        home,
        "the next join goes where the ticket went"
    );
    // Heartbeats while that join's ticket may still be accepted keep it, past the ticket's
    // `exp` too (a node forgives the verification leeway); the first one after releases it
    // (the node no longer lists the room).
    r.clock().advance(TICKET_TTL_MS / 2);
    beat(&r, &home, 1000.0, 0.0, Some(vec![])).await;
    assert!(r.room(&room("late")).await.unwrap().is_some());
    r.clock().advance(TICKET_TTL_MS / 2 + 1_000);
    beat(&r, &home, 1000.0, 0.0, Some(vec![])).await;
    assert!(
        r.room(&room("late")).await.unwrap().is_some(),
        "expired, but within the leeway a node accepts it with"
    );
    r.clock()
        .advance(TICKET_WINDOW_MS - TICKET_TTL_MS - 1_000 + 1);
    beat(&r, &home, 1000.0, 0.0, Some(vec![])).await;
    assert!(r.room(&room("late")).await.unwrap().is_none());
}

#[tokio::test]
async fn unpinned_rooms_a_node_reports_are_adopted() {
    // After a router restart the memory store is empty; live rooms must not be split.
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let reply = beat(&r, "b", 1000.0, 5.0, Some(vec![("live-room", 5)])).await;
    assert!(reply.evict.is_empty());
    assert_eq!(node_of(&r, "live-room").await, "b");
}

/// A router on the defaults, startup hold included.
fn held() -> Router<MemoryStore> {
    Router::new(
        &Config::default(),
        MemoryStore::new(),
        Clock::Manual(AtomicU64::new(T0)),
    )
}

/// The default startup hold: `heartbeat_timeout`.
fn default_hold_ms() -> u64 {
    Config::default().placement.heartbeat_timeout.as_millis() as u64
}

#[tokio::test]
async fn a_restarted_router_places_no_new_room_until_the_nodes_have_reported_theirs() {
    // Node b hosts a live room when the router (re)starts, and node a reports first. Placed
    // at once, a join would land on a (a split), and b's report would then get the live
    // room evicted. For `startup_hold` (here the default: `heartbeat_timeout`) new rooms
    // wait; reported rooms are adopted and joinable at once.
    let r = held();
    let hold = default_hold_ms();
    beat(&r, "a", 1000.0, 0.0, None).await;
    match join(&r, "live").await {
        Err(JoinError::Starting { left_ms }) => assert_eq!(left_ms, hold),
        other => panic!("placed while starting: {other:?}"),
    }
    let why = r.readiness().unwrap_err();
    assert!(why.iter().any(|w| w.starts_with("starting")), "{why:?}");
    let reply = beat(&r, "b", 1000.0, 5.0, Some(vec![("live", 5)])).await;
    assert!(reply.evict.is_empty(), "{:?}", reply.evict);
    assert_eq!(node_of(&r, "live").await, "b");
    r.clock().advance(hold - 1);
    assert!(matches!(
        join(&r, "fresh").await,
        Err(JoinError::Starting { left_ms: 1 })
    ));
    r.clock().advance(1);
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 5.0, Some(vec![("live", 5)])).await;
    join(&r, "fresh").await.unwrap();
    assert!(r.readiness().is_ok());
    assert_eq!(node_of(&r, "live").await, "b");
}

#[tokio::test]
async fn a_clock_stepped_back_lengthens_the_startup_hold_instead_of_ending_it() {
    let r = held();
    let hold = default_hold_ms();
    beat(&r, "a", 1000.0, 0.0, None).await;
    // NTP steps the clock back 200 ms at boot: still holding, 200 ms longer.
    r.clock().step_back(200);
    match join(&r, "fresh").await {
        Err(JoinError::Starting { left_ms }) => assert_eq!(left_ms, hold + 200),
        other => panic!("the hold ended with the step: {other:?}"),
    }
    // A step longer than the hold ends it: no waiting an hour for the clock.
    let r = held();
    r.clock().step_back(3_600_000);
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "fresh").await.unwrap();
}

/// `placement.heartbeat_timeout` of the default configuration, in ms.
fn heartbeat_timeout_ms() -> u64 {
    Config::default().placement.heartbeat_timeout.as_millis() as u64
}

/// Whether node `n` is healthy to `r` now.
fn healthy(r: &Router<MemoryStore>, n: &str) -> bool {
    let snap = r.cluster.snapshot();
    r.is_healthy(snap.get(&id(n)).unwrap(), r.now())
}

#[tokio::test]
async fn a_pause_of_the_router_itself_moves_no_room_off_a_node_that_served_it() {
    // The router (or its VM) stops for longer than the heartbeat timeout, or its clock
    // steps forward. Judged on the wall clock every node looks dead; node b reports first
    // after the gap. The room pinned to a stays on a, whose report is late only because
    // the router was not there to hear it; a node already dead before the gap stays dead.
    let r = router();
    let timeout = heartbeat_timeout_ms();
    r.watch(T0);
    beat(&r, "c", 1000.0, 0.0, None).await;
    // Past c's timeout, with the router awake throughout: c is dead.
    for _ in 0..(timeout / 500 + 2) {
        r.clock().advance(500);
        r.watch(r.now());
        beat(&r, "a", 1000.0, 0.0, None).await;
    }
    assert!(!healthy(&r, "c"));
    let home = node_of(&r, "talk").await;
    assert_eq!(home, "a");
    r.clock().advance(timeout + 4_000);
    let reply = beat(&r, "b", 1000.0, 0.0, None).await;
    assert!(reply.evict.is_empty());
    assert!(healthy(&r, "a"), "a served its rooms throughout");
    assert!(!healthy(&r, "c"), "c was dead before the gap");
    assert_eq!(node_of(&r, "talk").await, "a");
    // The time given back is the gap's only: a that stays silent while the router is awake
    // dies as it would have.
    for _ in 0..(timeout / 500 + 1) {
        r.clock().advance(500);
        r.watch(r.now());
    }
    assert!(!healthy(&r, "a"));
}

#[tokio::test]
async fn a_pause_soon_after_the_wall_clock_stepped_back_moves_no_room() {
    // NTP steps the router's clock back an hour (it ran ahead); a little later the router
    // (its VM) stops for longer than the heartbeat timeout. The pause is still the
    // router's own: the step must not hide it for the hour the clock takes to catch up.
    let r = router();
    let timeout = heartbeat_timeout_ms();
    r.watch(T0);
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let home = node_of(&r, "talk").await;
    let other = if home == "a" { "b" } else { "a" };
    r.clock().step_back(3_600_000);
    r.sweep().await.unwrap();
    for _ in 0..4 {
        r.clock().advance(500);
        r.watch(r.now());
        beat(&r, "a", 1000.0, 0.0, None).await;
        beat(&r, "b", 1000.0, 0.0, None).await;
    }
    r.clock().advance(timeout + 4_000);
    let reply = beat(&r, other, 1000.0, 0.0, None).await;
    assert!(reply.evict.is_empty());
    assert!(healthy(&r, &home), "{home} served its rooms throughout");
    assert_eq!(node_of(&r, "talk").await, home);
}

#[tokio::test]
async fn a_pause_longer_than_the_idle_ttl_releases_no_pin_it_did_not_let_idle() {
    // The router stops for longer than `room_idle_ttl`; on waking, its sweep may run
    // before any node has reported. Judged on the wall clock every pin looks idle, and a
    // join before the room's node reports again would place the live room afresh (a
    // split). The sweep counts the gap as the router's, not the rooms'.
    let r = router();
    r.watch(T0);
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "talk").await.unwrap();
    let ttl = Config::default().placement.room_idle_ttl.as_millis() as u64;
    r.clock().advance(ttl + 120_000);
    assert_eq!(
        r.sweep().await.unwrap(),
        0,
        "released by the router's own gap"
    );
    assert!(r.room(&room("talk")).await.unwrap().is_some());
    // The time given back is the gap's only: left idle while the router is awake, the pin
    // goes as it would have (here `ttl` and a confirmation interval, as in `idle_pins_are_swept`).
    let mut awake = 0;
    while awake <= ttl + ttl / 8 + 1_000 {
        r.clock().advance(2_000);
        awake += 2_000;
        r.watch(r.now());
    }
    assert_eq!(r.sweep().await.unwrap(), 1);
    assert!(r.room(&room("talk")).await.unwrap().is_none());
}

#[tokio::test]
async fn a_clock_stepped_forward_during_the_startup_hold_does_not_end_it() {
    // The watch sees a forward step (or a pause) as a gap; the hold is for time in which
    // the nodes could report, so the gap does not count towards it.
    let r = held();
    let hold = default_hold_ms();
    r.watch(r.now());
    beat(&r, "a", 1000.0, 0.0, None).await;
    r.clock().advance(1_000);
    r.watch(r.now());
    r.clock().advance(3_600_000);
    r.watch(r.now());
    match join(&r, "fresh").await {
        Err(JoinError::Starting { left_ms }) => assert_eq!(left_ms, hold - 1_000),
        other => panic!("the hold ended with the step: {other:?}"),
    }
    // The rest of the hold passes with the router awake (watched every second).
    for _ in 0..(hold - 1_000) / 1_000 {
        r.clock().advance(1_000);
        r.watch(r.now());
    }
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "fresh").await.unwrap();
}

#[tokio::test]
async fn a_room_pinned_to_an_unusable_node_is_taken_over_by_the_node_reporting_it() {
    // Its users reached another node (re-placed while the old one was away): that node's
    // report moves the pin there instead of evicting the room from the only node it is on.
    for unusable in ["dead", "disabled", "removed"] {
        let r = router();
        beat(&r, "old", 1000.0, 0.0, None).await;
        beat(&r, "new", 1000.0, 0.0, None).await;
        r.set_admin_state(&id("new"), AdminState::Disabled);
        assert_eq!(node_of(&r, "moved").await, "old");
        r.set_admin_state(&id("new"), AdminState::Active);
        match unusable {
            "dead" => {
                r.clock().advance(7_000);
                beat(&r, "new", 1000.0, 0.0, None).await;
            }
            "disabled" => {
                r.set_admin_state(&id("old"), AdminState::Disabled);
            }
            _ => {
                assert!(r.remove_node(&id("old")));
            }
        }
        let reply = beat(&r, "new", 1000.0, 3.0, Some(vec![("moved", 3)])).await;
        assert!(reply.evict.is_empty(), "{unusable}: {:?}", reply.evict);
        let pin = r.room(&room("moved")).await.unwrap().unwrap();
        assert_eq!(pin.node.as_str(), "new", "{unusable}");
        // While a room pinned to a usable node is evicted from any other that reports it.
        let reply = beat(&r, "third", 1000.0, 3.0, Some(vec![("moved", 1)])).await;
        assert_eq!(reply.evict, vec![room("moved")], "{unusable}");
    }
}

#[tokio::test]
async fn a_room_pinned_to_a_removed_node_is_placed_again_on_its_next_join() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let first = node_of(&r, "orphan").await;
    let other = if first == "a" { "b" } else { "a" };
    assert!(r.remove_node(&id(&first)));
    let again = join(&r, "orphan").await.unwrap();
    assert_eq!(again.node.id.as_str(), other);
    assert_eq!(
        r.room(&room("orphan"))
            .await
            .unwrap()
            .unwrap()
            .node
            .as_str(),
        other
    );
}

#[tokio::test]
async fn new_rooms_reserve_their_expected_size() {
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    let p = create(&r, "class", Some(30)).await;
    assert!(p.created);
    assert!((p.node.live.reserved_units() - 30.0).abs() < 1e-9);
    // A join consumes one unit of reservation and adds one of pending: û unchanged.
    let u = p.node.utilization();
    join(&r, "class").await.unwrap();
    assert!((p.node.utilization() - u).abs() < 1e-9);
    // With no hint, the default reserve (10) applies.
    let q = create(&r, "other", None).await;
    assert!((q.node.live.reserved_units() - 39.0).abs() < 1e-9);
}

#[tokio::test]
async fn a_guessed_size_lapses_after_new_room_reserve_ttl_a_hinted_one_after_reservation_ttl() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    let create = |k: &'static str, size| {
        let r = &r;
        async move { create(r, k, size).await }
    };
    let hinted = create("hinted", Some(30)).await;
    create("guessed", None).await;
    let reserved = || hinted.node.live.reserved_units();
    assert!((reserved() - 40.0).abs() < 1e-9, "{}", reserved());
    // The default guess (10) holds for new_room_reserve_ttl (60 s), the hint for
    // reservation_ttl (5 min).
    r.clock().advance(60_000 - 1);
    r.sweep().await.unwrap();
    assert!((reserved() - 40.0).abs() < 1e-9, "{}", reserved());
    r.clock().advance(1);
    r.sweep().await.unwrap();
    assert!((reserved() - 30.0).abs() < 1e-9, "{}", reserved());
    r.clock().advance(300_000 - 60_000);
    r.sweep().await.unwrap();
    assert_eq!(reserved(), 0.0);
}

#[tokio::test]
async fn a_room_created_again_before_its_reservation_lapsed_is_reserved_once() {
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    beat(&r, "b", 100.0, 0.0, None).await;
    let key = room("class");
    let hints = Hints::default();
    let create = |size| r.place(&key, &hints, Some(size), Intent::Lookup { create: true });
    let first = create(30).await.unwrap();
    // The room ends where this router does not see it (another router released the pin), and
    // is created again within the reservation's lifetime.
    assert!(r
        .store
        .release_if(&room("class"), &first.node.id)
        .await
        .unwrap());
    let again = create(20).await.unwrap();
    assert!(again.created);
    let snap = r.cluster.snapshot();
    let reserved: f64 = ["a", "b"]
        .iter()
        .map(|n| snap.get(&id(n)).unwrap().live.reserved_units())
        .sum();
    assert!((reserved - 20.0).abs() < 1e-9, "reserved {reserved}");
}

#[tokio::test]
async fn learned_history_sizes_the_next_session() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    let p = join(&r, "weekly").await.unwrap();
    beat(&r, "a", 1000.0, 40.0, Some(vec![("weekly", 40)])).await;
    r.clock().advance(TICKET_WINDOW_MS + 1);
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await; // session ends
    assert!(r.room(&room("weekly")).await.unwrap().is_none());
    assert_eq!(p.node.live.reserved_units(), 0.0);
    let p = create(&r, "weekly", None).await;
    assert!((p.node.live.reserved_units() - 40.0).abs() < 1e-9);
}

#[tokio::test]
async fn a_learned_size_is_capped_like_a_hint() {
    // A node's report is not bounded by `max_size_hint`; what is learned from it must be, or
    // one absurd report would make the room reserve more than any node has.
    let mut cfg = no_hold();
    cfg.placement.max_size_hint = 50;
    let r = Router::new(&cfg, MemoryStore::new(), Clock::Manual(AtomicU64::new(T0)));
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "webinar").await.unwrap();
    beat(&r, "a", 1000.0, 0.0, Some(vec![("webinar", 4_000_000)])).await;
    r.clock().advance(TICKET_WINDOW_MS + 1);
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await; // session ends
    assert!(r.room(&room("webinar")).await.unwrap().is_none());
    let p = create(&r, "webinar", None).await;
    assert!((p.node.live.reserved_units() - 50.0).abs() < 1e-9);
}

/// A placement lookup that does not place (`?create=false`).
async fn look_up<S: PinStore>(r: &Router<S>, k: &str) -> Result<Placement, JoinError> {
    r.place(
        &room(k),
        &Hints::default(),
        None,
        Intent::Lookup { create: false },
    )
    .await
}

#[tokio::test]
async fn lookups_without_create_never_place() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    let e = look_up(&r, "x").await;
    assert!(matches!(e, Err(JoinError::NotFound)));
    assert!(r.room(&room("x")).await.unwrap().is_none());
    // Nor re-place: a room pinned to a node that failed has no usable pin, and keeps it.
    assert_eq!(node_of(&r, "y").await, "a");
    r.clock()
        .advance(Config::default().placement.heartbeat_timeout.as_millis() as u64 + 1);
    beat(&r, "b", 1000.0, 0.0, None).await;
    let e = look_up(&r, "y").await;
    assert!(matches!(e, Err(JoinError::NotFound)));
    let pin = r.room(&room("y")).await.unwrap().unwrap();
    assert_eq!(pin.node.as_str(), "a");
}

#[tokio::test]
async fn idle_pins_are_swept() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "idle").await.unwrap();
    // room_idle_ttl (600 s) and the interval at which joins confirm (600 s / 8).
    r.clock().advance(674_000);
    assert_eq!(r.sweep().await.unwrap(), 0);
    r.clock().advance(2_000);
    assert_eq!(r.sweep().await.unwrap(), 1);
    assert!(r.room(&room("idle")).await.unwrap().is_none());
}

#[tokio::test]
async fn a_pin_joined_within_the_idle_ttl_is_never_swept() {
    // Joins confirm a pin at most every room_idle_ttl/8 (75 s): one that came 74 s after
    // the last confirmation wrote nothing, and the pin must still outlive it by the TTL.
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "rare").await.unwrap();
    r.clock().advance(74_000);
    beat(&r, "a", 1000.0, 0.0, None).await; // alive; lists no rooms, so confirms no pin
    join(&r, "rare").await.unwrap();
    assert_eq!(
        r.room(&room("rare")).await.unwrap().unwrap().confirmed_at,
        T0
    );
    r.clock().advance(599_000);
    assert_eq!(
        r.sweep().await.unwrap(),
        0,
        "swept 1 s before the TTL since its last join"
    );
    r.clock().advance(3_000);
    assert_eq!(r.sweep().await.unwrap(), 1);
}

#[tokio::test]
async fn a_self_draining_node_with_no_rooms_is_removed_at_its_next_such_report() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    let draining = || beat_state(&r, "a", 1000.0, 0.0, Some(vec![]), AdminState::Draining);
    draining().await;
    assert!(
        r.node(&id("a")).is_some(),
        "removed at its first empty report"
    );
    // A report in between that lists a room starts the count again.
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    beat_state(
        &r,
        "a",
        1000.0,
        1.0,
        Some(vec![("late", 1)]),
        AdminState::Draining,
    )
    .await;
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    draining().await;
    assert!(r.node(&id("a")).is_some());
    r.clock().advance(HEARTBEAT_INTERVAL_MS - 1);
    draining().await;
    assert!(
        r.node(&id("a")).is_some(),
        "sooner than a heartbeat interval"
    );
    r.clock().advance(1);
    draining().await;
    assert!(r.node(&id("a")).is_none());
}

#[tokio::test]
async fn a_node_that_drains_itself_is_not_removed_under_a_room_being_placed_there() {
    // A join chose the node while it was active and is pinning a new room there when the
    // node's first empty draining report comes in: no pin shows the room yet. Removed then,
    // the room's next join would be placed elsewhere while its first user lands here.
    let store = HookedStore {
        pin_pause: Some((tokio::sync::Notify::new(), tokio::sync::Notify::new())),
        ..HookedStore::default()
    };
    let r = Arc::new(with_store(store));
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await;
    // Past new_room_limit: new rooms go to a while it is active.
    beat(&r, "b", 1000.0, 900.0, Some(vec![])).await;
    let first = tokio::spawn({
        let r = r.clone();
        async move { join(&r, "fresh").await }
    });
    let (pinning, go) = r.store.pin_pause.as_ref().unwrap();
    pinning.notified().await;
    let draining = || beat_state(&r, "a", 1000.0, 0.0, Some(vec![]), AdminState::Draining);
    draining().await;
    go.notify_one();
    assert_eq!(first.await.unwrap().unwrap().node.id.as_str(), "a");
    // The room's next user goes where its first one went.
    assert_eq!(node_of(&r, "fresh").await, "a");
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    draining().await;
    assert!(r.node(&id("a")).is_some(), "removed under the new room");
    assert_eq!(node_of(&r, "fresh").await, "a");
}

#[tokio::test]
async fn a_removed_drained_node_that_keeps_reporting_stays_removed() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let draining = || beat_state(&r, "a", 1000.0, 0.0, Some(vec![]), AdminState::Draining);
    assert_eq!(draining().await.state, AdminState::Draining);
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    assert_eq!(draining().await.state, AdminState::Draining);
    assert!(r.node(&id("a")).is_none());
    let snapshot = r.cluster.snapshot_arc();
    for _ in 0..3 {
        r.clock().advance(2_000);
        let reply = draining().await;
        assert_eq!(reply.state, AdminState::Draining);
        assert!(r.node(&id("a")).is_none());
    }
    assert!(
        Arc::ptr_eq(&snapshot, &r.cluster.snapshot_arc()),
        "the node was added and removed again"
    );
    // An admin's disable outlives the removal and is what the node hears.
    beat(&r, "a", 1000.0, 0.0, None).await;
    r.set_admin_state(&id("a"), AdminState::Disabled);
    draining().await;
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    draining().await;
    assert!(r.node(&id("a")).is_none());
    assert_eq!(draining().await.state, AdminState::Disabled);
    // Active again, it is back.
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await;
    assert!(r.node(&id("a")).is_some());
}

#[tokio::test]
async fn a_self_draining_node_stays_while_a_ticket_for_it_may_arrive() {
    // Its last room ended just after a join was routed there: the pin is kept for that
    // ticket, so the node is not removed under it (the next join would land elsewhere).
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "last").await.unwrap();
    beat(&r, "a", 1000.0, 1.0, Some(vec![("last", 1)])).await;
    r.clock().advance(1_000);
    let draining = |rooms| beat_state(&r, "a", 1000.0, 0.0, Some(rooms), AdminState::Draining);
    draining(vec![("last", 0)]).await;
    assert!(
        r.node(&id("a")).is_some(),
        "removed with a ticket outstanding"
    );
    assert_eq!(
        r.room(&room("last")).await.unwrap().unwrap().node.as_str(),
        "a"
    );
    // The ticket's acceptance window (60 s + the 61 s a node may still take it) passes: the
    // room is released and the node removed.
    r.clock().advance(TICKET_WINDOW_MS);
    draining(vec![]).await;
    assert!(r.room(&room("last")).await.unwrap().is_none());
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    draining(vec![]).await;
    assert!(r.node(&id("a")).is_none());
}

#[tokio::test]
async fn a_drained_node_stays_while_a_ticket_for_a_room_it_never_listed_may_arrive() {
    // A room placed on the node after its last report: its first user holds a ticket for
    // the node, and the node has nothing to list yet. Removing the node would place the
    // room's next join elsewhere while that user lands on the node: a split.
    let r = router();
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await;
    join(&r, "fresh").await.unwrap();
    r.clock().advance(500);
    let draining = || beat_state(&r, "a", 1000.0, 0.0, Some(vec![]), AdminState::Draining);
    draining().await;
    assert!(
        r.node(&id("a")).is_some(),
        "removed with a ticket outstanding"
    );
    assert_eq!(
        node_of(&r, "fresh").await,
        "a",
        "the room stays where its user goes"
    );
    // Once no ticket for it can arrive (the room's last join is older than a ticket's
    // acceptance window, 121 s), the drained node goes; a ticket past its `exp` but within
    // a node's leeway still holds it.
    r.clock().advance(TICKET_TTL_MS + 30_000);
    draining().await;
    assert!(r.node(&id("a")).is_some(), "a ticket may still arrive");
    r.clock()
        .advance(TICKET_WINDOW_MS - TICKET_TTL_MS - 30_000 + 1_000);
    draining().await;
    r.clock().advance(HEARTBEAT_INTERVAL_MS);
    draining().await;
    assert!(r.node(&id("a")).is_none());
}

#[tokio::test]
async fn a_node_that_leaves_and_comes_back_counts_its_new_reservations() {
    // A reservation made before the node left (DELETE on shutdown, a restart) lapses after
    // it came back: releasing it must not take it off the counters the node came back with.
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    let sized = |k: &'static str, size| {
        let r = &r;
        async move { create(r, k, Some(size)).await }
    };
    sized("before", 40).await;
    assert!(r.remove_node(&id("a")));
    beat(&r, "a", 100.0, 0.0, None).await;
    r.clock().advance(301_000); // past `reservation_ttl`
    beat(&r, "a", 100.0, 0.0, None).await;
    r.sweep().await.unwrap();
    let p = sized("after", 30).await;
    assert_eq!(p.node.id.as_str(), "a");
    assert!((p.node.live.reserved_units() - 30.0).abs() < 1e-9);
    assert!((p.node.utilization() - 0.30).abs() < 1e-9);
}

#[tokio::test]
async fn joins_keep_a_busy_rooms_pin_confirmed() {
    // The pinned fast path leaves confirmation to the general path once a pin is due: a room
    // that keeps getting joins is never swept, even if its node never reports rooms.
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    join(&r, "busy").await.unwrap();
    let pin = r.room(&room("busy")).await.unwrap().unwrap();
    assert!(
        r.pinned_decision(&pin, T0 + 1_000, |n, _| n.id.to_string())
            .is_some(),
        "a fresh pin is decided on the fast path"
    );
    assert!(
        r.pinned_decision(&pin, T0 + 500_000, |_, _| ()).is_none(),
        "a pin due for confirmation goes down the general path"
    );
    for _ in 0..4 {
        r.clock().advance(300_000);
        beat(&r, "a", 1000.0, 0.0, None).await;
        assert_eq!(node_of(&r, "busy").await, "a");
    }
    // 1 200 s after placement, twice the idle TTL: still pinned, confirmed by the joins.
    assert_eq!(r.sweep().await.unwrap(), 0);
    let pin = r.room(&room("busy")).await.unwrap().unwrap();
    assert_eq!(pin.confirmed_at, T0 + 1_200_000);
}

#[tokio::test]
async fn a_join_its_rooms_own_reservation_covers_goes_in_at_the_join_limit() {
    // Reservations count against joins up to new_room_limit only: with it at the join
    // limit, they count in full, and a room's own reservation is what lets its joins in.
    let r = limits_equal();
    beat(&r, "a", 100.0, 0.0, None).await;
    // A class expected at 60 reserves its seats on the empty node.
    let class = r
        .place(&room("class"), &Hints::default(), Some(60), Intent::Join)
        .await
        .unwrap();
    assert_eq!(class.node.id.as_str(), "a");
    join(&r, "standup").await.unwrap();
    // Then the standup grows to 45 (its ten expected are in: its reservation is done), and
    // the class's reservation takes the node past the join limit (0.45 + 0.59 + its join).
    beat(&r, "a", 100.0, 45.0, Some(vec![("standup", 45)])).await;
    assert!(class.node.live.utilization(100.0) >= 1.0);
    // Its participants were expected: each moves a unit from reserved to pending, û stays.
    let before = class.node.live.utilization(100.0);
    for _ in 0..10 {
        assert_eq!(node_of(&r, "class").await, "a");
    }
    assert!((class.node.live.utilization(100.0) - before).abs() < 1e-9);
    // Another room's join is refused: the class's reservation counts against it.
    assert!(matches!(
        join(&r, "standup").await,
        Err(JoinError::NodeFull { .. })
    ));
}

#[tokio::test]
async fn a_forecast_never_fills_a_node_against_the_meetings_already_on_it() {
    // Anyone may send `?size=` (with `auth.users = "none"`): one absurd hint must not make
    // the node refuse the next joins of meetings it hosts, for `reservation_ttl`.
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    join(&r, "meeting").await.unwrap();
    beat(&r, "a", 100.0, 10.0, Some(vec![("meeting", 10)])).await;
    let evil = create(&r, "evil", Some(10_000)).await;
    assert_eq!(evil.node.id.as_str(), "a");
    // It reserved what the node had left below new_room_limit (0.8), not 10 000.
    assert_eq!(evil.node.live.reserved_units(), 70.0);
    // Enough to turn new rooms away (they overflow onto the least loaded node: this one,
    // alone here), never the meeting's participants.
    for _ in 0..15 {
        join(&r, "meeting").await.unwrap();
    }
    // Hints placed at once (here: reserved by hand, as several placements each seeing the
    // same headroom, or several routers sharing theirs, would) add up past the join limit;
    // the meeting's joins still go in while its real load is under the limit.
    evil.node.live.add_reserved(500);
    assert!(evil.node.live.utilization(100.0) > 5.0);
    join(&r, "meeting").await.unwrap();
}

#[tokio::test]
async fn an_in_session_request_reaches_its_full_node_and_counts_nothing() {
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    join(&r, "standup").await.unwrap();
    beat(&r, "a", 100.0, 100.0, Some(vec![("standup", 10)])).await;
    let live = r.cluster.snapshot().get(&id("a")).unwrap().live.clone();
    let u = live.utilization(100.0);
    assert!(matches!(
        join(&r, "standup").await,
        Err(JoinError::NodeFull { .. })
    ));
    for _ in 0..5 {
        let p = r
            .place(&room("standup"), &Hints::default(), None, Intent::InSession)
            .await
            .unwrap();
        assert_eq!(p.node.id.as_str(), "a");
    }
    assert_eq!(
        live.utilization(100.0),
        u,
        "in-session requests are not joins"
    );
    // A room without a usable pin is placed afresh, and that counts.
    beat(&r, "b", 100.0, 0.0, None).await;
    let p = r
        .place(&room("new"), &Hints::default(), None, Intent::InSession)
        .await
        .unwrap();
    assert_eq!(p.node.id.as_str(), "b");
    assert_eq!(p.node.live.pending_units(), 1.0);
}

#[tokio::test]
async fn a_report_listing_a_room_twice_does_not_release_it() {
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    beat(&r, "b", 100.0, 0.0, None).await;
    let home = node_of(&r, "dup").await;
    // Past a ticket's lifetime: an ended room's pin would be released at once.
    r.clock().advance(200_000);
    // Once live and once ended (or "Dup" and "dup", which normalize to one key).
    let reply = beat(&r, &home, 100.0, 3.0, Some(vec![("dup", 3), ("Dup", 0)])).await;
    assert!(reply.evict.is_empty(), "{:?}", reply.evict);
    let pin = r.room(&room("dup")).await.unwrap();
    assert_eq!(pin.map(|p| p.node.to_string()), Some(home.clone()));
    for _ in 0..5 {
        assert_eq!(node_of(&r, "dup").await, home);
    }
}

/// The memory store, with hooks for what happens between two steps of the router:
/// - `moved_before_confirm`: the next `confirm` of that room first moves its pin to that
///   node, as another router sharing the store does between this router's read of the pin
///   and its confirmation of it;
/// - `sweep_pause`: `sweep_idle` says it has swept (the first) and waits for a go (the
///   second) before it answers, so that a test can act in between.
/// - `refuse_releases`: `release_if` fails, as a store that times out would.
#[derive(Default)]
struct HookedStore {
    inner: MemoryStore,
    moved_before_confirm: std::sync::Mutex<Option<(RoomKey, NodeId)>>,
    sweep_pause: Option<(tokio::sync::Notify, tokio::sync::Notify)>,
    refuse_releases: std::sync::atomic::AtomicBool,
    releases: std::sync::atomic::AtomicUsize,
    /// The room whose pin is deleted just before the next `pin_if` on it (an admin's
    /// `DELETE` racing a node's takeover).
    removed_before_pin: std::sync::Mutex<Option<RoomKey>>,
    /// As `sweep_pause`, for the next `pin_if` (once): says it was called, and waits for a go.
    pin_pause: Option<(tokio::sync::Notify, tokio::sync::Notify)>,
    pin_paused: std::sync::atomic::AtomicBool,
    /// A store other routers share, every one of which still hears every node this router
    /// takes for gone (`node_alive_elsewhere`).
    heard_elsewhere: std::sync::atomic::AtomicBool,
    /// What the next `get` answers instead of the pin (once): this router's cached read of a
    /// pin another router has changed since.
    stale_read: std::sync::Mutex<Option<Pin>>,
    /// The shared store is out of reach: the router decides alone.
    alone: std::sync::atomic::AtomicBool,
}

impl PinStore for HookedStore {
    async fn get(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        if let Some(stale) = self.stale_read.lock().unwrap().take() {
            return Ok(Some(stale));
        }
        self.inner.get(room).await
    }
    fn shared(&self) -> bool {
        self.heard_elsewhere.load(Ordering::SeqCst) || self.alone.load(Ordering::SeqCst)
    }
    fn deciding_alone(&self) -> bool {
        self.alone.load(Ordering::SeqCst)
    }
    async fn node_alive_elsewhere(&self, _node: &NodeId) -> Option<bool> {
        self.heard_elsewhere.load(Ordering::SeqCst).then_some(true)
    }
    async fn pin_if(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> Result<PinOutcome, StoreError> {
        let armed = self.removed_before_pin.lock().unwrap().take();
        if let Some(removed) = armed.filter(|r| r == room) {
            self.inner.remove(&removed).await?;
        }
        if let Some((pinning, go)) = &self.pin_pause {
            if !self.pin_paused.swap(true, Ordering::SeqCst) {
                pinning.notify_one();
                go.notified().await;
            }
        }
        self.inner.pin_if(room, node, expected, now).await
    }
    async fn confirm(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let armed = self.moved_before_confirm.lock().unwrap().take();
        if let Some((moved, to)) = armed.filter(|(moved, _)| moved == room) {
            self.inner.pin_if(&moved, &to, Some(node), now).await?;
        }
        self.inner.confirm(room, node, now).await
    }
    async fn release_if(&self, room: &RoomKey, node: &NodeId) -> Result<bool, StoreError> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        if self.refuse_releases.load(Ordering::SeqCst) {
            return Err(StoreError("release refused".into()));
        }
        self.inner.release_if(room, node).await
    }
    async fn release_if_unconfirmed(
        &self,
        room: &RoomKey,
        node: &NodeId,
        before: Millis,
    ) -> Result<Unconfirmed, StoreError> {
        self.inner.release_if_unconfirmed(room, node, before).await
    }
    async fn remove(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        self.inner.remove(room).await
    }
    async fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<crate::store::Page, StoreError> {
        self.inner.list(cursor, limit).await
    }
    async fn sweep_idle(
        &self,
        before: Millis,
        now: Millis,
    ) -> Result<Vec<(RoomKey, NodeId)>, StoreError> {
        let swept = self.inner.sweep_idle(before, now).await;
        if let Some((swept_signal, go)) = &self.sweep_pause {
            swept_signal.notify_one();
            go.notified().await;
        }
        swept
    }
    async fn count(&self) -> Result<usize, StoreError> {
        self.inner.count().await
    }
    fn any_pin(&self, f: impl FnMut(&RoomKey, &Pin) -> bool) -> bool {
        self.inner.any_pin(f)
    }
    fn health(&self) -> StoreHealth {
        self.inner.health()
    }
}

/// A node reporting a room pinned to a dead node takes it over; if the pin is deleted just
/// before (an admin's `DELETE`, the idle sweep), the takeover is tried again on what the
/// store holds now, not taken for a split: the room is the reporting node's, not evicted.
#[tokio::test]
async fn a_takeover_that_finds_the_pin_gone_adopts_the_room_instead_of_evicting_it() {
    let r = with_store(HookedStore::default());
    beat(&r, "a", 1000.0, 0.0, None).await;
    assert_eq!(node_of(&r, "talk").await, "a");
    // a goes silent; b, which the room's users reached meanwhile, reports it.
    r.clock()
        .advance(Config::default().placement.heartbeat_timeout.as_millis() as u64 + 1);
    *r.store.removed_before_pin.lock().unwrap() = Some(room("talk"));
    let reply = beat(&r, "b", 1000.0, 3.0, Some(vec![("talk", 3)])).await;
    assert!(reply.evict.is_empty(), "evicted: {:?}", reply.evict);
    assert_eq!(r.metrics.splits_detected.get(), 0);
    assert_eq!(node_of(&r, "talk").await, "b");
}

/// The same, when the release that fails is of a room the heartbeat reports ended (rooms are
/// taken in name order: "a-new" is adopted first, then "z-ended" fails).
#[tokio::test]
async fn a_heartbeat_that_failed_on_an_ended_room_keeps_the_rooms_it_adopted() {
    let r = with_store(HookedStore::default());
    beat(&r, "a", 1000.0, 0.0, None).await;
    assert_eq!(node_of(&r, "z-ended").await, "a");
    beat(&r, "a", 1000.0, 1.0, Some(vec![("z-ended", 1)])).await;
    r.clock().advance(TICKET_WINDOW_MS + 1);
    r.store.refuse_releases.store(true, Ordering::SeqCst);
    let failed = try_beat(
        &r,
        "a",
        1000.0,
        0.0,
        Some(vec![("a-new", 2), ("z-ended", 0)]),
        AdminState::Active,
    )
    .await;
    assert!(failed.is_err());
    r.store.refuse_releases.store(false, Ordering::SeqCst);
    // Both rooms are gone by the next heartbeat: both are ended.
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await;
    for k in ["a-new", "z-ended"] {
        assert!(r.room(&room(k)).await.unwrap().is_none(), "{k} ended");
    }
}

/// A room a node reports ended (0 participants) is ended once by that heartbeat, not again
/// as a room the node no longer lists: between the two, a join may have placed the room
/// again, and the second release would take that new pin.
#[tokio::test]
async fn a_room_reported_ended_is_released_once_per_heartbeat() {
    let r = with_store(HookedStore::default());
    beat(&r, "a", 1000.0, 0.0, None).await;
    assert_eq!(node_of(&r, "r1").await, "a");
    beat(&r, "a", 1000.0, 1.0, Some(vec![("r1", 1)])).await;
    r.clock().advance(TICKET_WINDOW_MS + 1);
    beat(&r, "a", 1000.0, 0.0, Some(vec![("r1", 0)])).await;
    assert!(r.room(&room("r1")).await.unwrap().is_none(), "ended");
    assert_eq!(r.store.releases.load(Ordering::SeqCst), 1);
}

/// A heartbeat that fails half-way (the store refused a release) leaves the node's reported
/// rooms as they were: the next heartbeat still ends the rooms the node stopped listing.
#[tokio::test]
async fn a_heartbeat_that_failed_half_way_loses_none_of_the_rooms_to_compare_with() {
    let store = HookedStore::default();
    let r = with_store(store);
    beat(&r, "a", 1000.0, 0.0, None).await;
    for k in ["r1", "r2"] {
        assert_eq!(node_of(&r, k).await, "a");
    }
    beat(&r, "a", 1000.0, 2.0, Some(vec![("r1", 1), ("r2", 1)])).await;
    r.clock().advance(TICKET_WINDOW_MS + 1);
    r.store.refuse_releases.store(true, Ordering::SeqCst);
    // The failing heartbeat also lists a room for the first time (adopted).
    let failed = try_beat(
        &r,
        "a",
        1000.0,
        0.0,
        Some(vec![("r3", 1)]),
        AdminState::Active,
    )
    .await;
    assert!(failed.is_err());
    assert_eq!(node_of(&r, "r3").await, "a", "r3 adopted");
    r.clock().advance(TICKET_WINDOW_MS + 1);
    r.store.refuse_releases.store(false, Ordering::SeqCst);
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await;
    for k in ["r1", "r2", "r3"] {
        assert!(r.room(&room(k)).await.unwrap().is_none(), "{k} ended");
    }
}

#[tokio::test]
async fn a_join_whose_pin_moved_before_its_confirmation_follows_the_pin() {
    let store = HookedStore::default();
    let r = with_store(store);
    beat(&r, "a", 100.0, 0.0, None).await;
    beat(&r, "b", 100.0, 0.0, None).await;
    let first = node_of(&r, "moved").await;
    let other = if first == "a" { "b" } else { "a" };
    // Past the confirmation interval, the next join confirms the pin; another router moves
    // the room to the other node just before that.
    r.clock().advance(r.confirm_every_ms() + 1);
    beat(&r, "a", 100.0, 0.0, None).await;
    beat(&r, "b", 100.0, 0.0, None).await;
    *r.store.moved_before_confirm.lock().unwrap() = Some((room("moved"), id(other)));
    let pending_on_first = || {
        let nodes = r.cluster.snapshot();
        nodes.get(&id(first.as_str())).unwrap().live.pending_units()
    };
    let before = pending_on_first();
    assert_eq!(
        node_of(&r, "moved").await,
        other,
        "the join is sent where the room is now, not where it was"
    );
    let pin = r.room(&room("moved")).await.unwrap().unwrap();
    assert_eq!(pin.node.as_str(), other);
    assert_eq!(
        pending_on_first(),
        before,
        "nothing counted on the node the user was not sent to"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_racing_its_rooms_end_report_keeps_the_room_where_it_sent_the_user() {
    // Rooms whose last join is older than a ticket's window end on their node while new
    // joins for them arrive. Whichever comes first, the room must stay pinned where each
    // join was sent: either the report sees the join (and keeps the pin) or the join sees
    // the pin gone (and places the room afresh).
    let r = Arc::new(router());
    beat(&r, "a", 1_000_000.0, 0.0, None).await;
    let rooms: Vec<String> = (0..2_000).map(|i| format!("race-{i}")).collect();
    for k in &rooms {
        join(&*r, k).await.unwrap();
    }
    // Reports keep the pins confirmed, so the joins below take the pinned fast path.
    r.clock().advance(100_000);
    let listed: Vec<(&str, u32)> = rooms.iter().map(|k| (k.as_str(), 1)).collect();
    beat(&r, "a", 1_000_000.0, 0.0, Some(listed)).await;
    r.clock().advance(TICKET_WINDOW_MS - 100_000 + 1);
    beat(&r, "a", 1_000_000.0, 0.0, None).await; // alive, rooms not listed
    let joiner = {
        let (r, rooms) = (r.clone(), rooms.clone());
        tokio::spawn(async move {
            let mut sent = Vec::new();
            for k in rooms.iter().rev() {
                sent.push((k.clone(), node_of(&*r, k).await));
            }
            sent
        })
    };
    beat(&r, "a", 1_000_000.0, 0.0, Some(vec![])).await;
    for (k, node) in joiner.await.unwrap() {
        let pin = r.room(&room(&k)).await.unwrap();
        assert_eq!(
            pin.map(|p| p.node.to_string()),
            Some(node),
            "{k}: a user was sent to a node that no longer holds the room's pin"
        );
    }
}

#[tokio::test]
async fn a_reservation_swept_with_its_pin_spares_the_rooms_next_placement() {
    // The idle sweep releases a room's pin; before it settles the room's reservation, a
    // lookup places the room again, reserving its size anew. That reservation stays.
    let store = HookedStore {
        sweep_pause: Some(Default::default()),
        ..Default::default()
    };
    let r = with_store(store);
    beat(&r, "a", 1000.0, 0.0, None).await;
    create(&r, "class", Some(30)).await;
    r.clock().advance(
        Config::default().placement.room_idle_ttl.as_millis() as u64 + r.confirm_every_ms() + 1,
    );
    beat(&r, "a", 1000.0, 0.0, None).await;
    let (swept, go) = r.store.sweep_pause.as_ref().unwrap();
    let placed_again = async {
        swept.notified().await;
        let p = create(&r, "class", Some(30)).await;
        go.notify_one();
        p
    };
    let (released, p) = tokio::join!(r.sweep(), placed_again);
    assert_eq!(released.unwrap(), 1, "the idle pin was swept");
    assert!(p.created, "and the room placed again");
    assert_eq!(
        p.node.live.reserved_units(),
        30.0,
        "its new reservation stands"
    );
}

#[tokio::test]
async fn a_reservation_on_a_removed_nodes_old_counters_lets_no_join_past_the_limit() {
    // A join to a full node is let in on the room's own reservation, which û would free as
    // the participant arrives. A reservation made on a node removed and added back since is
    // on counters the node no longer has: it frees nothing there. (Reservations count in
    // full against joins when new_room_limit is the join limit.)
    let r = limits_equal();
    beat(&r, "a", 100.0, 0.0, None).await;
    create(&r, "class", Some(60)).await;
    assert!(r.remove_node(&id("a")));
    beat(&r, "a", 100.0, 75.0, None).await;
    // It reserves the 5 units left below new_room_limit, then the node fills up.
    create(&r, "other", Some(30)).await;
    beat(&r, "a", 100.0, 96.0, None).await;
    assert!(
        matches!(join(&r, "class").await, Err(JoinError::NodeFull { .. })),
        "the node is full and nothing reserved on it is the room's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_scrapes_each_see_every_node() {
    // Prometheus and a second scraper (a dashboard, an HA pair) at once: each scrape fills
    // the per-node gauges afresh, and neither may render the other's half-filled set.
    let r = Arc::new(router());
    let nodes = 40;
    for n in 0..nodes {
        beat(&r, &format!("n{n}"), 1000.0, 0.0, None).await;
    }
    let mut scrapes = Vec::new();
    for _ in 0..4 {
        let r = r.clone();
        scrapes.push(tokio::spawn(async move {
            for _ in 0..100 {
                let text = r.render_metrics().await;
                let series = text
                    .lines()
                    .filter(|l| l.starts_with("roomrouter_node_utilization{"))
                    .count();
                assert_eq!(series, nodes, "a scrape lost node series");
            }
        }));
    }
    for s in scrapes {
        s.await.unwrap();
    }
}

#[tokio::test]
async fn a_re_placement_is_one_decision_in_the_metrics() {
    let r = router();
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    let first = node_of(&r, "moving").await;
    let other = if first == "a" { "b" } else { "a" };
    // The room's node stops beating; the other goes on past its timeout.
    r.clock().advance(7_000);
    beat(&r, other, 1000.0, 0.0, None).await;
    assert_eq!(node_of(&r, "moving").await, other);
    let text = r.render_metrics().await;
    let outcome = |o: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("roomrouter_decisions_total{{outcome=\"{o}\"}} "))
            })
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    let all: f64 = text
        .lines()
        .filter(|l| l.starts_with("roomrouter_decisions_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        (outcome("placed"), outcome("replaced")),
        (1.0, 1.0),
        "{text}"
    );
    assert_eq!(all, 2.0, "two decisions, one outcome each: {text}");
}

/// A join held on the node a router no longer hears, because other routers sharing the
/// store still do, goes there only as any pinned join would: if that node's last report
/// says it is full, the join is refused (`node_full`), never sent past `join_limit` (a
/// review's finding).
#[tokio::test]
async fn a_join_held_on_a_node_heard_elsewhere_respects_the_join_limit() {
    let r = with_store(HookedStore::default());
    r.store.heard_elsewhere.store(true, Ordering::SeqCst);
    beat(&r, "a", 100.0, 0.0, None).await;
    assert_eq!(node_of(&r, "talk").await, "a");
    beat(&r, "a", 100.0, 100.0, Some(vec![("talk", 100)])).await;
    assert!(matches!(
        join(&r, "talk").await,
        Err(JoinError::NodeFull { .. })
    ));
    // This router stops hearing a; another one still does.
    r.clock().advance(heartbeat_timeout_ms() + 1);
    beat(&r, "b", 100.0, 0.0, None).await;
    let got = join(&r, "talk").await;
    assert!(
        matches!(&got, Err(JoinError::NodeFull { node }) if node.as_str() == "a"),
        "{:?}",
        got.map(|p| p.node.id.clone())
    );
    // Still pinned to a: a lookup answers a, and nothing moved.
    assert_eq!(
        r.room(&room("talk")).await.unwrap().unwrap().node.as_str(),
        "a"
    );
}

/// A join held on a node heard elsewhere follows the pin as the store holds it now: if
/// another router moved the room since this router read its pin, the join goes to the
/// room's new node, not to the old one (a split; a review's finding).
#[tokio::test]
async fn a_join_held_on_a_node_heard_elsewhere_follows_the_pin_as_stored() {
    let r = with_store(HookedStore::default());
    r.store.heard_elsewhere.store(true, Ordering::SeqCst);
    let talk = talk_pinned_to_a(&r).await;
    let read = r.store.inner.get(&talk).await.unwrap();
    // Another router moves the room to b; this router's read still says a.
    r.store
        .inner
        .pin_if(&talk, &id("b"), Some(&id("a")), T0)
        .await
        .unwrap();
    *r.store.stale_read.lock().unwrap() = read;
    r.clock().advance(heartbeat_timeout_ms() + 1);
    beat(&r, "b", 100.0, 0.0, None).await;
    let p = join(&r, "talk").await.unwrap();
    assert_eq!(r.room(&talk).await.unwrap().unwrap().node.as_str(), "b");
    assert_eq!(
        p.node.id.as_str(),
        "b",
        "the join went to a node the room is not pinned to"
    );
}

/// A room a node takes over (it reports the room, whose pinned node is gone) leaves no
/// reservation on the node it left: that node, back from its blip, must not count a
/// meeting it no longer hosts until `reservation_ttl` (a review's finding).
#[tokio::test]
async fn a_room_taken_over_by_the_node_reporting_it_frees_its_old_nodes_reservation() {
    let r = router();
    beat(&r, "a", 100.0, 0.0, None).await;
    let p = create(&r, "class", Some(50)).await;
    assert_eq!(p.node.id.as_str(), "a");
    assert_eq!(p.node.live.reserved_units(), 50.0);
    // a falls silent; b, which the class's users reached, reports it and takes it over.
    r.clock().advance(heartbeat_timeout_ms() + 1);
    let reply = beat(&r, "b", 100.0, 3.0, Some(vec![("class", 3)])).await;
    assert!(reply.evict.is_empty());
    assert_eq!(
        r.room(&room("class")).await.unwrap().unwrap().node.as_str(),
        "b"
    );
    // a comes back empty.
    beat(&r, "a", 100.0, 0.0, Some(vec![])).await;
    r.sweep().await.unwrap();
    let a = r.cluster().snapshot().get(&id("a")).unwrap().clone();
    assert_eq!(
        a.live.reserved_units(),
        0.0,
        "a still holds the class's reservation"
    );
}

/// A join whose placement waited on the store is recorded at the time it was sent, not at
/// the time its decision began: a node's report that the room ended must keep the pin for
/// as long as the ticket the user got (issued after the wait) may arrive (a review's
/// finding: the recorded join lagged the ticket by the store's latency).
#[tokio::test]
async fn a_join_that_waited_on_the_store_is_recorded_when_it_was_sent() {
    let store = HookedStore {
        pin_pause: Some((tokio::sync::Notify::new(), tokio::sync::Notify::new())),
        ..HookedStore::default()
    };
    let r = Arc::new(with_store(store));
    beat(&r, "a", 1000.0, 0.0, Some(vec![])).await;
    let decided = r.now();
    let first = tokio::spawn({
        let r = r.clone();
        async move { join(&r, "slow").await }
    });
    let (pinning, go) = r.store.pin_pause.as_ref().unwrap();
    pinning.notified().await;
    // The store takes 5 s to answer.
    r.clock().advance(5_000);
    go.notify_one();
    first.await.unwrap().unwrap();
    let hash = room("slow").stable_hash();
    assert!(
        r.recent.joined_since(hash, decided + 4_999),
        "the join was recorded at its decision's start, 5 s before its ticket"
    );
}

/// While the shared store is out of reach, a node reporting a room this router's cache pins
/// to another live node is not evicted: the cache's pin may be this router's own decision,
/// taken alone, and the reporting half another router's. Each router evicting the other's
/// half emptied the room everywhere (a failure-injection run: 7 rooms of 23). Once the store
/// answers again, the same report is a split, evicted as ever.
#[tokio::test]
async fn a_room_reported_elsewhere_while_the_store_is_out_of_reach_is_not_evicted() {
    let r = with_store(HookedStore::default());
    let talk = talk_pinned_to_a(&r).await;
    r.store.alone.store(true, Ordering::SeqCst);
    let reply = beat(&r, "b", 100.0, 3.0, Some(vec![("talk", 3)])).await;
    assert!(
        reply.evict.is_empty(),
        "evicted while deciding alone: {:?}",
        reply.evict
    );
    assert_eq!(r.metrics.splits_detected.get(), 0);
    assert_eq!(r.room(&talk).await.unwrap().unwrap().node.as_str(), "a");
    r.store.alone.store(false, Ordering::SeqCst);
    let reply = beat(&r, "b", 100.0, 3.0, Some(vec![("talk", 3)])).await;
    assert_eq!(reply.evict.len(), 1, "a split once the store answers");
}

/// A router deciding alone places a new room by capacity alone, as every other router then
/// does, whatever load it sees: here the node the load-weighing default would avoid.
#[tokio::test]
async fn a_router_deciding_alone_places_new_rooms_as_every_router_would() {
    let r = with_store(HookedStore::default());
    beat(&r, "a", 100.0, 0.0, None).await;
    beat(&r, "b", 100.0, 0.0, None).await;
    // A room whose best-ranked node by capacity is b.
    let name = (0..)
        .map(|i| format!("room-{i}"))
        .find(|k| {
            let nodes = r.cluster().snapshot();
            let c = crate::placement::choose_alone(
                nodes.candidates(),
                room(k).stable_hash(),
                &Hints::default(),
                T0,
                &r.params,
            );
            matches!(c, Decision::Place { node, .. } if nodes.nodes()[node].id.as_str() == "b")
        })
        .unwrap();
    // b looks busy here (only this router hears its load): the default rule takes a.
    beat(&r, "b", 100.0, 60.0, None).await;
    let nodes = r.cluster().snapshot();
    let by_load = crate::placement::choose(
        nodes.candidates(),
        room(&name).stable_hash(),
        &Hints::default(),
        T0,
        &r.params,
    );
    assert!(
        matches!(by_load, Decision::Place { node, .. } if nodes.nodes()[node].id.as_str() == "a"),
        "nothing to show: {by_load:?}"
    );
    r.store.alone.store(true, Ordering::SeqCst);
    // explain says what the join then gets.
    let e = r
        .explain(&room(&name), &Hints::default(), None)
        .await
        .unwrap();
    assert_eq!(
        (e.rule, e.node.as_ref().map(|n| n.as_str())),
        ("alone", Some("b"))
    );
    assert_eq!(node_of(&r, &name).await, "b");
}

/// Nodes a and b report (100 units, empty), and room "talk" is pinned to a in the store.
async fn talk_pinned_to_a(r: &Router<HookedStore>) -> RoomKey {
    beat(r, "a", 100.0, 0.0, None).await;
    beat(r, "b", 100.0, 0.0, None).await;
    let talk = room("talk");
    r.store
        .inner
        .pin_if(&talk, &id("a"), None, T0)
        .await
        .unwrap();
    talk
}

/// `placement.forget_node_after` of the `forgetful` routers below, in ms.
const FORGET_MS: u64 = 60_000;

/// A router on `store` that forgets nodes silent for [`FORGET_MS`], with static node "s".
fn forgetful<S: PinStore>(store: S) -> Router<S> {
    let mut cfg = no_hold();
    cfg.placement.forget_node_after = std::time::Duration::from_millis(FORGET_MS);
    cfg.nodes.push(crate::config::StaticNode {
        id: "s".into(),
        url: "http://127.0.0.1:1".into(),
        upstream: None,
        capacity: 1000.0,
        region: None,
        tags: vec![],
    });
    let r = Router::new(&cfg, store, Clock::Manual(AtomicU64::new(T0)));
    r.watch(T0);
    r
}

/// Moves `r`'s clock on by `ms` with the router awake throughout (no gap), the nodes
/// `reporting` reporting every 500 ms.
async fn awake_for<S: PinStore>(r: &Router<S>, ms: u64, reporting: &[&str]) {
    let mut t = 0;
    while t < ms {
        r.clock().advance(500);
        t += 500;
        r.watch(r.now());
        for n in reporting {
            beat(r, n, 1000.0, 0.0, None).await;
        }
    }
}

/// The ids of the nodes in `r`'s table, sorted.
fn listed<S: PinStore>(r: &Router<S>) -> Vec<String> {
    let mut ids: Vec<String> = r.nodes().into_iter().map(|n| n.id.to_string()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn a_node_silent_for_forget_node_after_leaves_the_table_and_returns_as_it_left() {
    // A pod that crashed under a name of its own never reports again; without this it
    // stays listed, unhealthy, for good. Its drain is kept for the day it does come back.
    let r = forgetful(MemoryStore::new());
    beat(&r, "a", 1000.0, 0.0, None).await;
    beat(&r, "b", 1000.0, 0.0, None).await;
    assert!(r.set_admin_state(&id("a"), AdminState::Draining));
    awake_for(&r, FORGET_MS - 1_000, &["b"]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a", "b", "s"], "a dead, not yet forgotten");
    awake_for(&r, 1_500, &["b"]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["b", "s"], "the static node stays");
    beat(&r, "a", 1000.0, 0.0, None).await;
    let a = r.node(&id("a")).expect("back with its next heartbeat");
    assert_eq!(a.admin_state, AdminState::Draining);
    assert!(a.healthy);
}

#[tokio::test]
async fn a_node_heard_from_within_forget_node_after_is_kept_and_0_keeps_every_node() {
    // The silence is counted from the node's last report, not from when it died.
    let r = forgetful(MemoryStore::new());
    beat(&r, "a", 1000.0, 0.0, None).await;
    awake_for(&r, FORGET_MS - 10_000, &[]).await;
    assert!(!healthy(&r, "a"));
    beat(&r, "a", 1000.0, 0.0, None).await;
    // A node an admin put in the table by hand is the admin's to take out, as a static one.
    r.put_node(&id("p"), info(1000.0));
    beat(&r, "p", 1000.0, 0.0, None).await;
    awake_for(&r, 20_000, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a", "p", "s"]);
    awake_for(&r, FORGET_MS, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["p", "s"]);
    // 0: never, a day later and more.
    let mut cfg = no_hold();
    cfg.placement.forget_node_after = std::time::Duration::ZERO;
    let r = Router::new(&cfg, MemoryStore::new(), Clock::Manual(AtomicU64::new(T0)));
    r.watch(T0);
    beat(&r, "a", 1000.0, 0.0, None).await;
    awake_for(&r, 25 * 3_600_000, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a"]);
}

#[tokio::test]
async fn a_pause_of_the_router_or_an_unreachable_store_or_another_routers_word_forgets_no_node() {
    // Nodes unheard because the router was not running (or its clock jumped) are not
    // silent; the time given back is the pause's only.
    let r = forgetful(MemoryStore::new());
    beat(&r, "a", 1000.0, 0.0, None).await;
    r.clock().advance(2 * FORGET_MS);
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a", "s"]);
    awake_for(&r, FORGET_MS - 1_000, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(
        listed(&r),
        ["a", "s"],
        "silent for less than forget_node_after awake"
    );
    awake_for(&r, 1_500, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["s"]);
    // Deciding alone, the nodes heard only through the store are silent, not gone.
    let r = forgetful(HookedStore::default());
    beat(&r, "a", 1000.0, 0.0, None).await;
    r.store.alone.store(true, Ordering::SeqCst);
    awake_for(&r, FORGET_MS + 1_000, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a", "s"]);
    // Nor is the time spent alone counted once the store is back.
    r.store.alone.store(false, Ordering::SeqCst);
    awake_for(&r, FORGET_MS - 1_000, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a", "s"]);
    awake_for(&r, 1_500, &[]).await;
    // Another router still hears it: this router's view is the one behind.
    r.store.heard_elsewhere.store(true, Ordering::SeqCst);
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["a", "s"]);
    r.store.heard_elsewhere.store(false, Ordering::SeqCst);
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["s"]);
}

#[tokio::test]
async fn an_admin_may_change_the_state_a_forgotten_node_comes_back_with() {
    let r = forgetful(MemoryStore::new());
    beat(&r, "a", 1000.0, 0.0, None).await;
    assert!(r.set_admin_state(&id("a"), AdminState::Disabled));
    awake_for(&r, FORGET_MS + 500, &[]).await;
    r.sweep().await.unwrap();
    assert!(r.node(&id("a")).is_none());
    assert!(
        !r.set_admin_state(&id("ghost"), AdminState::Active),
        "unknown"
    );
    assert!(r.set_admin_state(&id("a"), AdminState::Active));
    assert!(r.node(&id("a")).is_none(), "not listed by it");
    beat(&r, "a", 1000.0, 0.0, None).await;
    assert_eq!(r.node(&id("a")).unwrap().admin_state, AdminState::Active);
}

#[tokio::test]
async fn pauses_of_the_router_far_apart_are_all_given_back_to_a_silent_node() {
    // The node dies; the router pauses twice for longer than the idle TTL, the pauses
    // further apart than one: the second must not wipe out the first's credit.
    let r = forgetful(MemoryStore::new());
    beat(&r, "a", 1000.0, 0.0, None).await;
    awake_for(&r, heartbeat_timeout_ms() + 1_000, &[]).await;
    assert!(!healthy(&r, "a"));
    let idle = Config::default().placement.room_idle_ttl.as_millis() as u64;
    for _ in 0..2 {
        r.clock().advance(idle + 60_000);
        r.sweep().await.unwrap();
        awake_for(&r, 2_500, &[]).await;
    }
    r.sweep().await.unwrap();
    assert_eq!(
        listed(&r),
        ["a", "s"],
        "silent for seconds while the router ran"
    );
    awake_for(&r, FORGET_MS, &[]).await;
    r.sweep().await.unwrap();
    assert_eq!(listed(&r), ["s"]);
}
