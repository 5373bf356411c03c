//! The shared pin store: Redis (standalone, Sentinel or Cluster), with a complete local
//! cache of pins.
//!
//! It owns the Redis data model (see ARCHITECTURE.md), the local pin cache, the write-back
//! of decisions taken while Redis was unreachable, the transport of shared node state, and
//! the connections: one pool of commands and one subscription, opened where
//! `Inner::follow_master` says (with Sentinel: wherever the sentinels name the master).
//!
//! Keys (`P` = `store.key_prefix`, which may not contain braces):
//! - `P:room:{ROOM}`: one string per pinned room, `node|created_ms|confirmed_ms`, expiring
//!   after twice `room_idle_ttl` unless confirmed. The hash tag is the room, so every
//!   single-room operation is one Lua script on one key slot (works on Redis Cluster).
//! - `{P}:rooms`: sorted set of pinned room names (score 0), an index for the cache load; a
//!   superset that loads and the idle sweep (a pin found expired) prune, and confirmations
//!   repair.
//! - `{P}:nodes` (hash id -> last report or registration as JSON), `{P}:admin` (hash id ->
//!   admin state), `{P}:registered` (set of the ids an admin registered by hand).
//! - `{P}:learned` (hash room -> `peak,peak,peak,last_seen_ms`: the learned sizes of rooms
//!   whose sessions ended, newest peak first) and `{P}:learned:seen` (sorted set room ->
//!   last_seen_ms, the index the routers' sweeps prune by `history_ttl`). Loaded by a
//!   starting router; written best effort (dropped while Redis is unreachable).
//! - channels `P:pins` (`ts\nvalue\nroom`, value empty when released), `P:nodes` (JSON)
//!   and `P:learned` (`origin\npeak,peak,peak,last_seen\nroom` for every learned size
//!   saved, so that every router knows what any of them learned).
//!
//! Reads never wait on Redis: the cache holds every pin (loaded at start and after every
//! reconnection, kept current by `P:pins`), so a pinned room costs one map lookup and a new
//! room one script. Only while the subscription is lost and Redis still answers does a read
//! go to Redis (the cache would miss other routers' changes), until it is open again. Each
//! cache entry carries the Redis server time (µs) of the change it reflects and only a newer
//! change replaces it, so our own replies and the subscription can arrive in any order. While Redis is unreachable the cache answers alone, decisions
//! are queued, and when Redis returns they are written back by compare-and-set: where the
//! store already holds a different pin, the store wins and the cache takes its pin (the
//! loser's node is then told to evict the room on its next heartbeat). Confirmations of
//! cached pins are queued too, so that the first idle sweep after a long outage does not
//! release rooms that stayed in use. Unreachable means that Redis fails a probe
//! (`Inner::probe`): a failed command or a lost subscription alone is not an outage. A
//! probe answered by another server than the one the store caught up with (a new `run_id`:
//! a restart) makes the store down and stalled at once (`Inner::mark_restarted`).
//! Nor is a recovery that fails while Redis answers (it refuses writes: out of memory, a
//! failed save, `min-replicas-to-write`; or refuses a subscription): the store stays down
//! but is *stalled* (`Inner::stalled`): it reads pins from Redis rather than from its
//! outage-old cache (but for its own queued decisions) and refuses new placements, which it
//! could not share and which the routers that do reach Redis may have taken differently,
//! until a recovery completes.
//!
//! With Sentinel (`store::sentinel`) a failover is a restart's kind of outage: a
//! `+switch-master` announcement, or a probe (after a refused command, or the liveness
//! check) answered by a master turned replica, marks the store down *and stalled* (the
//! other routers follow the sentinels to the new master, so new rooms wait for it rather
//! than being decided here alone; a lost connection with nobody answering is a plain
//! outage), and the reconnection asks the sentinels for the master
//! again before it reopens the commands' pool and the subscription there. The new master
//! has a new `run_id`, so, as after a restart, every cached pin is written back by
//! compare-and-set (pins the old master had not yet replicated are restored, and so is a
//! re-placement it had not replicated, over the older pin the new master still holds).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use arc_swap::ArcSwap;
use dashmap::DashMap;
use futures_util::future::join_all;
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::sentinel::Sentinels;
use super::{Page, Pin, PinOutcome, PinStore, StoreError, StoreHealth, Unconfirmed};
use crate::cluster::reservations::Learned;
use crate::cluster::sync::{NodeSync, NodeUpdate};
use crate::cluster::{Cluster, NodeId};
use crate::config::StoreConfig;
use crate::placement::Millis;
use crate::room::{Normalization, RoomKey, RoomMap};

/// Sets the pin if the current node is ARGV[2] ('' = no pin), created and confirmed at
/// ARGV[3], or created at ARGV[7] when given (a write-back keeps the pin's own). Returns
/// {won, value, ts}; {2, '', ts} and nothing written when Redis runs it after ARGV[8] (µs of
/// Redis's clock, when given): the router stopped waiting for it by then and decided the
/// room without it, and a pin written late (by a Redis that was frozen with the command
/// queued) would override that decision, under the meeting it hosts.
const PIN_IF: &str = r#"
local cur = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local ts = t[1] .. string.format('%06d', tonumber(t[2]))
if ARGV[8] and ARGV[8] ~= '' and tonumber(t[1]) * 1000000 + tonumber(t[2]) > tonumber(ARGV[8]) then
  return {2, '', ts}
end
local curnode = ''
if cur then curnode = string.match(cur, '^[^|]*') end
if (cur and ARGV[2] ~= '' and curnode == ARGV[2]) or ((not cur) and ARGV[2] == '') then
  local created = ARGV[3]
  if ARGV[7] and ARGV[7] ~= '' then created = ARGV[7] end
  local v = ARGV[1] .. '|' .. created .. '|' .. ARGV[3]
  redis.call('SET', KEYS[1], v, 'PX', ARGV[4])
  redis.call('PUBLISH', ARGV[5], ts .. '\n' .. v .. '\n' .. ARGV[6])
  return {1, v, ts}
end
return {0, cur or '', ts}
"#;

/// Refreshes confirmed_ms and the TTL if the pin still points at ARGV[1]. Returns 0/1.
/// confirmed_ms only moves forward, unless ARGV[4] is 'back' (the caller's wall clock
/// stepped back: its now is the latest confirmation it can vouch for).
const CONFIRM: &str = r#"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local node, created, confirmed = string.match(cur, '^([^|]*)|([^|]*)|([^|]*)$')
if node ~= ARGV[1] then return 0 end
if tonumber(ARGV[2]) > tonumber(confirmed) or ARGV[4] == 'back' then confirmed = ARGV[2] end
redis.call('SET', KEYS[1], node .. '|' .. created .. '|' .. confirmed, 'PX', ARGV[3])
return 1
"#;

/// Deletes the pin if it points at ARGV[1] ('' = whatever it points at). Returns {old, ts}
/// with old = '' when nothing was deleted.
const RELEASE_IF: &str = r#"
local cur = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local ts = t[1] .. string.format('%06d', tonumber(t[2]))
if not cur then return {'', ts} end
if ARGV[1] ~= '' and string.match(cur, '^[^|]*') ~= ARGV[1] then return {'', ts} end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ts .. '\n\n' .. ARGV[3])
return {cur, ts}
"#;

/// Reads the pin with the server time, so that the cache can take it in order. Returns
/// {value ('' = no pin), ts}.
const READ: &str = r#"
local cur = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
return {cur or '', t[1] .. string.format('%06d', tonumber(t[2]))}
"#;

/// Deletes the pin if not confirmed since ARGV[1] and, unless ARGV[4] is '', if it points at
/// ARGV[4]. Returns {state, value, ts}: state 1 = released (value = old), 0 = still in use
/// (value = current), 2 = points at another node (value = current), -1 = no pin.
const SWEEP: &str = r#"
local cur = redis.call('GET', KEYS[1])
local t = redis.call('TIME')
local ts = t[1] .. string.format('%06d', tonumber(t[2]))
if not cur then return {-1, '', ts} end
if ARGV[4] ~= '' and string.match(cur, '^[^|]*') ~= ARGV[4] then return {2, cur, ts} end
local confirmed = string.match(cur, '|([^|]*)$')
if tonumber(confirmed) >= tonumber(ARGV[1]) then return {0, cur, ts} end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[2], ts .. '\n\n' .. ARGV[3])
return {1, cur, ts}
"#;

/// What `SWEEP` did to one room.
enum Swept {
    /// Deleted; the pin it held.
    Released(Option<Pin>),
    /// Confirmed since the time asked about: kept.
    Confirmed,
    /// No pin, or (when a node was given) one to another node.
    NotThere,
}

/// What [`Inner::probe`] found.
enum Probe {
    /// Redis answers, and is the server the store last caught up with (or there is no
    /// telling: Cluster).
    Answers,
    /// Redis answers, but it restarted (or, with Sentinel, another master took over: the
    /// server answering is a replica now, or has another run id) since the store last
    /// caught up with it: it may have lost pins only the cache holds, and the other
    /// routers may be deciding on the new master.
    Restarted(String),
    /// Redis did not answer: why.
    Unreachable(String),
}

/// One Redis connection: a reconnecting multiplexed connection, or a Cluster connection.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }
    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }
    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Where commands and the subscription go now. Replaced whole when Sentinel names a new
/// master; fixed otherwise (the connections reconnect to the same server by themselves).
struct Pool {
    /// The server commands go to, `host:port` (for Cluster, the seed nodes).
    server: String,
    /// Where the subscription may open: the same server; for Cluster, every seed node (a
    /// message published on any node reaches the subscribers of all), tried in turn from
    /// the one that last worked, so that one seed gone does not cut the router off.
    subs: Vec<redis::Client>,
    conns: Vec<Conn>,
    /// What `conns` were opened with, to open one anew in place of a connection that went
    /// silent (see [`Inner::reopen`]); `None` for Cluster, whose connection keeps its own.
    client: Option<redis::Client>,
}

/// Opens `size` reconnecting multiplexed connections to one server (standalone, or the
/// master the sentinels named), each within `connect_timeout`.
async fn open_pool(
    client: redis::Client,
    size: usize,
    connect_timeout: Duration,
    command_timeout: Duration,
) -> anyhow::Result<Pool> {
    let server = client.get_connection_info().addr().to_string();
    let mut conns = Vec::with_capacity(size.max(1));
    for _ in 0..size.max(1) {
        conns.push(open_conn(&client, connect_timeout, command_timeout).await?);
    }
    Ok(Pool {
        server,
        subs: vec![client.clone()],
        conns,
        client: Some(client),
    })
}

/// Opens one reconnecting multiplexed connection within `connect_timeout`.
async fn open_conn(
    client: &redis::Client,
    connect_timeout: Duration,
    command_timeout: Duration,
) -> anyhow::Result<Conn> {
    let mc = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(command_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    let m = tokio::time::timeout(
        connect_timeout,
        ConnectionManager::new_with_config(client.clone(), mc),
    )
    .await
    .map_err(|_| anyhow::anyhow!("timed out"))
    .and_then(|r| r.map_err(anyhow::Error::from))
    .with_context(|| {
        format!(
            "cannot connect to Redis at {}",
            client.get_connection_info().addr()
        )
    })?;
    Ok(Conn::Single(m))
}

/// Key and channel names for one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    pub rooms_index: String,
    pub nodes: String,
    pub admin: String,
    /// The ids of the nodes an admin registered by hand (`PUT /v1/nodes/{id}`): their
    /// stored entry is whatever last reached a router (their reports replace the
    /// registration), but every router must keep them registered (never auto-removed).
    pub registered: String,
    pub pins_channel: String,
    pub nodes_channel: String,
    pub learned: String,
    pub learned_seen: String,
    pub learned_channel: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            rooms_index: format!("{{{prefix}}}:rooms"),
            nodes: format!("{{{prefix}}}:nodes"),
            admin: format!("{{{prefix}}}:admin"),
            registered: format!("{{{prefix}}}:registered"),
            pins_channel: format!("{prefix}:pins"),
            nodes_channel: format!("{prefix}:nodes"),
            learned: format!("{{{prefix}}}:learned"),
            learned_seen: format!("{{{prefix}}}:learned:seen"),
            learned_channel: format!("{prefix}:learned"),
        }
    }

    /// The key of a room's pin; its hash tag is the room.
    pub fn room(&self, room: &str) -> String {
        format!("{}:room:{{{}}}", self.prefix, room)
    }
}

/// A cached pin (`None`: released, kept as a tombstone) and the Redis time of that change.
#[derive(Debug, Clone)]
struct Cached {
    pin: Option<Pin>,
    /// Redis server time in µs of the change; 0 for a decision taken while Redis was away.
    ts: u64,
}

/// Redis's reply to `PIN_IF`: whether our pin went in, the room's pin after the script
/// ran, and the Redis time of that state.
struct PinReply {
    won: bool,
    pin: Option<Pin>,
    ts: u64,
}

/// A decision taken while Redis was unreachable, to write back.
#[derive(Debug, Clone)]
enum Pending {
    /// Pinned to `node`; the store held `expected` before the outage.
    Pinned {
        node: NodeId,
        expected: Option<NodeId>,
    },
    /// The pin to `node`, which the store holds, released here (its room ended, or an admin
    /// deleted it).
    Released { node: NodeId },
    /// The pin to `released`, which the store holds, released here and the room pinned to
    /// `node` since: written back as the compare-and-set from one to the other, whatever
    /// `released`'s health (an admin's deletion must not come undone).
    Replaced { node: NodeId, released: NodeId },
}

impl Pending {
    /// Whether `node` is the node this decision pins or the one it replaces.
    fn names(&self, node: &NodeId) -> bool {
        match self {
            Pending::Pinned { node: n, expected } => n == node || expected.as_ref() == Some(node),
            Pending::Released { node: n } => n == node,
            Pending::Replaced { node: n, released } => n == node || released == node,
        }
    }

    /// The one decision to write back for `self` followed by `newer`, taken against a cache
    /// that already showed `self` (queued behind it, `pin_if_local`; or while `self` was
    /// being written back and failed): the store still holds what `self` started from.
    fn then(self, newer: Pending) -> Pending {
        match (self, newer) {
            (
                Pending::Pinned { expected, .. },
                Pending::Pinned { node, .. } | Pending::Replaced { node, .. },
            ) => Pending::Pinned { node, expected },
            // A pin over E failed and the room was released here meanwhile: the store
            // still holds E, the pin to release (as `release_local` picks it when the pin is
            // still queued). Released as the new node, E's pin would stay in the store, and
            // the next reload would bring back the pin the admin had deleted.
            (Pending::Pinned { expected, .. }, Pending::Released { node }) => Pending::Released {
                node: expected.unwrap_or(node),
            },
            (
                Pending::Released { node: held } | Pending::Replaced { released: held, .. },
                Pending::Pinned { node, .. } | Pending::Replaced { node, .. },
            ) => Pending::Replaced {
                node,
                released: held,
            },
            (
                Pending::Released { node: held } | Pending::Replaced { released: held, .. },
                Pending::Released { .. },
            ) => Pending::Released { node: held },
        }
    }
}

enum IndexOp {
    Add(String),
    Remove(String),
}

/// A change to the learned room sizes, to write.
#[derive(Debug)]
enum LearnedOp {
    Save(String, Learned),
    /// Forget rooms not seen since this time (ms), and bring later times than the second
    /// back to it ([`PinStore::forget_learned`]).
    Forget(Millis, Millis),
}

/// Forgets learned sizes last seen before ARGV[1], at most ARGV[2] of them, and brings at
/// most ARGV[2] times later than ARGV[3] (stamped while a clock was ahead) back to ARGV[3],
/// in the index and in the value (`peaks,last_seen`). Returns how many were forgotten.
const FORGET_LEARNED: &str = r#"
local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #old > 0 then
  redis.call('HDEL', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
end
local ahead = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. ARGV[3], '+inf', 'LIMIT', 0, tonumber(ARGV[2]))
for _, room in ipairs(ahead) do
  local v = redis.call('HGET', KEYS[1], room)
  local peaks = v and string.match(v, '^(.*),[^,]*$')
  if peaks then
    redis.call('HSET', KEYS[1], room, peaks .. ',' .. ARGV[3])
  end
  redis.call('ZADD', KEYS[2], ARGV[3], room)
end
return #old
"#;

/// Most learned sizes one sweep forgets (the next sweeps take the rest).
const FORGET_AT_MOST: usize = 1000;

/// Most learned sizes heard from other routers and not yet taken by this router's sweep.
const MAX_LEARNED_INBOX: usize = 100_000;

/// Stores and announces node updates in order (KEYS[1]: the node hash, KEYS[2]: the admin
/// hash, both in the prefix's slot; ARGV[1]: the channel, then four per update: `set`,
/// `late` (a report stored only over an older one), `put`, `admin`, `del` or `none`, the
/// node id, the value, the announcement). `redis.call` stops
/// the script at a refused write, before that update's announcement. Returns the updates.
const WRITE_NODES: &str = r#"
local n = 0
for i = 2, #ARGV, 4 do
  local op, id = ARGV[i], ARGV[i + 1]
  if op == 'late' then
    -- A report kept through an outage: stored only over an older one (another router may
    -- have stored a newer report of the node since Redis returned).
    local cur = redis.call('HGET', KEYS[1], id)
    local ok, c = pcall(cjson.decode, cur or '')
    local at = tonumber(cjson.decode(ARGV[i + 2])['at'])
    if ok and type(c) == 'table' and c['kind'] == 'report' and tonumber(c['at'])
        and at and tonumber(c['at']) >= at then
      op = 'stale'
    else
      op = 'set'
    end
  end
  if op == 'set' then
    redis.call('HSET', KEYS[1], id, ARGV[i + 2])
  elseif op == 'put' then
    redis.call('HSET', KEYS[1], id, ARGV[i + 2])
    redis.call('SADD', KEYS[3], id)
  elseif op == 'admin' then
    redis.call('HSET', KEYS[2], id, ARGV[i + 2])
  elseif op == 'del' then
    redis.call('HDEL', KEYS[1], id)
    redis.call('SREM', KEYS[3], id)
  elseif op == 'forget' then
    -- A node forgotten for its silence: not over a report newer than the remover's last
    -- word of it, nor a node an admin registered; then not announced either.
    local cur = redis.call('HGET', KEYS[1], id)
    local ok, c = pcall(cjson.decode, cur or '')
    local since = tonumber(ARGV[i + 2])
    local newer = ok and type(c) == 'table' and c['kind'] == 'report' and tonumber(c['at'])
        and tonumber(c['at']) > since
    if newer or redis.call('SISMEMBER', KEYS[3], id) == 1 then
      op = 'stale'
    else
      redis.call('HDEL', KEYS[1], id)
    end
  end
  -- A late report older than the stored one is not announced either: a router that knows
  -- the node only from it would take its old load and state.
  if op ~= 'stale' then
    redis.call('PUBLISH', ARGV[1], ARGV[i + 3])
  end
  n = n + 1
end
return n
"#;

/// Most node updates one [`WRITE_NODES`] call (one round trip) takes from the node writer.
const MAX_NODE_BATCH: usize = 128;

#[derive(Serialize, Deserialize)]
struct Envelope {
    origin: String,
    update: NodeUpdate,
}

#[cfg(test)]
fn encode(pin: &Pin) -> String {
    format!("{}|{}|{}", pin.node, pin.created_at, pin.confirmed_at)
}

#[cfg(test)]
fn decode(v: &str) -> Option<Pin> {
    decode_with(v, |s| NodeId::parse(s).ok())
}

fn decode_with(v: &str, node_id: impl Fn(&str) -> Option<NodeId>) -> Option<Pin> {
    let mut it = v.split('|');
    let node = node_id(it.next()?)?;
    let created_at = it.next()?.parse().ok()?;
    let confirmed_at = it.next()?.parse().ok()?;
    Some(Pin {
        node,
        created_at,
        confirmed_at,
    })
}

struct Inner {
    keys: Keys,
    pool: ArcSwap<Pool>,
    next: AtomicUsize,
    /// Held while connections are opened in place of silent ones ([`Inner::reopen`]).
    reopening: tokio::sync::Mutex<()>,
    /// Command connections replaced because they went silent while Redis answered.
    reopened: AtomicU64,
    /// With Sentinel: whom to ask where the master is, on every reconnection.
    sentinels: Option<Sentinels>,
    pool_size: usize,
    cache: RoomMap<Cached>,
    node_ids: DashMap<Box<str>, NodeId>,
    pending: RoomMap<Pending>,
    /// Decisions [`Inner::write_back`] has taken out of `pending` and is writing now: reads
    /// do not turn to Redis for them, nor does a reload drop them, until Redis holds them
    /// (see [`Inner::queued`]).
    writing: RoomMap<Pending>,
    /// Rooms whose pin write-back failed with an error after which Redis may hold it all the
    /// same (a reply lost on the way back): at the next try, a pin on the same node and of
    /// the same creation time in the store may be this router's own ([`Inner::write_back_pin`]).
    tried: RoomMap<()>,
    /// Confirmations heard while Redis was unreachable: room -> (node, latest time), only
    /// for rooms whose cached pin points at that node (so at most one per cached pin).
    /// Written back on recovery: without them Redis would still hold the pre-outage
    /// confirmation, and the first idle sweep after an outage longer than the idle TTL
    /// would release rooms whose nodes kept confirming them all along.
    pending_confirms: RoomMap<(NodeId, Millis)>,
    /// Node changes that are not repeated (admin states, hand registrations, removals), and
    /// each node's newest report (see [`keep_unwritten`]), that could not be written: kept
    /// until written, by the writer's next round once Redis answers again, or by the
    /// write-back after an outage.
    pending_nodes: Mutex<HashMap<String, NodeUpdate>>,
    /// Admin changes this router shared that the node writer has not taken care of yet
    /// (written, or kept in `pending_nodes`), by node: the admin hash a re-sync reads may
    /// not have them ([`Inner::resync_admin`]).
    admin_in_flight: Mutex<HashMap<String, u32>>,
    /// Held by whoever writes node changes (the node writer, the supervisor's write-back of
    /// kept ones), so that they reach Redis in the order they were made.
    node_writes: tokio::sync::Mutex<()>,
    down: AtomicBool,
    /// Down, and the last recovery failed while Redis answered the probe: Redis is there
    /// but this router has not caught up with it (a write-back or a reload refused, or no
    /// subscription). Placements wait for a recovery (at most `connect_timeout`), then are
    /// refused, rather than taken locally: the other routers reach Redis, so a local one
    /// could split a room (see [`Inner::stall`]).
    stalled: AtomicBool,
    /// Told whenever a stall ends (a recovery completed, or Redis stopped answering): the
    /// placements waiting in [`RedisStore::pin_if`] look again.
    unstalled: tokio::sync::Notify,
    /// When the current stall began (µs since `opened`): a stall older than
    /// `connect_timeout` refuses at once, so that its waits add up to one `connect_timeout`
    /// however many placements and reported rooms run into it.
    stalled_since: AtomicU64,
    /// Redis may have lost pins the cache holds: from an outage's start until recovery has
    /// found the same server (its run id), or written every cached pin back to a new one.
    lost: AtomicBool,
    /// The subscription is open and the cache caught up since it opened. While it is not
    /// (and Redis answers, so the store is not down), the cache hears of no other router's
    /// change, so pins are read from Redis instead ([`RedisStore::get`]; `peek` declines):
    /// a room released and placed afresh elsewhere would otherwise be joined on its old
    /// node (a split).
    subscribed: AtomicBool,
    /// Which of the pool's `subs` the subscription opened on last.
    sub_next: AtomicUsize,
    why: Mutex<String>,
    /// Highest Redis time seen (µs), to age tombstones.
    last_ts: AtomicU64,
    /// Set when Redis's clock is found to have stepped back: the cache, which orders
    /// changes by their Redis time, is reloaded ([`Inner::apply_stamped`]).
    reload: AtomicBool,
    /// The Redis time (µs) of the reply that last showed a step back (0: none yet), and
    /// when it came (µs after `opened`): see [`Inner::unstep`].
    step_ts: AtomicU64,
    step_seen_us: AtomicU64,
    /// Redis's time in its latest reply to this router (µs; 0: none yet), and when it came
    /// (µs after `opened`): see [`Inner::redis_now_us`].
    reply_ts: AtomicU64,
    reply_seen_us: AtomicU64,
    /// A `TIME` asked for a message older than the cache is on its way
    /// ([`Inner::check_clock`]).
    clock_check: AtomicBool,
    opened: Instant,
    /// Whether a reply can tell a step of Redis's clock: not on Cluster, where a reload's
    /// times come from whichever shard answered its `TIME`, not from each room's own.
    steps_seen: bool,
    cmd_timeout: Duration,
    connect_timeout: Duration,
    resync_interval: Duration,
    pin_ttl_ms: u64,
    pin_if: Script,
    confirm: Script,
    read: Script,
    release_if: Script,
    sweep: Script,
    cluster: OnceLock<Arc<Cluster>>,
    sync: NodeSync,
    origin: String,
    node_tx: mpsc::UnboundedSender<NodeUpdate>,
    index_tx: mpsc::UnboundedSender<IndexOp>,
    learned_tx: mpsc::UnboundedSender<LearnedOp>,
    forget_learned: Script,
    write_nodes: Script,
    /// Learned sizes other routers published, until the router takes them.
    learned_inbox: Mutex<Vec<(RoomKey, Learned)>>,
    outages: AtomicU64,
    store_won: AtomicU64,
    /// The standalone server's `run_id`: a new one means Redis restarted and may have lost
    /// its data, so everything the cache knows is written back, not only outage decisions.
    run_id: Mutex<Option<String>>,
    /// When the current outage began (ms since epoch; 0 = none), for the health hold.
    outage_since: AtomicU64,
    heartbeat_timeout_ms: u64,
    /// How long an outage holds nodes healthy (`hold_nodes`): `store.outage_node_hold`, past
    /// which a node that died meanwhile would otherwise get users for as long as the outage
    /// lasts. The price is every live room of a node this router only heard of through
    /// Redis: its next join here is placed elsewhere, while the routers that hear the node
    /// keep sending users to it (a split, settled when Redis returns). When the router
    /// probes its nodes itself (`health.probe_interval`), the probes find a dead node, and
    /// the hold lasts the whole outage.
    hold_ms: u64,
}

fn wall_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Pins in Redis, served from a local cache. See the module documentation.
pub struct RedisStore {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
}

impl Drop for RedisStore {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// The certificates `store.tls_*` name, read now; `None` when none is set (a `rediss://`
/// URL then trusts the system's roots).
fn tls_certificates(cfg: &StoreConfig) -> anyhow::Result<Option<redis::TlsCertificates>> {
    let read = |key: &str, p: &std::path::Path| {
        std::fs::read(p).with_context(|| format!("{key}: {}", p.display()))
    };
    let root_cert = match &cfg.tls_ca_file {
        Some(p) => Some(read("store.tls_ca_file", p)?),
        None => None,
    };
    let client_tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
            client_cert: read("store.tls_cert_file", c)?,
            client_key: read("store.tls_key_file", k)?,
        }),
        _ => None,
    };
    Ok(
        (root_cert.is_some() || client_tls.is_some()).then_some(redis::TlsCertificates {
            client_tls,
            root_cert,
        }),
    )
}

/// A client for `url`: plain, or TLS with `certs` (config allows them only with `rediss://`).
fn client_for(url: &str, certs: Option<&redis::TlsCertificates>) -> anyhow::Result<redis::Client> {
    let client = match certs {
        Some(certs) => redis::Client::build_with_tls(url, certs.clone())?,
        None => redis::Client::open(url)?,
    };
    Ok(client)
}

impl RedisStore {
    /// Connects, loads every pin into the cache and starts the background tasks. Fails if
    /// Redis cannot be reached within `connect_timeout`.
    pub async fn connect(
        cfg: &StoreConfig,
        room_idle_ttl: Duration,
        heartbeat_timeout: Duration,
        probes_nodes: bool,
    ) -> anyhow::Result<Self> {
        let keys = Keys::new(&cfg.key_prefix);
        let certs = tls_certificates(cfg)?;
        let mut sentinels = None;
        let pool = if !cfg.sentinels.is_empty() {
            let s = Sentinels::new(cfg)?;
            let master = s.master().await.context("store.sentinels")?;
            let pool = open_pool(
                master,
                cfg.pool_size,
                cfg.connect_timeout,
                cfg.command_timeout,
            )
            .await
            .with_context(|| format!("master {:?} named by the sentinels", s.master_name()))?;
            tracing::info!(master = %s.master_name(), server = %pool.server, "Redis master found through Sentinel");
            sentinels = Some(s);
            pool
        } else if cfg.cluster_nodes.is_empty() {
            let client = client_for(&cfg.url, certs.as_ref()).context("store.url")?;
            open_pool(
                client,
                cfg.pool_size,
                cfg.connect_timeout,
                cfg.command_timeout,
            )
            .await?
        } else {
            let mut builder = redis::cluster::ClusterClient::builder(cfg.cluster_nodes.clone())
                .connection_timeout(cfg.connect_timeout)
                .response_timeout(cfg.command_timeout);
            if let Some(certs) = certs.clone() {
                builder = builder.certs(certs);
            }
            let client = builder.build().context("store.cluster_nodes")?;
            // Logged and shown as the store's server: never with a password.
            let seeds = (cfg.cluster_nodes.iter())
                .map(|u| crate::config::redact_url(u))
                .collect::<Vec<_>>()
                .join(",");
            let c = tokio::time::timeout(cfg.connect_timeout * 3, client.get_async_connection())
                .await
                .map_err(|_| anyhow::anyhow!("timed out"))
                .and_then(|r| r.map_err(anyhow::Error::from))
                .with_context(|| format!("cannot connect to Redis Cluster {seeds}"))?;
            Pool {
                server: seeds,
                subs: cfg
                    .cluster_nodes
                    .iter()
                    .enumerate()
                    .map(|(i, n)| {
                        client_for(n, certs.as_ref())
                            .with_context(|| format!("store.cluster_nodes[{i}]"))
                    })
                    .collect::<anyhow::Result<_>>()?,
                conns: vec![Conn::Cluster(c)],
                client: None,
            }
        };
        let steps_seen = matches!(pool.conns[0], Conn::Single(_));
        let (node_tx, node_rx) = mpsc::unbounded_channel();
        let (index_tx, index_rx) = mpsc::unbounded_channel();
        let (learned_tx, learned_rx) = mpsc::unbounded_channel();
        let (stop, stop_rx) = watch::channel(false);
        let inner = Arc::new(Inner {
            keys,
            pool: ArcSwap::from_pointee(pool),
            next: AtomicUsize::new(0),
            reopening: tokio::sync::Mutex::new(()),
            reopened: AtomicU64::new(0),
            sentinels,
            pool_size: cfg.pool_size,
            cache: RoomMap::default(),
            node_ids: DashMap::new(),
            pending: RoomMap::default(),
            writing: RoomMap::default(),
            tried: RoomMap::default(),
            pending_confirms: RoomMap::default(),
            pending_nodes: Mutex::new(HashMap::new()),
            admin_in_flight: Mutex::new(HashMap::new()),
            node_writes: tokio::sync::Mutex::new(()),
            down: AtomicBool::new(true),
            stalled: AtomicBool::new(false),
            unstalled: tokio::sync::Notify::new(),
            stalled_since: AtomicU64::new(0),
            lost: AtomicBool::new(true),
            subscribed: AtomicBool::new(false),
            sub_next: AtomicUsize::new(0),
            why: Mutex::new("connecting".into()),
            last_ts: AtomicU64::new(0),
            reload: AtomicBool::new(false),
            step_ts: AtomicU64::new(0),
            step_seen_us: AtomicU64::new(0),
            reply_ts: AtomicU64::new(0),
            reply_seen_us: AtomicU64::new(0),
            clock_check: AtomicBool::new(false),
            opened: Instant::now(),
            steps_seen,
            cmd_timeout: cfg.command_timeout,
            connect_timeout: cfg.connect_timeout,
            resync_interval: cfg.resync_interval,
            pin_ttl_ms: (room_idle_ttl.as_millis() as u64)
                .saturating_mul(2)
                .max(1000),
            pin_if: Script::new(PIN_IF),
            confirm: Script::new(CONFIRM),
            read: Script::new(READ),
            release_if: Script::new(RELEASE_IF),
            sweep: Script::new(SWEEP),
            cluster: OnceLock::new(),
            sync: NodeSync::new(heartbeat_timeout.as_millis() as u64),
            origin: format!("{:016x}", rand::random::<u64>()),
            node_tx,
            index_tx,
            learned_tx,
            forget_learned: Script::new(FORGET_LEARNED),
            write_nodes: Script::new(WRITE_NODES),
            learned_inbox: Mutex::new(Vec::new()),
            outages: AtomicU64::new(0),
            store_won: AtomicU64::new(0),
            run_id: Mutex::new(None),
            outage_since: AtomicU64::new(0),
            heartbeat_timeout_ms: heartbeat_timeout.as_millis() as u64,
            hold_ms: match probes_nodes {
                true => u64::MAX,
                false => cfg.outage_node_hold.as_millis() as u64,
            },
        });
        // Subscribe and load before answering anything, so the cache starts complete.
        let stream = inner
            .subscribe_and_sync()
            .await
            .context("initial Redis sync")?;
        tokio::spawn(supervise(inner.clone(), stream, stop_rx.clone()));
        tokio::spawn(node_writer(inner.clone(), node_rx, stop_rx.clone()));
        tokio::spawn(index_writer(inner.clone(), index_rx, stop_rx.clone()));
        tokio::spawn(learned_writer(inner.clone(), learned_rx, stop_rx.clone()));
        if inner.sentinels.is_some() {
            tokio::spawn(watch_failovers(inner.clone(), stop_rx.clone()));
        }
        tokio::spawn(expire_reservations(inner.clone(), stop_rx.clone()));
        tokio::spawn(hold_nodes(inner.clone(), stop_rx));
        Ok(RedisStore { inner, stop })
    }

    /// The key names this store uses.
    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// The server commands go to now (`host:port`): with Sentinel, the master it last
    /// followed; for Cluster, the seed nodes.
    pub fn server(&self) -> String {
        self.inner.pool.load().server.clone()
    }

    /// True while Redis is unreachable and the cache answers alone.
    pub fn is_degraded(&self) -> bool {
        self.inner.down.load(Ordering::Acquire)
    }

    /// Times Redis became unreachable, and write-backs the store's pin won (split avoided).
    pub fn outage_stats(&self) -> (u64, u64) {
        (
            self.inner.outages.load(Ordering::Relaxed),
            self.inner.store_won.load(Ordering::Relaxed),
        )
    }
}

impl Inner {
    fn conn(&self) -> Conn {
        let pool = self.pool.load();
        let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.conns.len();
        pool.conns[i].clone()
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Redis answers but the subscription is not open (see `subscribed`), or the store is
    /// stalled (its cache is as old as the outage, and the routers that reach Redis may
    /// have moved rooms since) and Redis kept its data (else the cache holds what Redis
    /// lost; `lost` until recovery shows otherwise): pins are read from Redis, not from the
    /// cache. See [`Inner::reads_from_redis_for`] for the rooms a stalled store still
    /// answers itself.
    #[inline]
    fn reads_from_redis(&self) -> bool {
        !self.subscribed.load(Ordering::Acquire)
            && (!self.is_down() || self.is_stalled() && !self.lost.load(Ordering::Acquire))
    }

    /// [`Inner::reads_from_redis`], except for a room whose decision this router took
    /// during the outage and has not written back yet: Redis does not have it, and the
    /// room's users went where the cache says. That is so while stalled, and also from the
    /// moment a recovery clears `down` until its last write-back, while the subscription is
    /// not yet open again.
    fn reads_from_redis_for(&self, room: &RoomKey) -> bool {
        self.reads_from_redis() && !self.queued(room)
    }

    /// Whether this router holds a decision for `room` that Redis may not have yet: queued
    /// for write-back, or being written (a failed write puts it back in the queue, and
    /// until then Redis's answer for the room is older than the users' node).
    fn queued(&self, room: &RoomKey) -> bool {
        self.pending.contains_key(room) || self.writing.contains_key(room)
    }

    /// A command failed. Only if Redis also fails a PING within `connect_timeout` (with
    /// Sentinel: a `ROLE` that must still say master) is this an outage (then the caller
    /// decides locally); otherwise the error is returned, because a decision taken locally
    /// while Redis is reachable could split a room.
    async fn confirm_down(&self, e: StoreError) -> Result<(), StoreError> {
        if self.is_down() {
            return Ok(());
        }
        match self.probe().await {
            Probe::Answers => Err(e),
            Probe::Restarted(why) => {
                self.mark_restarted(format!("{e}; {why}"));
                Ok(())
            }
            Probe::Unreachable(failed) => {
                self.mark_down_if_up(format!("{e}; {failed}"));
                Ok(())
            }
        }
    }

    /// The one test of whether Redis is reachable, shared by every path that may enter
    /// degraded mode (a failed command, a lost subscription, the liveness check), so that
    /// none of them decides on less evidence: a PING on every commands' connection at once
    /// (with Sentinel: a `ROLE` that must say master), one answered within
    /// `connect_timeout`.
    ///
    /// A PING that fails with an error (not silence) is sent once more on the same
    /// connection, within the same time: a connection Redis closed (its idle `timeout`,
    /// `CLIENT KILL`, a restart) answers its next command with the error that closed it
    /// and reconnects only then. Without the second try, Redis closing every connection of
    /// the pool at once made the probe after any failed command fail too, and the router
    /// decided new rooms alone while Redis answered the other routers.
    ///
    /// A connection silent while another answers went silent alone (a NAT or firewall
    /// entry expired, a middlebox dropped the flow: no FIN, no RST, and its manager
    /// reconnects only on an error): Redis answers, and a new connection takes the silent
    /// one's place ([`Inner::reopen`]). Asked on one connection, the probe found Redis
    /// down each time it went out on the silent one, and so did every recovery.
    ///
    /// An answer is then checked against the server the store last caught up with (its
    /// `run_id`, where it has one): a server that restarted in between may have lost pins
    /// only the cache holds, and its answers must not be taken over the cache's.
    async fn probe(&self) -> Probe {
        let pool = self.pool.load_full();
        let what = if self.sentinels.is_none() {
            "ping"
        } else {
            "role"
        };
        let asked = pool.conns.iter().map(|c| async move {
            let mut c = c.clone();
            let answer = tokio::time::timeout(self.connect_timeout, async {
                match self.ask_master(&mut c).await {
                    Err(e) if !e.is_timeout() => {
                        tracing::debug!(error = %e, "{what} failed; trying once more on its reopened connection");
                        self.ask_master(&mut c).await
                    }
                    first => first,
                }
            })
            .await;
            (c, answer)
        });
        let (mut answered, mut silent, mut failed) = (None, Vec::new(), None);
        for (i, (c, answer)) in join_all(asked).await.into_iter().enumerate() {
            match answer {
                // A server that is no longer the master outweighs one that still says so.
                Ok(Ok(master)) => {
                    if answered
                        .as_ref()
                        .is_none_or(|(_, m): &(Conn, Option<String>)| m.is_none())
                    {
                        answered = Some((c, master));
                    }
                }
                Ok(Err(e)) => {
                    if e.is_timeout() {
                        silent.push(i);
                    }
                    failed.get_or_insert_with(|| format!("{what}: {e}"));
                }
                Err(_) => {
                    silent.push(i);
                    failed.get_or_insert_with(|| format!("no answer to {what}"));
                }
            }
        }
        let Some((mut c, master)) = answered else {
            return Probe::Unreachable(failed.unwrap_or_else(|| format!("no answer to {what}")));
        };
        if !silent.is_empty() {
            self.reopen(&pool, &silent).await;
        }
        match master {
            // A master turned replica answers, and refuses writes: another master took
            // over, which the other routers reach (or will). Deciding new rooms alone
            // meanwhile could split them, so this is a restart's verdict (down and
            // stalled) until the recovery finds the new master, as for a server that
            // answers and refuses writes for another reason.
            Some(not_master) => Probe::Restarted(not_master),
            // Asked outside the PING's time (bounded by `command_timeout`): a slow INFO
            // after an answered PING is no outage.
            None => match self.restart_seen(&mut c).await {
                Ok(Some(restarted)) => Probe::Restarted(restarted),
                Ok(None) => Probe::Answers,
                Err(e) => {
                    // The PING was answered; a recovery reads the run id again before it
                    // trusts the server.
                    tracing::debug!(error = %e, "run id not read by the probe");
                    Probe::Answers
                }
            },
        }
    }

    /// Opens new connections in place of the pool's at `slots`, which stayed silent while
    /// another answered, and swaps them in, unless the pool was replaced meanwhile (by
    /// another reopening, or with Sentinel by a new master's pool). One reopening at a
    /// time, each connection within `connect_timeout`; the silent connections close once
    /// the commands still waiting on them are done. Cluster's connection keeps its own
    /// connections to each node: nothing to do there.
    async fn reopen(&self, pool: &Arc<Pool>, slots: &[usize]) -> bool {
        let Some(client) = &pool.client else {
            return false;
        };
        let _one = self.reopening.lock().await;
        if !Arc::ptr_eq(&self.pool.load(), pool) {
            return true;
        }
        let opened = join_all(
            (slots.iter()).map(|_| open_conn(client, self.connect_timeout, self.cmd_timeout)),
        )
        .await;
        let mut conns = pool.conns.clone();
        for (&i, c) in slots.iter().zip(opened) {
            match c {
                Ok(c) => conns[i] = c,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), server = %pool.server, "a Redis command connection is silent and no new one opened in its place; trying again at the next check");
                    return false;
                }
            }
        }
        let fresh = Arc::new(Pool {
            server: pool.server.clone(),
            subs: pool.subs.clone(),
            conns,
            client: pool.client.clone(),
        });
        let before = self.pool.compare_and_swap(pool, fresh);
        if Arc::ptr_eq(&before, pool) {
            self.reopened
                .fetch_add(slots.len() as u64, Ordering::Relaxed);
            tracing::warn!(server = %pool.server, silent = slots.len(), "Redis command connection silent while Redis answers on another; replaced it (not an outage)");
        }
        true
    }

    /// The probe's question: `PING`, or with Sentinel `ROLE`. `Some` says why the server
    /// answering is not the master.
    async fn ask_master(&self, c: &mut Conn) -> redis::RedisResult<Option<String>> {
        if self.sentinels.is_none() {
            return redis::cmd("PING")
                .query_async::<String>(c)
                .await
                .map(|_| None);
        }
        let role: redis::Role = redis::cmd("ROLE").query_async(c).await?;
        Ok(match role {
            redis::Role::Primary { .. } => None,
            _ => Some(format!(
                "{} is no longer the master",
                self.pool.load().server
            )),
        })
    }

    /// Whether the server answering on `c` is another than the one the store last caught
    /// up with (a restart, or with Sentinel a new master): `Some` says so. `None` when
    /// there is nothing to compare (Cluster, no recovery yet).
    async fn restart_seen(&self, c: &mut Conn) -> Result<Option<String>, StoreError> {
        let Some(now) = self.run_id_on(c).await? else {
            return Ok(None);
        };
        Ok(self
            .restarted(Some(&now))
            .then(|| format!("Redis restarted (its run id is now {now})")))
    }

    /// The subscription ended, fell silent or could not be opened again. Redis may still
    /// answer commands (it kills subscribers alone for `CLIENT KILL TYPE pubsub` or an
    /// output buffer limit, and may refuse new connections at `maxclients`): deciding from
    /// the cache then could split a room with a router that still reaches Redis, so this is
    /// an outage only if Redis also fails [`Inner::probe`]. Otherwise the caller subscribes
    /// again, and [`Inner::recover`] reloads the cache, catching up on what was missed.
    ///
    /// Reads turn to Redis (`subscribed` cleared) only once the probe has found the server
    /// the store caught up with: a subscription also ends when Redis restarts, and until
    /// the probe has seen the new run id the cache is the one to answer (a read on a
    /// reopened connection would take the emptied server's answer into the cache over the
    /// pin its users are on).
    /// True if a stall began with this failure: the supervisor then tries again at once.
    async fn subscription_failed(&self, why: String) -> bool {
        if self.is_down() {
            // With Sentinel, the probe asks the master the sentinels name now: after a
            // failover (announced, or found by a replica's answer) the old master is often
            // dead, and its silence would lift the stall that keeps new rooms waiting for
            // the new master, which the other routers already use. Only if no master
            // answers is this router on its own (a plain outage). Without Sentinel, or
            // with no sentinel answering, the probe asks the server it has.
            if let Err(e) = self.follow_master().await {
                tracing::debug!(error = %format!("{e:#}"), "no master found through the sentinels");
            }
            // Already degraded: keep the latest reason, and whether Redis answers.
            let began = match self.probe().await {
                Probe::Answers => self.stall(why),
                // Stalled too, and the cache answers (`lost`): the server is not the one
                // the store last caught up with.
                Probe::Restarted(restarted) => self.mark_restarted(format!("{why}; {restarted}")),
                Probe::Unreachable(failed) => {
                    self.mark_down(format!("{why}; {failed}"));
                    false
                }
            };
            self.subscribed.store(false, Ordering::Release);
            return began;
        }
        let verdict = self.confirm_down(StoreError(why.clone())).await;
        self.subscribed.store(false, Ordering::Release);
        if verdict.is_err() {
            tracing::warn!(error = %why, "Redis subscription failed while Redis answers commands; subscribing again (not an outage)");
        }
        false
    }

    /// With Sentinel: asks the sentinels where the master is and, if it is not where the
    /// commands go, opens a new pool there and swaps it in. True if it moved. Without
    /// Sentinel there is nobody to ask: false.
    async fn follow_master(&self) -> anyhow::Result<bool> {
        let Some(s) = &self.sentinels else {
            return Ok(false);
        };
        let master = s.master().await?;
        let server = master.get_connection_info().addr().to_string();
        let old = self.pool.load().server.clone();
        if server == old {
            return Ok(false);
        }
        let pool = open_pool(
            master,
            self.pool_size,
            self.connect_timeout,
            self.cmd_timeout,
        )
        .await
        .with_context(|| format!("new master {:?} at {server}", s.master_name()))?;
        tracing::warn!(master = %s.master_name(), from = %old, to = %server, "Redis master moved; following it");
        self.pool.store(Arc::new(pool));
        Ok(true)
    }

    /// A recovery failed while Redis answers: still down (the cache is not caught up), but
    /// new placements wait for a recovery to complete, or are refused (see `stalled`).
    /// True if the stall begins with this call.
    fn stall(&self, why: impl std::fmt::Display) -> bool {
        let began = !self.stalled.swap(true, Ordering::AcqRel);
        if began {
            self.note_stall_start();
            tracing::warn!(error = %why, "Redis answers but this router cannot catch up with it; new placements wait for it");
        }
        self.set_why(why.to_string());
        began
    }

    /// Waits for a stall to end, until `connect_timeout` after it began: a recovery after an outage
    /// (a subscription tried while Redis was frozen fails just as it answers again) takes
    /// a moment, which a placement would rather wait out than be refused. False if still
    /// stalled.
    async fn wait_unstalled(&self) -> bool {
        let lifted = self.unstalled.notified();
        tokio::pin!(lifted);
        // Registered before the check, so that a recovery in between is not missed.
        lifted.as_mut().enable();
        if !self.is_stalled() {
            return true;
        }
        // Measured from the stall's start: one that lasts refuses at once.
        let age = Duration::from_micros(
            (self.opened.elapsed().as_micros() as u64)
                .saturating_sub(self.stalled_since.load(Ordering::Acquire)),
        );
        let left = self.connect_timeout.saturating_sub(age);
        if left.is_zero() {
            return false;
        }
        let _ = tokio::time::timeout(left, lifted).await;
        !self.is_stalled()
    }

    fn is_stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// Redis answers, but it is not the server this router caught up with (it restarted,
    /// or with Sentinel another master took over) and may have lost pins only the cache
    /// holds: down, so that the rooms the cache knows are served from it and the recovery
    /// writes every cached pin back, and stalled, so that new rooms wait or are refused rather
    /// than decided alone while the other routers reach Redis.
    /// True if a stall begins with this call.
    fn mark_restarted(&self, why: impl std::fmt::Display) -> bool {
        self.go_down(why.to_string(), true)
    }

    /// Redis is unreachable: decisions are taken from the cache and queued.
    fn mark_down(&self, why: impl std::fmt::Display) {
        self.go_down(why.to_string(), false);
    }

    /// [`Inner::mark_down`] on the verdict of a probe that began while the store was up:
    /// only if it still is. Probes run at once from several paths; when a newer one found a
    /// restart meanwhile (down and stalled), this older verdict must not lift the stall and
    /// have new rooms decided alone while the other routers reach Redis.
    fn mark_down_if_up(&self, why: impl std::fmt::Display) {
        self.note_outage_start();
        // Before `down`, as in `go_down`; harmless if the store is already down (then it is
        // set) or up again (nothing reads it while up, and the next outage sets it).
        self.lost.store(true, Ordering::Release);
        // `stalled` is left as it is: false while the store is up (a recovery clears it
        // right after `down`).
        if self
            .down
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            tracing::debug!(error = %why, "an older probe's verdict; the store is down already");
            return;
        }
        self.outage_began(why.to_string(), false);
    }

    /// Notes every node's report as the outage begins (`Live::note_outage_start`), before
    /// `down` is set: placements that then find the store down judge nodes by it.
    fn note_outage_start(&self) {
        if self.down.load(Ordering::Acquire) {
            return;
        }
        if let Some(cluster) = self.cluster.get() {
            for e in cluster.snapshot().nodes() {
                e.live.note_outage_start();
            }
        }
    }

    /// Enters (or stays in) degraded mode, stalled or not, counting an outage if it begins.
    /// True if a stall begins with this call.
    fn go_down(&self, why: String, stalled: bool) -> bool {
        self.note_outage_start();
        self.lost.store(true, Ordering::Release);
        // Stalled set before down: a placement in between must not find the store down and
        // not stalled, and decide locally.
        let was = self.stalled.swap(stalled, Ordering::AcqRel);
        if was && !stalled {
            self.unstalled.notify_waiters();
        }
        if !was && stalled {
            self.note_stall_start();
        }
        if self.down.swap(true, Ordering::AcqRel) {
            self.set_why(why);
        } else {
            self.outage_began(why, stalled);
        }
        !was && stalled
    }

    fn note_stall_start(&self) {
        self.stalled_since
            .store(self.opened.elapsed().as_micros() as u64, Ordering::Release);
    }

    /// Counts and logs the outage this router's store just entered, and records why.
    fn outage_began(&self, why: String, stalled: bool) {
        self.outage_since.store(wall_ms(), Ordering::Release);
        self.outages.fetch_add(1, Ordering::Relaxed);
        if stalled {
            tracing::warn!(error = %why, "Redis restarted; serving known pins from the local cache; new placements wait until they are written back");
        } else {
            tracing::warn!(error = %why, "Redis unreachable; serving pins from the local cache");
        }
        self.set_why(why);
    }

    /// Records why the store is degraded (`/readyz`, `health`).
    fn set_why(&self, why: String) {
        if let Ok(mut w) = self.why.lock() {
            *w = why;
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.cmd_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError(format!("{what}: {e}"))),
            Err(_) => Err(StoreError(format!(
                "{what}: no answer within {:?}",
                self.cmd_timeout
            ))),
        }
    }

    /// Decodes a stored pin, sharing one `NodeId` (one `Arc`) per node across all pins, as
    /// the memory store's pins share the registry's: a pinned lookup clones a hot `Arc`
    /// instead of one cold allocation per room.
    fn decode(&self, v: &str) -> Option<Pin> {
        decode_with(v, |s| {
            if let Some(id) = self.node_ids.get(s) {
                return Some(id.clone());
            }
            let id = NodeId::parse(s).ok()?;
            if self.node_ids.len() < 100_000 {
                self.node_ids.insert(s.into(), id.clone());
            }
            Some(id)
        })
    }

    fn see_ts(&self, ts: u64) {
        self.last_ts.fetch_max(ts, Ordering::Relaxed);
    }

    /// Puts a change into the cache unless the cache already reflects a newer one.
    ///
    /// A local decision still queued for write-back ([`is_local_decision`]) is this router's
    /// latest word on the room until its write-back settles it by compare-and-set, so it
    /// stays against a release and against a pin to a node the decision names (the replies
    /// and messages of an older decision's write-back, still in flight when it was taken).
    /// A pin to another node is another router's, which that write-back will lose to: the
    /// cache takes it now, so that joins here go where the other routers send them.
    fn apply(&self, room: &RoomKey, pin: Option<Pin>, ts: u64) {
        self.see_ts(ts);
        let mut e = self
            .cache
            .entry(room.clone())
            .or_insert(Cached { pin: None, ts: 0 });
        // Not `writing`: the write-back itself takes Redis's answer (a decision that lost to
        // the store's pin yields to it here).
        let keep_local = e.ts == 0
            && self.pending.get(room).is_some_and(|op| match &pin {
                None => true,
                Some(p) => op.names(&p.node),
            });
        if e.ts <= ts && !keep_local {
            *e = Cached { pin, ts };
        }
    }

    /// Puts a room's state stamped by Redis in a reply to this router's own command (Redis's
    /// state when the command ran, at `ts`) into the cache, as [`Inner::apply`] does, first
    /// checking Redis's clock. A change this router heard of before a reply arrived was made
    /// at most `command_timeout` after the command ran (plus a second for this task to be
    /// scheduled); a cached change stamped later than that was stamped before Redis's clock
    /// stepped back. Every change made since the step then looks older than what the cache
    /// holds and would be ignored until the clock caught up: the cache's times are brought
    /// back to this one's and the pins reloaded.
    fn apply_stamped(&self, room: &RoomKey, pin: Option<Pin>, ts: u64) {
        self.note_reply_time(ts);
        if self.older_than_cached(room, ts).is_some() {
            self.clock_stepped_back(ts);
        }
        // A reply to a command that ran before the step can still arrive after it.
        self.apply(room, pin, self.unstep(ts));
    }

    /// [`Inner::apply_stamped`] for a change published by Redis (another router's, or this
    /// one's), stamped `ts`. A message older than the cache by more than the margin shows a
    /// step of Redis's clock only if the cache is also ahead of what Redis's clock reads
    /// now: a message can be that late without any step, when it waited in the
    /// subscription's buffer while the supervisor wrote back and reloaded after an outage
    /// (the reload stamped the cache with its own, later, time); taken for a step, it had
    /// every change made in the next second ignored. What Redis's clock reads now is known
    /// from the latest reply ([`Inner::redis_now_us`]); when that does not show the cache
    /// ahead, Redis is asked its time ([`Inner::check_clock`]), since a router that only
    /// hears messages may have no reply from after a real step.
    fn apply_heard(self: &Arc<Self>, room: &RoomKey, pin: Option<Pin>, ts: u64) {
        if let Some(cached) = self.older_than_cached(room, ts) {
            if cached > self.redis_now_us().saturating_add(self.reply_slack_us()) {
                self.clock_stepped_back(ts);
            } else {
                self.check_clock(cached);
            }
        }
        self.apply(room, pin, self.unstep(ts));
    }

    /// The cached time of `room` if it is later than `ts` by more than the margin
    /// (`reply_slack_us`): news stamped `ts` is then older than the cache can explain
    /// without a step of Redis's clock or a late delivery.
    fn older_than_cached(&self, room: &RoomKey, ts: u64) -> Option<u64> {
        let slack = self.reply_slack_us();
        // A time of 0 is no time (a reply that did not parse), not a step to the epoch.
        if !self.steps_seen || ts == 0 {
            return None;
        }
        self.cache
            .get(room)
            .map(|e| e.ts)
            .filter(|&cached| cached > ts.saturating_add(slack))
    }

    /// Asks Redis its time, in a task of its own (one at a time), and takes a step back of
    /// its clock if a cache time of `cached` is ahead of it by more than the margin.
    fn check_clock(self: &Arc<Self>, cached: u64) {
        if self.clock_check.swap(true, Ordering::AcqRel) {
            return;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            let now = inner.server_time_us().await;
            inner.clock_check.store(false, Ordering::Release);
            match now {
                Ok(now) => {
                    inner.note_reply_time(now);
                    if cached > now.saturating_add(inner.reply_slack_us()) {
                        inner.clock_stepped_back(now);
                    }
                }
                Err(e) => tracing::debug!(error = %e, "Redis's time not read"),
            }
        });
    }

    /// Redis's clock (`TIME`), µs.
    async fn server_time_us(&self) -> Result<u64, StoreError> {
        let mut c = self.conn();
        let (secs, micros): (String, String) = self
            .run("time", redis::cmd("TIME").query_async(&mut c))
            .await?;
        Ok(secs.parse::<u64>().unwrap_or(0) * 1_000_000 + micros.parse::<u64>().unwrap_or(0))
    }

    /// By Redis's clock (µs), when this router stops waiting for a command it sends now
    /// (`command_timeout` on from [`Inner::redis_now_us`], which trails Redis's clock by the
    /// reply's way back: a command run by then has its reply back in time). `None` before
    /// any reply.
    fn deadline_us(&self) -> Option<u64> {
        let now = self.redis_now_us();
        (now > 0).then(|| now.saturating_add(self.cmd_timeout.as_micros() as u64))
    }

    /// Remembers Redis's time in a reply (µs), and when it came, for [`Inner::redis_now_us`].
    fn note_reply_time(&self, ts: u64) {
        if ts > 0 {
            self.reply_seen_us
                .store(self.opened.elapsed().as_micros() as u64, Ordering::Release);
            self.reply_ts.store(ts, Ordering::Release);
        }
    }

    /// What Redis's clock reads now (µs), from its latest reply to this router and the time
    /// since; 0 before any reply.
    fn redis_now_us(&self) -> u64 {
        let ts = self.reply_ts.load(Ordering::Acquire);
        if ts == 0 {
            return 0;
        }
        let since = (self.opened.elapsed().as_micros() as u64)
            .saturating_sub(self.reply_seen_us.load(Ordering::Acquire));
        ts.saturating_add(since)
    }

    /// Brings every cached time after `ts` (Redis's time now) back to it, so that changes
    /// stamped from now on are taken, and has the supervisor reload the pins, for those
    /// made between the step and now.
    fn clock_stepped_back(&self, ts: u64) {
        self.step_ts.store(ts, Ordering::Release);
        self.step_seen_us
            .store(self.opened.elapsed().as_micros() as u64, Ordering::Release);
        let mut moved = 0usize;
        for mut e in self.cache.iter_mut() {
            if e.ts > ts {
                e.ts = ts;
                moved += 1;
            }
        }
        self.last_ts.store(ts, Ordering::Relaxed);
        self.reload.store(true, Ordering::Release);
        tracing::warn!(
            rooms = moved,
            "Redis's clock stepped back (a reply is older than changes heard before it); reloading the pins"
        );
    }

    /// How much later than a reply's time a change heard before it can be stamped:
    /// `command_timeout`, plus a second for this task to be scheduled.
    fn reply_slack_us(&self) -> u64 {
        (self.cmd_timeout + Duration::from_secs(1)).as_micros() as u64
    }

    /// The time to order a published change, or a reply, by. One stamped before a step back
    /// of Redis's clock can still be on its way when a reply shows the step (and the cache's
    /// times are brought back): its time, ahead of any Redis can show for a while, would
    /// make every later change to the room look older and be ignored. Within that while, a
    /// change stamped later than Redis's clock can read (the step's reply, the time since,
    /// the slack) is ordered before everything heard after it, which it is for messages (the
    /// subscription delivers changes in the order Redis made them); a reply ordered so may
    /// lose to an older change the cache already holds, which the reload the step asked for
    /// corrects.
    fn unstep(&self, ts: u64) -> u64 {
        let step = self.step_ts.load(Ordering::Acquire);
        if step == 0 {
            return ts;
        }
        let since = (self.opened.elapsed().as_micros() as u64)
            .saturating_sub(self.step_seen_us.load(Ordering::Acquire));
        let slack = self.reply_slack_us();
        if since <= slack && ts > step.saturating_add(since).saturating_add(slack) {
            1
        } else {
            ts
        }
    }

    // --- Redis operations (no fallback) ---

    /// Runs `PIN_IF` (pins `room` to `node` if the room has no pin, or one on `expected`)
    /// and returns Redis's reply as it is, touching neither cache nor index.
    async fn pin_script(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
        created: Option<Millis>,
    ) -> Result<PinReply, StoreError> {
        let mut c = self.conn();
        let mut inv = self.pin_if.key(self.keys.room(room.as_str()));
        inv.arg(node.as_str())
            .arg(expected.map(|n| n.as_str()).unwrap_or(""))
            .arg(now)
            .arg(self.pin_ttl_ms)
            .arg(&self.keys.pins_channel)
            .arg(room.as_str())
            .arg(created.map(|c| c.to_string()).unwrap_or_default())
            .arg(
                self.deadline_us()
                    .map(|d| d.to_string())
                    .unwrap_or_default(),
            );
        let (won, v, ts): (i64, String, String) = self.run("pin", inv.invoke_async(&mut c)).await?;
        if won == 2 {
            // Its time sets the next deadline right, should Redis's clock have stepped on.
            self.note_reply_time(ts.parse().unwrap_or(0));
            return Err(err(
                "pin: Redis ran it after this router stopped waiting; not written",
            ));
        }
        Ok(PinReply {
            won: won == 1,
            pin: self.decode(&v),
            ts: ts.parse().unwrap_or(0),
        })
    }

    /// Pins `room` to `node` in Redis by compare-and-set ([`Inner::pin_script`]) and settles
    /// the reply into the cache and the room index.
    async fn pin_if_remote(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> Result<PinOutcome, StoreError> {
        let reply = self.pin_script(room, node, expected, now, None).await?;
        self.vet(room, reply.pin.as_ref()).await?;
        self.settle_pin(room, reply, expected.is_none())
    }

    /// A placement asked again after its first attempt failed: a pin to `node` created at
    /// `now` is the first attempt's, written though its reply was lost. It is this
    /// placement's win (its reservation, its log line, `created`), and a new room goes into
    /// the index, which only a win puts it in.
    fn first_attempt_won(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
        outcome: PinOutcome,
    ) -> PinOutcome {
        match outcome {
            PinOutcome::Lost(Some(p)) if &p.node == node && p.created_at == now => {
                if expected.is_none() {
                    let _ = self.index_tx.send(IndexOp::Add(room.as_str().to_string()));
                }
                PinOutcome::Won(p)
            }
            o => o,
        }
    }

    /// Puts a pin reply into the cache and, for a new pin won, the room into the index.
    fn settle_pin(
        &self,
        room: &RoomKey,
        reply: PinReply,
        new_pin: bool,
    ) -> Result<PinOutcome, StoreError> {
        let PinReply { won, pin, ts } = reply;
        self.apply_stamped(room, pin.clone(), ts);
        if won {
            let pin = pin.ok_or_else(|| err("pin: unreadable reply"))?;
            if new_pin {
                let _ = self.index_tx.send(IndexOp::Add(room.as_str().to_string()));
            }
            Ok(PinOutcome::Won(pin))
        } else {
            Ok(PinOutcome::Lost(pin))
        }
    }

    async fn release_remote(
        &self,
        room: &RoomKey,
        node: Option<&NodeId>,
    ) -> Result<Option<Pin>, StoreError> {
        let mut c = self.conn();
        let mut inv = self.release_if.key(self.keys.room(room.as_str()));
        inv.arg(node.map(|n| n.as_str()).unwrap_or(""))
            .arg(&self.keys.pins_channel)
            .arg(room.as_str());
        let (old, ts): (String, String) = self.run("release", inv.invoke_async(&mut c)).await?;
        let ts = ts.parse().unwrap_or(0);
        let old = self.decode(&old);
        if old.is_some() {
            self.apply_stamped(room, None, ts);
            let _ = self
                .index_tx
                .send(IndexOp::Remove(room.as_str().to_string()));
        }
        Ok(old)
    }

    /// Runs `CONFIRM` (refreshes the pin only if it still points at `node`); on success
    /// brings the cached pin's confirmation up to `now` and repairs the room index. Shared
    /// by live confirmations and their write-back after an outage.
    async fn confirm_remote(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut c = self.conn();
        let mut inv = self.confirm.key(self.keys.room(room.as_str()));
        inv.arg(node.as_str()).arg(now).arg(self.pin_ttl_ms);
        let n = self.run::<i64>("confirm", inv.invoke_async(&mut c)).await?;
        if n == 1 {
            self.confirm_cached(room, node, now);
            let _ = self.index_tx.send(IndexOp::Add(room.as_str().to_string()));
        } else if self.confirm_cached(room, node, 0) {
            // The cache names `node` but Redis does not: a change it missed (a message lost
            // before the subscription was found dead). It takes Redis's pin now, so that the
            // caller, and the next join, see where the room is.
            if let Err(e) = self.get_remote(room).await {
                // Redis refused the confirmation: whatever became of that read, the caller
                // must not send the join to `node` (`Ok(false)`: it reads the pin again).
                // Unless the read found Redis restarted empty (`vet` made the store down):
                // then the refusal is the empty server's, and the error lets the caller
                // keep the pin it knows.
                if self.is_down() {
                    return Err(e);
                }
                tracing::debug!(room = %room, error = %e, "reading a pin Redis would not confirm failed");
            }
        }
        Ok(n == 1)
    }

    /// Checks a reply that contradicts the cache (no pin, or another node, for a room the
    /// cache has pinned) against the server the store caught up with, before the cache
    /// takes it. A server that restarted empty answers such replies for every room until
    /// a probe reads its new run id; a command that reaches it first, on a connection
    /// reopened without an error (or before the probe that a failed one started), would
    /// otherwise drop the pin its users are on, and the next join would place the room
    /// anew. A new run id makes the store down and stalled, as the probe would (the error
    /// says so and the reply is not taken). Only contradictions pay for the `INFO`; while
    /// down, replies come from the recovery, which checks the run id itself.
    async fn vet(&self, room: &RoomKey, reply: Option<&Pin>) -> Result<(), StoreError> {
        // Down and not stalled, nothing is read from Redis; stalled, pins are (while
        // `lost` is clear), and the server may have restarted since the recovery that
        // found it the same (an operator's fix for the refused writes that stalled it).
        if self.is_down() && !self.is_stalled() {
            return Ok(());
        }
        let contradicts = self.cache.get(room).is_some_and(|e| {
            e.pin
                .as_ref()
                .is_some_and(|ours| reply.is_none_or(|theirs| theirs.node != ours.node))
        });
        if !contradicts {
            return Ok(());
        }
        if let Some(restarted) = self.restart_seen(&mut self.conn()).await? {
            let why = format!("{restarted}; a reply lost the pin of {room}");
            self.mark_restarted(&why);
            return Err(StoreError(why));
        }
        Ok(())
    }

    /// The wall clock stepped back and the cached pin's confirmation, ahead of `now`, was
    /// brought back to it: so is Redis's, which `CONFIRM` otherwise only moves forward, so
    /// that the room goes idle on time once it ends.
    async fn confirm_back(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> Result<(), StoreError> {
        let mut c = self.conn();
        let mut inv = self.confirm.key(self.keys.room(room.as_str()));
        inv.arg(node.as_str())
            .arg(now)
            .arg(self.pin_ttl_ms)
            .arg("back");
        self.run::<i64>("confirm", inv.invoke_async(&mut c)).await?;
        Ok(())
    }

    /// The room's pin as Redis holds it now, read with the server time and put into the
    /// cache in order with every other change (used where the cache cannot be trusted, or
    /// was found stale).
    async fn get_remote(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        let mut c = self.conn();
        let inv = self.read.key(self.keys.room(room.as_str()));
        let (v, ts): (String, String) = self.run("read", inv.invoke_async(&mut c)).await?;
        let pin = self.decode(&v);
        self.vet(room, pin.as_ref()).await?;
        self.apply_stamped(room, pin.clone(), ts.parse().unwrap_or(0));
        Ok(pin)
    }

    /// The room's pin as Redis holds it, or `None` if Redis is down (the failure marked
    /// it so; the cache answers). A read that fails while Redis answers the probe most
    /// likely went out on a connection a restart or failover broke, which its manager is
    /// reopening (the probe took another): a read is safe to repeat, and is, once, so
    /// that the first joins after Redis comes back are not refused for it.
    async fn read_unless_down(&self, room: &RoomKey) -> Result<Option<Option<Pin>>, StoreError> {
        let e = match self.get_remote(room).await {
            Ok(pin) => return Ok(Some(pin)),
            Err(e) => e,
        };
        if let Err(e) = self.confirm_down(e).await {
            return match self.get_remote(room).await {
                Ok(pin) => Ok(Some(pin)),
                Err(again) => {
                    tracing::debug!(first = %e, again = %again, "a read failed twice while Redis answers");
                    Err(e)
                }
            };
        }
        Ok(None)
    }

    // --- local (outage) operations on the cache ---

    /// Moves the cached pin's confirmation up to `now` if the pin points at `node`. True if
    /// it does.
    fn confirm_cached(&self, room: &RoomKey, node: &NodeId, now: Millis) -> bool {
        let Some(mut c) = self.cache.get_mut(room) else {
            return false;
        };
        match c.pin.as_mut().filter(|p| &p.node == node) {
            Some(p) => {
                p.confirmed_at = p.confirmed_at.max(now);
                true
            }
            None => false,
        }
    }

    /// A confirmation while Redis is unreachable: if the cached pin points at `node`, the
    /// cache takes it (the local view stays right) and it is queued for
    /// [`Inner::write_back`], keeping the latest time per room. True if the pin is `node`'s.
    fn confirm_local(&self, room: &RoomKey, node: &NodeId, now: Millis) -> bool {
        if !self.confirm_cached(room, node, now) {
            return false;
        }
        self.queue_confirm(room, node, now);
        true
    }

    /// Queues a confirmation to write back; a newer one (or one for another node, which
    /// the cache now names) replaces it.
    fn queue_confirm(&self, room: &RoomKey, node: &NodeId, now: Millis) {
        let mut e = self
            .pending_confirms
            .entry(room.clone())
            .or_insert_with(|| (node.clone(), now));
        if &e.0 != node {
            *e = (node.clone(), now);
        } else {
            e.1 = e.1.max(now);
        }
    }

    fn pin_if_local(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> PinOutcome {
        let mut e = self
            .cache
            .entry(room.clone())
            .or_insert(Cached { pin: None, ts: 0 });
        let cur = e.pin.as_ref().map(|p| &p.node);
        if cur == expected {
            let pin = Pin {
                node: node.clone(),
                created_at: now,
                confirmed_at: now,
            };
            e.pin = Some(pin.clone());
            e.ts = 0;
            // Queued while the cache entry is held (the lock order is always cache, then
            // queue), so that no message lands between the two (`apply`).
            // Behind a decision already queued, it starts from what that one started from
            // (the oldest `expected`, or the node released): what the store still holds.
            let op = Pending::Pinned {
                node: node.clone(),
                expected: expected.cloned(),
            };
            match self.pending.entry(room.clone()) {
                dashmap::Entry::Occupied(mut queued) => {
                    let queued = queued.get_mut();
                    *queued = queued.clone().then(op);
                }
                dashmap::Entry::Vacant(v) => {
                    v.insert(op);
                }
            }
            drop(e);
            PinOutcome::Won(pin)
        } else {
            PinOutcome::Lost(e.pin.clone())
        }
    }

    fn release_local(&self, room: &RoomKey, node: Option<&NodeId>) -> Option<Pin> {
        let mut e = self.cache.get_mut(room)?;
        let matches = e
            .pin
            .as_ref()
            .is_some_and(|p| node.is_none_or(|n| &p.node == n));
        if !matches {
            return None;
        }
        let old = e.pin.take();
        e.ts = 0;
        // Its confirmations are moot: written back, they would pin the room again.
        self.pending_confirms.remove(room);
        // Queued while the cache entry is held, as in `pin_if_local`.
        if let Some(p) = &old {
            // What the store holds is what to release there: after a release and a new
            // pin here, or a re-placement here, still the first node (releasing the new one
            // would leave the store's pin, which the reload would then bring back).
            let node = match self.pending.get(room).map(|p| p.clone()) {
                Some(Pending::Replaced { released, .. }) => released,
                Some(Pending::Pinned {
                    expected: Some(held),
                    ..
                }) => held,
                _ => p.node.clone(),
            };
            self.pending
                .insert(room.clone(), Pending::Released { node });
        }
        drop(e);
        old
    }

    // --- recovery ---

    async fn subscribe_and_sync(self: &Arc<Self>) -> anyhow::Result<redis::aio::PubSubStream> {
        self.follow_master().await?;
        let subs = self.pool.load().subs.clone();
        let first = self.sub_next.load(Ordering::Relaxed);
        let mut failed = Vec::new();
        let mut ps = None;
        for k in 0..subs.len() {
            let i = (first + k) % subs.len();
            match self.subscribe_at(&subs[i]).await {
                Ok(s) => {
                    self.sub_next.store(i, Ordering::Relaxed);
                    ps = Some(s);
                    break;
                }
                Err(e) => failed.push(format!("{e:#}")),
            }
        }
        let Some(ps) = ps else {
            anyhow::bail!("subscription: {}", failed.join("; "));
        };
        self.recover().await?;
        // Caught up: the cache may answer again (`reads_from_redis`).
        self.subscribed.store(true, Ordering::Release);
        Ok(ps.into_on_message())
    }

    /// Opens a subscription to the shared channels on `sub`'s server, within
    /// `connect_timeout` for each step.
    async fn subscribe_at(&self, sub: &redis::Client) -> anyhow::Result<redis::aio::PubSub> {
        let mut ps = tokio::time::timeout(self.connect_timeout, sub.get_async_pubsub())
            .await
            .map_err(|_| anyhow::anyhow!("connect timed out"))??;
        tokio::time::timeout(
            self.connect_timeout,
            ps.subscribe(&[
                &self.keys.pins_channel,
                &self.keys.nodes_channel,
                &self.keys.learned_channel,
            ]),
        )
        .await
        .map_err(|_| anyhow::anyhow!("subscribe timed out"))??;
        Ok(ps)
    }

    /// Pings every command connection, each once more after a failure. A reconnecting
    /// connection answers its first command after a cut with the error that cut it (or that
    /// its last reconnection attempt met while Redis was away), and only then connects
    /// again: without this, the pool's connections each failed one recovery attempt in
    /// turn, each failure waiting out the reconnection backoff, and a router was back 4-5 s
    /// after Redis (BENCHMARKS.md, section 6). A connection silent both times while
    /// another answered is replaced ([`Inner::reopen`]); otherwise it would fail every
    /// recovery until TCP gave up on it, minutes later.
    async fn wake_pool(&self) -> Result<(), StoreError> {
        let pool = self.pool.load_full();
        let pinged = pool.conns.iter().map(|c| async move {
            let mut c = c.clone();
            let mut answer = Ok(());
            for _ in 0..2 {
                let ping = redis::cmd("PING");
                let asked = ping.query_async::<String>(&mut c);
                answer = match tokio::time::timeout(self.cmd_timeout, asked).await {
                    Ok(Ok(_)) => return Ok(()),
                    Ok(Err(e)) => Err((e.is_timeout(), StoreError(format!("ping: {e}")))),
                    Err(_) => Err((
                        true,
                        StoreError(format!("ping: no answer within {:?}", self.cmd_timeout)),
                    )),
                };
            }
            answer
        });
        let (mut answered, mut silent, mut failed) = (false, Vec::new(), None);
        for (i, answer) in join_all(pinged).await.into_iter().enumerate() {
            match answer {
                Ok(()) => answered = true,
                Err((true, e)) => {
                    silent.push(i);
                    failed.get_or_insert(e);
                }
                // An error after the second try: the connection is reconnecting; the
                // next recovery tries again.
                Err((false, e)) => return Err(e),
            }
        }
        match failed {
            None => Ok(()),
            Some(e) if !answered => Err(e),
            Some(e) => match self.reopen(&pool, &silent).await {
                true => Ok(()),
                false => Err(e),
            },
        }
    }

    /// What the supervisor does every check while Redis is up (it is the one task that
    /// writes back and reloads, so those never run twice at once):
    /// - writes back decisions queued after recovery's last write-back (recovery clears
    ///   `down` before it, so a join that saw the store down may queue its decision just
    ///   after; left there it would wait for the next outage while other routers, finding
    ///   no pin in Redis, place the room afresh);
    /// - reloads the pins if Redis's clock stepped back ([`Inner::apply_stamped`]). Messages
    ///   wait meanwhile; those older than the reload are then ignored, its reads being newer.
    ///
    /// A failed write-back is an outage only if Redis fails the probe too; one Redis
    /// refuses while it answers stays queued for the next check.
    async fn catch_up(&self) {
        if !self.pending.is_empty() || !self.pending_confirms.is_empty() {
            if let Err(e) = self.write_back().await {
                if self.confirm_down(e.clone()).await.is_err() {
                    tracing::debug!(error = %e, "queued decisions not written back; trying again");
                }
            }
        }
        if self.reload.swap(false, Ordering::AcqRel) {
            if let Err(e) = self.load_all().await {
                tracing::warn!(error = %e, "pin reload failed; trying again");
                self.reload.store(true, Ordering::Release);
            }
        }
    }

    /// Writes back queued decisions, reloads the cache and the node table, and leaves
    /// degraded mode. Messages received meanwhile are buffered by the subscription.
    async fn recover(&self) -> Result<(), StoreError> {
        self.wake_pool().await?;
        let run_id = self.server_run_id().await?;
        if self.restarted(run_id.as_deref()) {
            if !self.is_down() {
                // Found here, not by a probe (the subscription was lost for another
                // reason, and Redis restarted since): until the write-back, the cache
                // answers for the rooms it knows, not the emptied server.
                self.mark_restarted("Redis restarted while the subscription was reopened");
            } else {
                // Down already, maybe stalled by an earlier recovery that found the same
                // server (and cleared `lost`) but could not write back: this one is
                // another, which may have lost what only the cache holds.
                self.lost.store(true, Ordering::Release);
            }
            tracing::warn!("Redis restarted; writing back every cached pin and admin state");
            self.write_back_all().await?;
        }
        self.lost.store(false, Ordering::Release);
        // Only once the write-back is done: one that failed part-way is tried again at the
        // next attempt, not skipped because the server looks known (the load below would
        // then drop every cached pin the empty server lacks).
        *self.run_id.lock().unwrap_or_else(|p| p.into_inner()) = run_id;
        self.write_back().await?;
        // This load is the reload a step of Redis's clock asked for, if any.
        self.reload.store(false, Ordering::Release);
        self.load_all().await?;
        self.resync_nodes().await?;
        // Down cleared first: a placement in between must not find the store down and
        // no longer stalled, and decide locally.
        let was_down = self.down.swap(false, Ordering::AcqRel);
        self.stalled.store(false, Ordering::Release);
        self.unstalled.notify_waiters();
        if was_down {
            tracing::info!("Redis reachable again; pins reconciled");
        }
        // Decisions queued while the load ran. As in `catch_up`, a failure is an outage only
        // if Redis fails the probe too: one it refuses while it answers stays queued for
        // the supervisor's next check, rather than putting this router back to deciding
        // locally while the other routers follow Redis.
        if let Err(e) = self.write_back().await {
            if self.confirm_down(e.clone()).await.is_ok() {
                return Err(e);
            }
            tracing::warn!(error = %e, "a queued decision Redis refused stays queued");
        }
        Ok(())
    }

    /// The server's run id (`None` for Cluster, or a server that does not say): a new one
    /// means a restart, or with Sentinel a new master.
    async fn server_run_id(&self) -> Result<Option<String>, StoreError> {
        self.run_id_on(&mut self.conn()).await
    }

    /// [`Inner::server_run_id`], asked on `c`.
    async fn run_id_on(&self, c: &mut Conn) -> Result<Option<String>, StoreError> {
        if !matches!(c, Conn::Single(_)) {
            return Ok(None);
        }
        let info: String = self
            .run("info", redis::cmd("INFO").arg("server").query_async(c))
            .await?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .map(|s| s.trim().to_string()))
    }

    /// True if `id` is not the run id last seen after a complete recovery.
    fn restarted(&self, id: Option<&str>) -> bool {
        let known = self.run_id.lock().unwrap_or_else(|p| p.into_inner());
        known.is_some() && id.is_some() && known.as_deref() != id
    }

    /// After a restart that may have lost data: every cached pin and every admin state this
    /// router knows goes back by compare-and-set (a pin already there again wins).
    async fn write_back_all(&self) -> Result<(), StoreError> {
        let pins: Vec<(RoomKey, Pin)> = self
            .cache
            .iter()
            .filter(|e| !self.pending.contains_key(e.key()))
            .filter_map(|e| e.pin.clone().map(|p| (e.key().clone(), p)))
            .collect();
        for chunk in pins.chunks(32) {
            let mut batch = futures_util::stream::FuturesUnordered::new();
            for (room, p) in chunk {
                batch.push(self.write_back_newer(room, p));
            }
            while let Some(r) = batch.next().await {
                r?;
            }
        }
        // The server lost the room index too, and the index writer drops what is queued
        // while the store is down (as it is during recovery), so the load that follows would
        // find none of these pins and drop them from the cache.
        let rooms: Vec<&str> = pins.iter().map(|(room, _)| room.as_str()).collect();
        self.index_now(&rooms).await?;
        let admin: Vec<NodeUpdate> = match self.cluster.get() {
            Some(cluster) => cluster
                .snapshot()
                .nodes()
                .iter()
                .map(|e| (e.id.to_string(), e.live.admin_state()))
                .filter(|(_, s)| *s != crate::placement::AdminState::Active)
                .map(|(id, state)| NodeUpdate::Admin { id, state })
                .collect(),
            None => Vec::new(),
        };
        let _one_writer = self.node_writes.lock().await;
        self.write_in_batches(&admin, true)
            .await
            .map_err(|(_, e)| e)?;
        Ok(())
    }

    /// Adds rooms to the room index now, in batches of 1 000 (recovery, when the index
    /// writer is not writing).
    async fn index_now(&self, rooms: &[&str]) -> Result<(), StoreError> {
        for chunk in rooms.chunks(1000) {
            let mut add = redis::cmd("ZADD");
            add.arg(&self.keys.rooms_index);
            for room in chunk {
                add.arg(0).arg(*room);
            }
            let mut c = self.conn();
            self.run::<i64>("index add", add.query_async(&mut c))
                .await?;
        }
        Ok(())
    }

    /// After a restart or failover: puts the cached pin back where the store lost it. A pin
    /// already there again wins (another router wrote it back first), unless it is an older
    /// placement of the room than ours: a promoted replica that never got the re-placement
    /// (ours) still holds the pin it replaced, whose node users left. Then ours replaces it
    /// by compare-and-set, as every router that saw the re-placement does alike.
    ///
    /// The older pin the first reply shows is not cached: while the store is still down the
    /// cache answers joins, and it must keep sending them to ours until the swap is done.
    ///
    /// The pin goes back created when it was and confirmed now: the confirmation this router
    /// cached may be far older than the one Redis lost (confirmations are not published, so
    /// a router that only watches the room learns of them late), and a pin written back with
    /// it could be released as idle by the next sweep while its room goes on.
    async fn write_back_newer(&self, room: &RoomKey, ours: &Pin) -> Result<(), StoreError> {
        let (now, created) = (ours.confirmed_at.max(wall_ms()), Some(ours.created_at));
        let reply = self
            .pin_script(room, &ours.node, None, now, created)
            .await?;
        let theirs = match &reply.pin {
            Some(p) if !reply.won && p.node != ours.node && p.created_at < ours.created_at => {
                p.node.clone()
            }
            _ => return self.settle_pin(room, reply, true).map(|_| ()),
        };
        let reply = self
            .pin_script(room, &ours.node, Some(&theirs), now, created)
            .await?;
        self.settle_pin(room, reply, false).map(|_| ())
    }

    async fn write_back(&self) -> Result<(), StoreError> {
        // The node table first: the pins' write-back asks it whether a node another router
        // kept hearing is alive (`node_alive_in_store`), and its reports from the outage are
        // what says so. A node write Redis refuses does not hold up the pins (what is kept
        // is written again at the end, and its error returned then).
        if let Err(e) = self.write_pending_nodes().await {
            tracing::warn!(error = %e, "node changes not written back before the pins; trying again after them");
        }
        let rooms: Vec<RoomKey> = self.pending.iter().map(|e| e.key().clone()).collect();
        for room in rooms {
            // In `writing` before it leaves `pending`: never in neither until Redis has it.
            let Some(queued) = self.pending.get(&room).map(|op| op.clone()) else {
                continue;
            };
            self.writing.insert(room.clone(), queued);
            let Some((_, op)) = self.pending.remove(&room) else {
                self.writing.remove(&room);
                continue;
            };
            self.writing.insert(room.clone(), op.clone());
            let r = match &op {
                // Indexed here: the index writer drops what is queued while the store is
                // down, as it still is during recovery.
                Pending::Pinned { node, expected } => {
                    match self.write_back_pin(&room, node, expected).await {
                        Ok(()) => self.index_now(&[room.as_str()]).await,
                        Err(e) => Err(e),
                    }
                }
                Pending::Released { node } => {
                    self.release_remote(&room, Some(node)).await.map(|_| ())
                }
                Pending::Replaced { node, released } => {
                    match self.write_back_replaced(&room, node, released).await {
                        Ok(()) => self.index_now(&[room.as_str()]).await,
                        Err(e) => Err(e),
                    }
                }
            };
            if let Err(e) = r {
                // The pin may be in Redis all the same (its index write failed after it, or
                // the reply was lost): the next try must know it for this router's own.
                if matches!(op, Pending::Pinned { .. }) {
                    self.tried.insert(room.clone(), ());
                }
                // A decision taken meanwhile was queued as if `op` had been written.
                match self.pending.entry(room.clone()) {
                    dashmap::Entry::Occupied(mut newer) => {
                        let newer = newer.get_mut();
                        *newer = op.then(newer.clone());
                    }
                    dashmap::Entry::Vacant(v) => {
                        v.insert(op);
                    }
                }
                self.writing.remove(&room);
                return Err(e);
            }
            self.writing.remove(&room);
        }
        // Every pin is written: no try of this router's is left to recognise.
        self.tried.clear();
        // After the pins (a room pinned during the outage is in the store by now). `CONFIRM`
        // refreshes only a pin that still points at the node, so a confirmation cannot take
        // a room from the node the store chose; where the store has no pin at all, the room
        // is pinned to the node again (`restore_expired`).
        let rooms: Vec<RoomKey> = self
            .pending_confirms
            .iter()
            .map(|e| e.key().clone())
            .collect();
        for room in rooms {
            let Some((_, (node, at))) = self.pending_confirms.remove(&room) else {
                continue;
            };
            let written = match self.confirm_remote(&room, &node, at).await {
                Ok(false) => self.restore_expired(&room, &node, at).await,
                other => other.map(drop),
            };
            if let Err(e) = written {
                // Kept for the next write-back; one heard meanwhile may be newer.
                self.queue_confirm(&room, &node, at);
                return Err(e);
            }
        }
        self.write_pending_nodes().await
    }

    /// A confirmation heard during the outage found no pin to refresh: if Redis holds none,
    /// the key expired while this router could not confirm it (an outage longer than its
    /// life, twice `room_idle_ttl`), and the node that kept reporting the room gets it back.
    /// Left unpinned, the room would be placed afresh by its next join, maybe elsewhere,
    /// and the node told to evict it at its next heartbeat. A pin another router released
    /// meanwhile (the node told it the room ended) comes back too: harmless, as the next
    /// join then goes to the node the room was last on, and an unused pin is swept as idle.
    /// (One this router released drops its confirmations.) Where Redis names another node,
    /// that pin stands.
    async fn restore_expired(
        &self,
        room: &RoomKey,
        node: &NodeId,
        at: Millis,
    ) -> Result<(), StoreError> {
        // Created and confirmed at the confirmation's time.
        if let PinOutcome::Won(_) = self.pin_if_remote(room, node, None, at).await? {
            tracing::info!(room = %room, node = %node, "a pin that expired in Redis during the outage is restored");
        }
        Ok(())
    }

    /// Writes the node changes kept since a write failed. On an error, what is not yet
    /// written stays kept (unless a newer change of the same kind replaced it meanwhile).
    async fn write_pending_nodes(&self) -> Result<(), StoreError> {
        let _one_writer = self.node_writes.lock().await;
        self.write_kept_nodes().await
    }

    /// [`Inner::write_pending_nodes`], by a caller that holds `node_writes`.
    async fn write_kept_nodes(&self) -> Result<(), StoreError> {
        let (keys, updates): (Vec<String>, Vec<NodeUpdate>) = self
            .pending_nodes
            .lock()
            .map(|mut m| {
                let mut kept: Vec<(String, NodeUpdate)> = m.drain().collect();
                // Reports last: a registration written after one would replace it in the
                // table, and the node would read as unheard until its next report.
                kept.sort_by_key(|(_, u)| matches!(u, NodeUpdate::Report { .. }));
                kept.into_iter().unzip()
            })
            .unwrap_or_default();
        let Err((written, e)) = self.write_in_batches(&updates, true).await else {
            return Ok(());
        };
        if let Ok(mut m) = self.pending_nodes.lock() {
            for (key, u) in keys.into_iter().zip(updates).skip(written) {
                m.entry(key).or_insert(u);
            }
        }
        Err(e)
    }

    /// Whether a change of `id`'s admin state waits to be written: the store's older state
    /// must not undo it here meanwhile.
    fn admin_pending(&self, id: &str) -> bool {
        self.pending_nodes.lock().is_ok_and(|m| {
            m.contains_key(&pending_node_key(&NodeUpdate::Admin {
                id: id.to_string(),
                state: crate::placement::AdminState::Active,
            }))
        })
    }

    /// Our outage decision against the store: the store's existing pin wins a disagreement.
    async fn write_back_pin(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: &Option<NodeId>,
    ) -> Result<(), StoreError> {
        let now = self.local_created_at(room);
        // This router's reservation of the room on `node` goes when another router's pin
        // stands in the store: on another node it is no room of `node`'s, and on the same
        // node the winner reserved it already (a room every router placed alone during the
        // outage was counted once per router: a `no_capacity` after Redis returned).
        let not_ours = || self.sync.note_ended(node.clone(), room.clone(), wall_ms());
        // At a first try a pin on the same node is another router's, though made in the same
        // millisecond (two routers placing one room alike); after a failed try it may be
        // ours, if its time is (the caller notes the failure: [`Inner::write_back`]).
        let tried = self.tried.remove(room).is_some();
        match self.pin_if_remote(room, node, None, now).await? {
            PinOutcome::Won(_) => Ok(()),
            PinOutcome::Lost(Some(cur)) if &cur.node == node => {
                if !tried || cur.created_at != now {
                    not_ours();
                }
                Ok(())
            }
            PinOutcome::Lost(Some(cur)) if expected.as_ref() == Some(&cur.node) => {
                // We re-placed the room off a node that failed as we saw it; the store still
                // names that node. If the store says it is alive (another router kept hearing
                // it, and may have sent joins there), the store's pin wins as in any
                // disagreement; if not, nobody re-placed the room and ours stands.
                if self.node_alive_in_store(&cur.node).await? {
                    self.store_won.fetch_add(1, Ordering::Relaxed);
                    not_ours();
                    tracing::warn!(room = %room, ours = %node, store = %cur.node, "outage re-placement lost: the store's node is alive");
                    return Ok(());
                }
                match self.pin_if_remote(room, node, Some(&cur.node), now).await? {
                    PinOutcome::Won(_) => Ok(()),
                    PinOutcome::Lost(_) => {
                        self.store_won.fetch_add(1, Ordering::Relaxed);
                        not_ours();
                        Ok(())
                    }
                }
            }
            PinOutcome::Lost(cur) => {
                self.store_won.fetch_add(1, Ordering::Relaxed);
                if cur.is_some() {
                    not_ours();
                }
                tracing::warn!(room = %room, ours = %node, store = ?cur.map(|p| p.node), "outage decision lost to the store's pin");
                Ok(())
            }
        }
    }

    /// When the cached pin of `room` was made (a local decision's time, written back with
    /// it); 0 without one.
    fn local_created_at(&self, room: &RoomKey) -> Millis {
        self.cache
            .get(room)
            .and_then(|c| c.pin.as_ref().map(|p| p.created_at))
            .unwrap_or(0)
    }

    /// Writes back a pin made here after this router released the store's pin to `released`
    /// during the outage: from `released` to `node` by compare-and-set, or onto no pin; a
    /// pin another router made meanwhile wins.
    async fn write_back_replaced(
        &self,
        room: &RoomKey,
        node: &NodeId,
        released: &NodeId,
    ) -> Result<(), StoreError> {
        let at = self.local_created_at(room);
        let outcome = match self.pin_if_remote(room, node, Some(released), at).await? {
            PinOutcome::Lost(None) => self.pin_if_remote(room, node, None, at).await?,
            o => o,
        };
        match outcome {
            PinOutcome::Won(_) => {}
            PinOutcome::Lost(Some(cur)) if &cur.node == node => {}
            PinOutcome::Lost(cur) => {
                self.store_won.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(room = %room, ours = %node, store = ?cur.map(|p| p.node), "outage decision lost to the store's pin");
            }
        }
        Ok(())
    }

    /// Runs `SWEEP` on one room (with `node`: only if the pin points there) and brings the
    /// cache and the room index up to date with what it found.
    async fn sweep_one(
        &self,
        room: &RoomKey,
        before: Millis,
        node: Option<&NodeId>,
    ) -> Result<Swept, StoreError> {
        let mut c = self.conn();
        let mut inv = self.sweep.key(self.keys.room(room.as_str()));
        inv.arg(before)
            .arg(&self.keys.pins_channel)
            .arg(room.as_str())
            .arg(node.map_or("", NodeId::as_str));
        let (state, v, ts): (i64, String, String) =
            self.run("sweep", inv.invoke_async(&mut c)).await?;
        let ts = ts.parse().unwrap_or(0);
        if state != 1 {
            // Not released: the pin Redis holds (none for -1) goes into the cache below.
            self.vet(room, self.decode(&v).as_ref()).await?;
        }
        if state == -1 {
            // The key expired (no router confirmed it for twice `room_idle_ttl`: an outage,
            // routers down): its index entry goes too. Left, the index grew with every such
            // room until a router restarted and pruned it at its load.
            let _ = self
                .index_tx
                .send(IndexOp::Remove(room.as_str().to_string()));
        }
        Ok(match state {
            1 => {
                self.apply_stamped(room, None, ts);
                let _ = self
                    .index_tx
                    .send(IndexOp::Remove(room.as_str().to_string()));
                Swept::Released(self.decode(&v))
            }
            0 => {
                // Confirmed since, perhaps by another router: take its confirmation time.
                self.apply_stamped(room, self.decode(&v), ts);
                Swept::Confirmed
            }
            2 => {
                self.apply_stamped(room, self.decode(&v), ts);
                Swept::NotThere
            }
            _ => {
                self.apply_stamped(room, None, ts);
                Swept::NotThere
            }
        })
    }

    /// Publishes a message only this router's subscription reads (and ignores: its own
    /// origin on the learned-sizes channel), so that hearing it proves the subscription
    /// alive. False if Redis did not take it (the outage path deals with that).
    async fn probe_subscription(&self) -> bool {
        let mut c = self.conn();
        self.run::<i64>(
            "probe",
            redis::cmd("PUBLISH")
                .arg(&self.keys.learned_channel)
                .arg(format!("{}\nalive\n", self.origin))
                .query_async(&mut c),
        )
        .await
        .is_ok()
    }

    /// Whether the store's node table says `id` is usable: its last report (any router's)
    /// within the heartbeat timeout and no admin disable.
    async fn node_alive_in_store(&self, id: &NodeId) -> Result<bool, StoreError> {
        let mut c = self.conn();
        let (report, admin): (Option<String>, Option<String>) = self
            .run(
                "node state",
                redis::pipe()
                    .hget(&self.keys.nodes, id.as_str())
                    .hget(&self.keys.admin, id.as_str())
                    .query_async(&mut c),
            )
            .await?;
        let heard_at = match report.and_then(|r| serde_json::from_str::<NodeUpdate>(&r).ok()) {
            Some(NodeUpdate::Report { at, .. }) => at,
            _ => return Ok(false),
        };
        // A report stamped further ahead than a timeout comes from before a backward step
        // of a wall clock (as `NodeSync::apply` refuses it).
        let now = wall_ms();
        Ok(now.abs_diff(heard_at) <= self.heartbeat_timeout_ms
            && admin.as_deref() != Some(crate::placement::AdminState::Disabled.as_str()))
    }

    /// Replaces the cache with the store's pins (keeping changes newer than the load).
    async fn load_all(&self) -> Result<(), StoreError> {
        let ts0 = self.server_time_us().await?;
        let mut c = self.conn();
        self.see_ts(ts0);
        self.note_reply_time(ts0);
        let mut seen: HashSet<RoomKey> = HashSet::new();
        let mut start = "-".to_string();
        for _ in 0..100_000 {
            let names: Vec<String> = self
                .run(
                    "load index",
                    redis::cmd("ZRANGE")
                        .arg(&self.keys.rooms_index)
                        .arg(&start)
                        .arg("+")
                        .arg("BYLEX")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(1000)
                        .query_async(&mut c),
                )
                .await?;
            let Some(last) = names.last() else { break };
            start = format!("({last}");
            let keys: Vec<String> = names.iter().map(|n| self.keys.room(n)).collect();
            let values: Vec<Option<String>> = self
                .run(
                    "load pins",
                    redis::cmd("MGET").arg(&keys).query_async(&mut c),
                )
                .await?;
            let mut stale = Vec::new();
            for (name, v) in names.iter().zip(values) {
                let Ok(room) = RoomKey::parse(name, Normalization::None) else {
                    stale.push(name.clone());
                    continue;
                };
                match v.as_deref().and_then(|v| self.decode(v)) {
                    Some(pin) => {
                        let mut e = self
                            .cache
                            .entry(room.clone())
                            .or_insert(Cached { pin: None, ts: 0 });
                        if loaded_pin_replaces(&e, self.queued(&room), ts0) {
                            *e = Cached {
                                pin: Some(pin),
                                ts: ts0,
                            };
                        }
                        seen.insert(room);
                    }
                    None => stale.push(name.clone()),
                }
            }
            for s in stale {
                let _ = self.index_tx.send(IndexOp::Remove(s));
            }
            if keys.len() < 1000 {
                break;
            }
        }
        // Pins gone from the store while we were not listening; tombstones. Not a decision
        // still queued for write-back (see `loaded_pin_replaces`).
        self.cache.retain(|k, v| {
            v.ts > ts0
                || (v.pin.is_some() && seen.contains(k))
                || is_local_decision(v, self.queued(k))
        });
        Ok(())
    }

    /// Re-reads the shared node table and admin states.
    async fn resync_nodes(&self) -> Result<(), StoreError> {
        let Some(cluster) = self.cluster.get() else {
            return Ok(());
        };
        let mut c = self.conn();
        let nodes: HashMap<String, String> = self
            .run(
                "nodes",
                redis::cmd("HGETALL")
                    .arg(&self.keys.nodes)
                    .query_async(&mut c),
            )
            .await?;
        let registered: HashSet<String> = self
            .run(
                "registered",
                redis::cmd("SMEMBERS")
                    .arg(&self.keys.registered)
                    .query_async(&mut c),
            )
            .await?;
        for (id, v) in &nodes {
            let Ok(u) = serde_json::from_str::<NodeUpdate>(v) else {
                continue;
            };
            self.sync.apply(cluster, &u, wall_ms());
            // Registered by an admin, and reported since: still a registered node.
            if let NodeUpdate::Report { info, .. } = u {
                if registered.contains(id) {
                    let put = NodeUpdate::Put {
                        id: id.clone(),
                        info,
                    };
                    self.sync.apply(cluster, &put, wall_ms());
                }
            }
        }
        self.resync_admin(cluster).await
    }

    /// Re-reads the admin states and takes those this router has no newer word of. Its own
    /// changes not yet in Redis (shared and not yet written, or kept after a failed write)
    /// are left alone, and so is every change made here after the read began
    /// ([`NodeSync::apply_resynced_admin`]); without that, a drain whose write crossed the
    /// read was undone here until the next re-sync. The node writer waits meanwhile, so
    /// that a change unwritten when the read began is still unwritten when it is checked.
    async fn resync_admin(&self, cluster: &Cluster) -> Result<(), StoreError> {
        let _no_writes = self.node_writes.lock().await;
        let mark = cluster.admin_mark();
        let mut c = self.conn();
        let admin: HashMap<String, String> = self
            .run(
                "admin",
                redis::cmd("HGETALL")
                    .arg(&self.keys.admin)
                    .query_async(&mut c),
            )
            .await?;
        for (id, s) in admin {
            if self.admin_pending(&id) || self.admin_unwritten(&id) {
                continue;
            }
            if let Ok(state) = serde_json::from_value(serde_json::Value::String(s)) {
                self.sync.apply_resynced_admin(cluster, &id, state, mark);
            }
        }
        Ok(())
    }

    /// Counts an admin change this router shares (`sent`), or one the node writer took care
    /// of (written or kept): see `admin_in_flight`. Other updates are ignored.
    fn admin_sent(&self, u: &NodeUpdate, sent: bool) {
        let NodeUpdate::Admin { id, .. } = u else {
            return;
        };
        let mut m = self
            .admin_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if sent {
            *m.entry(id.clone()).or_insert(0) += 1;
        } else if let Some(n) = m.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                m.remove(id);
            }
        }
    }

    /// Whether an admin change of `id` this router shared has not reached the node writer's
    /// hands yet (or is in them).
    fn admin_unwritten(&self, id: &str) -> bool {
        self.admin_in_flight
            .lock()
            .is_ok_and(|m| m.contains_key(id))
    }

    fn on_message(self: &Arc<Self>, msg: redis::Msg) {
        let channel = msg.get_channel_name();
        let payload = msg.get_payload_bytes();
        let Ok(text) = std::str::from_utf8(payload) else {
            return;
        };
        if channel == self.keys.pins_channel {
            let mut parts = text.splitn(3, '\n');
            let (Some(ts), Some(v), Some(room)) = (parts.next(), parts.next(), parts.next()) else {
                return;
            };
            let (Ok(ts), Ok(room)) = (ts.parse::<u64>(), RoomKey::parse(room, Normalization::None))
            else {
                return;
            };
            self.apply_heard(&room, self.decode(v), ts);
        } else if channel == self.keys.nodes_channel {
            let Ok(env) = serde_json::from_str::<Envelope>(text) else {
                return;
            };
            if env.origin == self.origin {
                return;
            }
            if let Some(cluster) = self.cluster.get() {
                self.sync.apply(cluster, &env.update, wall_ms());
            }
        } else if channel == self.keys.learned_channel {
            let mut parts = text.splitn(3, '\n');
            let (Some(origin), Some(v), Some(room)) = (parts.next(), parts.next(), parts.next())
            else {
                return;
            };
            if origin == self.origin {
                return;
            }
            let (Some(learned), Ok(room)) = (
                Learned::decode(v),
                RoomKey::parse(room, Normalization::None),
            ) else {
                return;
            };
            if let Ok(mut inbox) = self.learned_inbox.lock() {
                if inbox.len() < MAX_LEARNED_INBOX {
                    inbox.push((room, learned));
                }
            }
        }
    }

    /// Writes `updates` in order, [`MAX_NODE_BATCH`] per [`Inner::write_nodes`] call; on an
    /// error, also says how many went through (the ones before the failed call). `late`:
    /// kept updates written after the fact, whose reports go only over older ones.
    async fn write_in_batches(
        &self,
        updates: &[NodeUpdate],
        late: bool,
    ) -> Result<(), (usize, StoreError)> {
        for (i, chunk) in updates.chunks(MAX_NODE_BATCH).enumerate() {
            if let Err(e) = self.write_nodes(chunk, late).await {
                return Err((i * MAX_NODE_BATCH, e));
            }
        }
        Ok(())
    }

    /// Stores and announces `updates`, in order, in one round trip ([`WRITE_NODES`]): each
    /// update is announced only once it is stored, so no router hears of one Redis refused
    /// (a script stops at the first refused write: READONLY on a demoted master, NOREPLICAS,
    /// OOM at `maxmemory`, a key of the wrong type). Those before it stay written and
    /// announced; the caller keeps what must not be lost and writes it again.
    async fn write_nodes(&self, updates: &[NodeUpdate], late: bool) -> Result<(), StoreError> {
        let mut inv = self.write_nodes.prepare_invoke();
        inv.key(&self.keys.nodes)
            .key(&self.keys.admin)
            .key(&self.keys.registered)
            .arg(&self.keys.nodes_channel);
        for u in updates {
            let (op, value) = match u {
                NodeUpdate::Report { .. } => (
                    if late { "late" } else { "set" },
                    serde_json::to_string(u).map_err(err)?,
                ),
                // Also noted apart: the node's next report replaces the stored entry.
                NodeUpdate::Put { .. } => ("put", serde_json::to_string(u).map_err(err)?),
                NodeUpdate::Admin { state, .. } => ("admin", state.as_str().to_string()),
                // The admin state stays: a node that comes back is still drained or
                // disabled until an admin enables it (`Cluster::remove`).
                NodeUpdate::Removed {
                    silent_since: None, ..
                } => ("del", String::new()),
                // Forgotten for its silence: the record stays if it holds newer word of the
                // node, or an admin registered it (the remover's view was the one behind).
                NodeUpdate::Removed {
                    silent_since: Some(since),
                    ..
                } => ("forget", since.to_string()),
                // Only announced: every router repeats its own every second, so a router
                // that subscribes late has them all within a second without a stored copy.
                NodeUpdate::Reserved { .. } => ("none", String::new()),
            };
            let env = serde_json::to_string(&Envelope {
                origin: self.origin.clone(),
                update: u.clone(),
            })
            .map_err(err)?;
            inv.arg(op).arg(u.id()).arg(value).arg(env);
        }
        let mut c = self.conn();
        self.run::<i64>("node update", inv.invoke_async(&mut c))
            .await
            .map(|_| ())
    }
}

/// Whether a cache entry is a decision this router took while Redis was away and has not
/// written back yet: a pin or a release made locally (Redis time 0), with its write-back
/// queued (a local pin is in the cache an instant before its queue entry). Recovery runs
/// while joins go on: one decided after the first write-back took the queue is this
/// router's latest word on the room until the second write-back settles it by
/// compare-and-set, so the reload must not wipe it. Wiped, the room's next join would miss
/// the cache and be placed afresh, maybe elsewhere (a split), or the write-back would
/// write the pin with no time and the next sweep release it.
fn is_local_decision(e: &Cached, queued: bool) -> bool {
    e.ts == 0 && (e.pin.is_some() || queued)
}

/// Whether the pin the reload read from Redis at `ts0` replaces the cache entry `e`: the
/// entry is older, and not a local decision still queued ([`is_local_decision`]).
fn loaded_pin_replaces(e: &Cached, queued: bool, ts0: u64) -> bool {
    e.ts <= ts0 && !is_local_decision(e, queued)
}

/// Longest wait between two attempts to subscribe again: how late, at most, a router notices
/// that Redis is back. An attempt while Redis is away costs a refused connection.
const MAX_RESUBSCRIBE_BACKOFF: Duration = Duration::from_millis(500);

/// How often a router that thinks Redis is up checks (a PING within `connect_timeout`).
/// A Redis that went silent without closing a socket (a frozen host, a partition) fails no
/// command the hot path sends (pinned joins read the cache), so without this check the
/// router would notice only at its next new room; by then the nodes it knows only through
/// Redis would look dead (no reports for `heartbeat_timeout`) instead of being held.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);

/// Keeps the subscription alive: applies messages, re-syncs nodes periodically, detects an
/// outage (a failed command, a lost or silent subscription, or a PING every
/// [`LIVENESS_EVERY`] that gets no answer), reconnects with exponential backoff (50 to
/// 500 ms) and reconciles on return. A subscription lost while Redis still answers commands
/// is renewed without an outage (see [`Inner::subscription_failed`]). Leaving an outage
/// always subscribes anew before reloading: the old subscription may have died in the
/// outage without a word, and with it every change the other routers made since.
/// Every reconnection goes through [`Inner::subscribe_and_sync`], which with Sentinel asks
/// the sentinels for the master first; while the subscription lives, an outage that moved
/// the master ends it, so that the subscription moves too.
async fn supervise(
    inner: Arc<Inner>,
    first: redis::aio::PubSubStream,
    mut stop: watch::Receiver<bool>,
) {
    let mut stream = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        if *stop.borrow() {
            return;
        }
        let s = match stream.take() {
            Some(s) => Ok(s),
            None => inner.subscribe_and_sync().await,
        };
        let stalled = match s {
            Ok(mut s) => {
                backoff = Duration::from_millis(50);
                let mut resync = tokio::time::interval(inner.resync_interval);
                resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                resync.tick().await;
                let mut check = tokio::time::interval(Duration::from_millis(250));
                let mut alive = tokio::time::interval(LIVENESS_EVERY);
                alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                alive.tick().await;
                // A subscription whose socket died silently (a host gone, a NAT entry
                // expired) never ends: every re-sync this router publishes a probe to itself
                // and, if not even that came back by the next one, subscribes again.
                let (mut heard, mut probed) = (Instant::now(), None::<Instant>);
                let lost = loop {
                    tokio::select! {
                        _ = stop.changed() => return,
                        m = s.next() => match m {
                            Some(m) => {
                                heard = Instant::now();
                                inner.on_message(m);
                            }
                            None => break "subscription to Redis lost".to_string(),
                        },
                        _ = resync.tick() => {
                            let waited = inner.resync_interval / 2;
                            if probed.is_some_and(|p| heard < p && p.elapsed() >= waited) {
                                break "subscription to Redis silent: its probe did not come back".to_string();
                            }
                            probed = inner.probe_subscription().await.then(Instant::now);
                            if let Err(e) = inner.resync_nodes().await {
                                tracing::warn!(error = %e, "node table re-sync failed");
                            }
                            // Other routers' reservations expire in `expire_reservations`,
                            // outages included.
                            let cutoff = inner.last_ts.load(Ordering::Relaxed).saturating_sub(60_000_000);
                            inner.cache.retain(|_, v| v.pin.is_some() || v.ts == 0 || v.ts > cutoff);
                        }
                        _ = alive.tick() => {
                            if !inner.is_down() {
                                match inner.probe().await {
                                    Probe::Answers => {}
                                    Probe::Restarted(why) => {
                                        inner.mark_restarted(why);
                                    }
                                    Probe::Unreachable(why) => {
                                        inner.mark_down_if_up(format!("Redis went silent: {why}"))
                                    }
                                }
                            }
                        }
                        _ = check.tick() => {
                            if !inner.is_down() {
                                inner.catch_up().await;
                            }
                            if inner.is_down() {
                                // Reconnects through `subscribe_and_sync` (a new master's,
                                // with Sentinel), which subscribes before it reloads.
                                // Keeps the reason the outage began with.
                                break inner.why.lock().map(|w| w.clone()).unwrap_or_default();
                            }
                        }
                    }
                };
                // Only an outage if Redis fails the probe too (see `subscription_failed`).
                inner.subscription_failed(lost).await
            }
            Err(e) => inner.subscription_failed(format!("{e:#}")).await,
        };
        if stalled {
            // Redis answers again, and new rooms wait (`RedisStore::pin_if`): the attempt
            // that failed most likely began while it did not (frozen, or restarting).
            backoff = Duration::from_millis(50);
        }
        tokio::select! {
            _ = stop.changed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_RESUBSCRIBE_BACKOFF);
    }
}

/// With Sentinel: a failover announced by the sentinels marks the store down unless the
/// commands already go to the new master; the reconnection then follows it (see
/// [`supervise`]). Without this the store would notice only when the old master refuses a
/// write or drops the connection, and the old master takes writes until it is demoted.
async fn watch_failovers(inner: Arc<Inner>, stop: watch::Receiver<bool>) {
    let Some(sentinels) = &inner.sentinels else {
        return;
    };
    sentinels
        .watch(stop, |to| {
            // As a probe answered by a replica (`Inner::probe`): the other routers follow
            // the sentinels too, so new rooms wait for the new master rather than being
            // decided here alone.
            if inner.pool.load().server != to {
                inner.mark_restarted(format!(
                    "the sentinels moved master {:?} to {to}",
                    sentinels.master_name()
                ));
            }
        })
        .await;
}

/// While Redis is down, keeps healthy the nodes that were healthy when the outage began (for
/// at most `store.outage_node_hold`, or the whole outage with probes): this router may have heard of
/// them only through Redis, and an outage of the store is not a failure of every node.
/// Heartbeats that reach this router directly still update them as usual, and a node this
/// router's own check marked (its heartbeat forgotten) is not held.
async fn hold_nodes(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let since = inner.outage_since.load(Ordering::Acquire);
        let (Some(cluster), true) = (inner.cluster.get(), inner.is_down() && since > 0) else {
            continue;
        };
        let now = wall_ms();
        if now.saturating_sub(since) > inner.hold_ms {
            continue;
        }
        let healthy_at_start = since.saturating_sub(inner.heartbeat_timeout_ms);
        for e in cluster.snapshot().nodes() {
            if e.live
                .last_heartbeat()
                .is_some_and(|t| t > healthy_at_start)
            {
                e.live.hold_heartbeat(now);
            }
        }
    }
}

/// Writes and publishes shared node updates in order; queues admin changes during outages.
async fn node_writer(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<NodeUpdate>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::new();
    // Unlike `next_batch`, takes what queued during an outage too: admin changes are kept.
    while recv_batch(&mut rx, &mut stop, &mut batch).await {
        // Updates queue up behind the Redis round trip when reservations change on many
        // nodes at once (a burst of new rooms, with shared reservations): of what queued
        // meanwhile, only each node's newest report and reservation still matter.
        supersede(&mut batch);
        // A change kept after a failed write goes first (and before what may supersede it):
        // a write can fail while Redis is reachable (a command refused at `maxmemory`), so
        // it cannot wait for the write-back after an outage, which may never come. If it
        // fails again, the batch is kept behind it, not written: an older admin state
        // written after a newer one would undo it.
        let _one_writer = inner.node_writes.lock().await;
        let writable = !inner.is_down() && inner.write_kept_nodes().await.is_ok();
        let written = if !writable {
            0
        } else {
            match inner.write_in_batches(&batch, false).await {
                Ok(()) => batch.len(),
                Err((written, _)) => written,
            }
        };
        if let Ok(mut m) = inner.pending_nodes.lock() {
            keep_unwritten(&mut m, &batch[written..]);
        }
        for u in &batch {
            inner.admin_sent(u, false);
        }
        batch.clear();
    }
}

/// Keeps, in `kept`, what of `unwritten` (in the order it was shared) must be written later.
/// Reservations are repeated, the next one replacing a lost one; admin changes,
/// registrations and removals are not, so they are kept. A node's newest report is kept
/// too (`report {id}`), though the next one would replace it: that comes a heartbeat
/// interval after the outage ends, and until then the store's node table holds the report
/// from before the outage, by which a router that stopped hearing the node (its hold over)
/// takes it for gone with every other router's word (`node_alive_in_store`) and moves its
/// rooms (a failure-injection run: rooms moved back and forth for a second after Redis
/// returned). A report of a node made after its kept removal drops the removal: the node
/// came back (it heartbeated to this router, which added it again) before the removal could
/// be written, and written later it would have every other router drop a node that hosts
/// rooms. A removal drops a kept report made no later. (The routers that predate
/// [`NodeUpdate::Removed`]'s time would take it whatever the node said since.)
fn keep_unwritten(kept: &mut HashMap<String, NodeUpdate>, unwritten: &[NodeUpdate]) {
    let report_key = |id: &str| format!("report {id}");
    for u in unwritten {
        match u {
            NodeUpdate::Report { at, .. } => {
                let key = pending_node_key(u);
                let older =
                    |k: &NodeUpdate| matches!(k, NodeUpdate::Removed { at: r, .. } if r < at);
                if kept.get(&key).is_some_and(older) {
                    kept.remove(&key);
                }
                let removed = matches!(kept.get(&key), Some(NodeUpdate::Removed { .. }));
                if !removed {
                    kept.insert(report_key(u.id()), u.clone());
                }
            }
            NodeUpdate::Reserved { .. } => {}
            NodeUpdate::Removed { at: r, .. } => {
                let no_later =
                    |k: &NodeUpdate| matches!(k, NodeUpdate::Report { at, .. } if at <= r);
                if kept.get(&report_key(u.id())).is_some_and(no_later) {
                    kept.remove(&report_key(u.id()));
                }
                kept.insert(pending_node_key(u), u.clone());
            }
            _ => {
                kept.insert(pending_node_key(u), u.clone());
            }
        }
    }
}

/// Forgets the reservations of routers not heard from over a whole `store.resync_interval`
/// ([`NodeSync::expire_reserved`]), every interval, whether the subscription is open or
/// Redis is unreachable: during an outage no router is heard from, and what the others
/// reserved before it (routers that may have stopped since) must not inflate this router's
/// û for as long as it lasts. They repeat theirs within a second of its end.
async fn expire_reservations(inner: Arc<Inner>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(inner.resync_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        if let Some(cluster) = inner.cluster.get() {
            inner.sync.expire_reserved(cluster);
        }
    }
}

/// Under which key a node change waits to be written: the newest change of a node's admin
/// state replaces an older one, and so does the newest registration or removal, but neither
/// kind replaces the other (a hand registration followed by a drain keeps both).
fn pending_node_key(u: &NodeUpdate) -> String {
    match u {
        NodeUpdate::Admin { id, .. } => format!("admin {id}"),
        other => format!("node {}", other.id()),
    }
}

/// Waits for what queued (at most 512) and puts it in `batch`, emptied first. False when the
/// store stops or every sender is gone.
async fn recv_batch<T>(
    rx: &mut mpsc::UnboundedReceiver<T>,
    stop: &mut watch::Receiver<bool>,
    batch: &mut Vec<T>,
) -> bool {
    batch.clear();
    tokio::select! {
        _ = stop.changed() => false,
        n = rx.recv_many(batch, 512) => n > 0,
    }
}

/// Drops every report and every reservation of a node that a later one of the same kind in
/// `batch` supersedes (each carries the whole state: the node's load, this router's whole
/// reservation there). Admin changes, puts and removals all stay, in order.
fn supersede(batch: &mut Vec<NodeUpdate>) {
    let mut newer: HashSet<(bool, &str)> = HashSet::new();
    let mut stale = vec![false; batch.len()];
    for (i, u) in batch.iter().enumerate().rev() {
        let kind = match u {
            NodeUpdate::Report { .. } => true,
            NodeUpdate::Reserved { .. } => false,
            _ => continue,
        };
        stale[i] = !newer.insert((kind, u.id()));
    }
    let mut stale = stale.into_iter();
    batch.retain(|_| !stale.next().unwrap_or(false));
}

/// Waits for the next batch of queued writes (at most 512) into `batch`. False when the
/// store stops. Batches that arrive while Redis is unreachable are dropped: the writers that
/// use this can afford it (see each).
async fn next_batch<T>(
    inner: &Inner,
    rx: &mut mpsc::UnboundedReceiver<T>,
    stop: &mut watch::Receiver<bool>,
    batch: &mut Vec<T>,
) -> bool {
    while recv_batch(rx, stop, batch).await {
        if !inner.is_down() {
            return true;
        }
    }
    false
}

/// What a batch of index changes leaves each room as: its last change (true: indexed).
/// A room released and pinned again within one batch stays indexed, whichever of ZADD and
/// ZREM runs first.
fn last_index_ops(batch: &[IndexOp]) -> HashMap<&str, bool> {
    let mut last = HashMap::with_capacity(batch.len());
    for op in batch {
        match op {
            IndexOp::Add(r) => last.insert(r.as_str(), true),
            IndexOp::Remove(r) => last.insert(r.as_str(), false),
        };
    }
    last
}

/// Maintains the room index in batches (one ZADD / ZREM per batch). During an outage the
/// index is not written: the load after recovery prunes it and confirmations re-add.
async fn index_writer(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<IndexOp>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(512);
    while next_batch(&inner, &mut rx, &mut stop, &mut batch).await {
        let mut add = redis::cmd("ZADD");
        add.arg(&inner.keys.rooms_index);
        let mut rem = redis::cmd("ZREM");
        rem.arg(&inner.keys.rooms_index);
        let (mut na, mut nr) = (0, 0);
        for (room, indexed) in last_index_ops(&batch) {
            if indexed {
                add.arg(0).arg(room);
                na += 1;
            } else {
                rem.arg(room);
                nr += 1;
            }
        }
        let mut c = inner.conn();
        if na > 0 {
            let _ = inner.run::<i64>("index add", add.query_async(&mut c)).await;
        }
        if nr > 0 {
            let _ = inner
                .run::<i64>("index remove", rem.query_async(&mut c))
                .await;
        }
    }
}

/// Writes learned room sizes in batches. Best effort: while Redis is unreachable they are
/// dropped (the routers keep theirs in memory, and save again when a session ends).
async fn learned_writer(
    inner: Arc<Inner>,
    mut rx: mpsc::UnboundedReceiver<LearnedOp>,
    mut stop: watch::Receiver<bool>,
) {
    let mut batch = Vec::with_capacity(512);
    while next_batch(&inner, &mut rx, &mut stop, &mut batch).await {
        // The keys share the prefix's slot (one pipeline, on Redis Cluster too); the
        // announcements go out one by one afterwards, as the node updates do.
        let mut save = redis::pipe();
        let mut announce = Vec::new();
        let mut forget = None;
        for op in &batch {
            match op {
                LearnedOp::Save(room, l) => {
                    let v = l.encode();
                    save.hset(&inner.keys.learned, room, &v)
                        .ignore()
                        .zadd(&inner.keys.learned_seen, room, l.last_seen)
                        .ignore();
                    announce.push(format!("{}\n{v}\n{room}", inner.origin));
                }
                // The latest sweep's word.
                LearnedOp::Forget(before, now) => forget = Some((*before, *now)),
            }
        }
        let mut c = inner.conn();
        if !announce.is_empty() {
            if let Err(e) = inner
                .run::<()>("save learned", save.query_async(&mut c))
                .await
            {
                tracing::debug!(error = %e, "learned room sizes not saved");
            }
        }
        for message in announce {
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(&inner.keys.learned_channel).arg(message);
            let sent = publish.query_async(&mut c);
            if let Err(e) = inner.run::<i64>("announce learned", sent).await {
                tracing::debug!(error = %e, "learned room size not announced");
                break;
            }
        }
        if let Some((before, now)) = forget {
            let mut inv = inner.forget_learned.key(&inner.keys.learned);
            inv.key(&inner.keys.learned_seen)
                .arg(before)
                .arg(FORGET_AT_MOST)
                .arg(now);
            if let Err(e) = inner
                .run::<i64>("forget learned", inv.invoke_async(&mut c))
                .await
            {
                tracing::debug!(error = %e, "stale learned room sizes not forgotten");
            }
        }
    }
}

impl PinStore for RedisStore {
    async fn get(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        let i = &self.inner;
        if i.reads_from_redis_for(room) {
            // Down now (`None`): the cache answers, as in any outage.
            if let Some(pin) = i.read_unless_down(room).await? {
                return Ok(pin);
            }
        }
        let cached = i.cache.get(room);
        Ok(cached.as_ref().and_then(|c| c.pin.clone()))
    }

    async fn node_alive_elsewhere(&self, node: &NodeId) -> Option<bool> {
        let i = &self.inner;
        if i.is_down() {
            return None;
        }
        i.node_alive_in_store(node).await.ok()
    }

    async fn get_stored(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        let i = &self.inner;
        if !i.is_down() {
            if let Some(pin) = i.read_unless_down(room).await? {
                return Ok(pin);
            }
        }
        let cached = i.cache.get(room);
        Ok(cached.as_ref().and_then(|c| c.pin.clone()))
    }

    #[inline]
    fn peek<R>(&self, room: &RoomKey, f: impl FnOnce(Option<&Pin>) -> R) -> Option<R> {
        // Without the subscription the cache may be stale: `get` asks Redis instead.
        if self.inner.reads_from_redis() {
            return None;
        }
        // The cache is complete: a miss means no pin (a pin made elsewhere an instant ago is
        // found by the compare-and-set that follows).
        let cached = self.inner.cache.get(room);
        Some(f(cached.as_ref().and_then(|c| c.pin.as_ref())))
    }

    async fn pin_if(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> Result<PinOutcome, StoreError> {
        let i = &self.inner;
        if !i.is_down() {
            match i.pin_if_remote(room, node, expected, now).await {
                Ok(o) => return Ok(o),
                Err(e) => {
                    if let Err(e) = i.confirm_down(e).await {
                        // Redis answers the probe: one command slow past `command_timeout`
                        // (a fork for a save, a pause), or its reply lost. Asked once more,
                        // as a read is: a compare-and-set, so a first attempt that was
                        // written after all shows as the pin it made (`Lost`, and the
                        // caller joins it), and one Redis runs late is refused by its
                        // deadline. A second failure is the caller's error, unless it
                        // turns out to be an outage.
                        // Unless another path found the store down meanwhile: then its
                        // rule holds (below).
                        if !i.is_down() {
                            match i.pin_if_remote(room, node, expected, now).await {
                                Ok(o) => {
                                    return Ok(i.first_attempt_won(room, node, expected, now, o))
                                }
                                Err(again) => {
                                    tracing::debug!(first = %e, again = %again, "a placement failed twice while Redis answers");
                                    i.confirm_down(again).await?;
                                }
                            }
                        }
                    }
                    // The outage began with this call: `node` was chosen by the configured
                    // rule, over this router's own view of load, and the other routers will
                    // decide this room by the rule they all share while Redis is out of
                    // reach (`PinStore::deciding_alone`). The caller decides again, by that
                    // rule, from the pin as the cache holds it (a failure-injection run:
                    // rooms placed in that second went to two nodes).
                    return self.get(room).await.map(PinOutcome::Lost);
                }
            }
        }
        if i.is_stalled() {
            if i.wait_unstalled().await {
                // Caught up (or out of reach again): `node` was chosen by the rule for a
                // router deciding alone, from a pin that may be old by now. The caller
                // decides again, from the pin the store holds now.
                return self.get(room).await.map(PinOutcome::Lost);
            }
            let why = i.why.lock().map(|w| w.clone()).unwrap_or_default();
            return Err(StoreError(format!(
                "Redis answers but this router has not caught up with it ({why}); new placements wait"
            )));
        }
        Ok(i.pin_if_local(room, node, expected, now))
    }

    async fn confirm(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> Result<bool, StoreError> {
        let i = &self.inner;
        // The cache's confirmed_at is what Redis holds as far as we know (it is updated
        // from Redis, or during an outage by confirmations queued for write-back), so a
        // confirmation we wrote recently needs no new write: node reports list every room
        // every heartbeat.
        let (mine, fresh) = match i.cache.get(room) {
            Some(c) => match &c.pin {
                Some(p) if &p.node == node => {
                    (true, now.saturating_sub(p.confirmed_at) < i.pin_ttl_ms / 16)
                }
                _ => (false, false),
            },
            None => (false, false),
        };
        if i.is_down() {
            // Remembered and written back on recovery, so that the room is not swept as
            // idle by the pre-outage confirmation Redis still holds.
            return Ok(i.confirm_local(room, node, now));
        }
        if fresh {
            return Ok(true);
        }
        match i.confirm_remote(room, node, now).await {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::debug!(error = %e, "confirmation not written");
                Ok(mine)
            }
        }
    }

    async fn release_if(&self, room: &RoomKey, node: &NodeId) -> Result<bool, StoreError> {
        let i = &self.inner;
        if !i.is_down() {
            match i.release_remote(room, Some(node)).await {
                Ok(old) => return Ok(old.is_some()),
                Err(e) => i.confirm_down(e).await?,
            }
        }
        Ok(i.release_local(room, Some(node)).is_some())
    }

    async fn release_if_unconfirmed(
        &self,
        room: &RoomKey,
        node: &NodeId,
        before: Millis,
    ) -> Result<Unconfirmed, StoreError> {
        let i = &self.inner;
        // While Redis is unreachable the other routers' confirmations are out of sight: keep
        // the pin; the node's next report asks again. Read from the cache itself: `peek`
        // declines while the store is stalled, and "no pin" would have the router stop
        // asking about a room whose pin is there.
        let kept = || {
            let cached = i.cache.get(room);
            if cached
                .as_ref()
                .and_then(|c| c.pin.as_ref())
                .is_some_and(|p| &p.node == node)
            {
                Unconfirmed::Confirmed
            } else {
                Unconfirmed::NotThere
            }
        };
        if i.is_down() {
            return Ok(kept());
        }
        Ok(match i.sweep_one(room, before, Some(node)).await {
            Ok(Swept::Released(_)) => Unconfirmed::Released,
            Ok(Swept::Confirmed) => Unconfirmed::Confirmed,
            Ok(Swept::NotThere) => Unconfirmed::NotThere,
            Err(e) => {
                i.confirm_down(e).await?;
                kept()
            }
        })
    }

    async fn remove(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        let i = &self.inner;
        if !i.is_down() {
            match i.release_remote(room, None).await {
                Ok(old) => return Ok(old),
                Err(e) => i.confirm_down(e).await?,
            }
        }
        Ok(i.release_local(room, None))
    }

    async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        // The cache holds every pin; list it like the memory store does.
        let mut rooms: Vec<(RoomKey, Pin)> = self
            .inner
            .cache
            .iter()
            .filter(|e| cursor.is_none_or(|c| e.key().as_str() > c))
            .filter_map(|e| e.pin.clone().map(|p| (e.key().clone(), p)))
            .collect();
        rooms.sort_by(|a, b| a.0.cmp(&b.0));
        let more = rooms.len() > limit;
        rooms.truncate(limit);
        let next_cursor = if more {
            rooms.last().map(|(k, _)| k.as_str().to_string())
        } else {
            None
        };
        Ok(Page { rooms, next_cursor })
    }

    async fn sweep_idle(
        &self,
        before: Millis,
        now: Millis,
    ) -> Result<Vec<(RoomKey, NodeId)>, StoreError> {
        let i = &self.inner;
        // Node removals noted before a backward step of the wall clock come back to now,
        // with the heartbeat times the router's sweep clamps (`Live::clamp_heartbeat`): left
        // in the future, they would refuse the node's relayed reports for as long as the
        // step. (The store's own clock: the one they were noted by.)
        i.sync.clamp_removed(wall_ms());
        let mut idle = Vec::new();
        let mut ahead = Vec::new();
        for e in i.cache.iter() {
            match &e.pin {
                Some(p) if p.confirmed_at < before => idle.push(e.key().clone()),
                Some(p) if p.confirmed_at > now => ahead.push((e.key().clone(), p.node.clone())),
                _ => {}
            }
        }
        // `confirm` writes only when the copy it sees is old, and a copy ahead of the clock
        // would never look old: Redis would expire a live room's pin. The cache's copy comes
        // back to now at once, even during an outage; Redis's when it answers.
        for (room, _) in &ahead {
            if let Some(mut c) = i.cache.get_mut(room) {
                if let Some(p) = c.pin.as_mut() {
                    p.confirmed_at = p.confirmed_at.min(now);
                }
            }
        }
        if i.is_down() {
            // Releasing needs the store's view of confirmations; wait for it.
            return Ok(Vec::new());
        }
        for (room, node) in &ahead {
            if let Err(e) = i.confirm_back(room, node, now).await {
                tracing::warn!(error = %e, "idle sweep interrupted");
                return Ok(Vec::new());
            }
        }
        let mut released = Vec::new();
        for room in idle {
            match i.sweep_one(&room, before, None).await {
                Ok(Swept::Released(Some(p))) => released.push((room, p.node)),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "idle sweep interrupted");
                    break;
                }
            }
        }
        Ok(released)
    }

    async fn count(&self) -> Result<usize, StoreError> {
        Ok(self.inner.cache.iter().filter(|e| e.pin.is_some()).count())
    }

    fn any_pin(&self, mut f: impl FnMut(&RoomKey, &Pin) -> bool) -> bool {
        // The cache is complete (see `peek`).
        self.inner
            .cache
            .iter()
            .any(|e| e.pin.as_ref().is_some_and(|p| f(e.key(), p)))
    }

    fn shared(&self) -> bool {
        true
    }

    fn deciding_alone(&self) -> bool {
        self.inner.is_down()
    }

    fn health(&self) -> StoreHealth {
        if self.inner.is_down() {
            let why = self.inner.why.lock().map(|w| w.clone()).unwrap_or_default();
            let lost = self.inner.lost.load(Ordering::Acquire);
            StoreHealth::Degraded(if self.inner.is_stalled() && lost {
                format!("Redis answers but may have lost pins ({why}); serving known pins from cache, new rooms wait, then are refused, until they are written back")
            } else if self.inner.is_stalled() {
                format!("Redis answers but refuses to catch up ({why}); reading pins from Redis; new rooms wait, then are refused")
            } else {
                format!("Redis unreachable ({why}); serving from cache")
            })
        } else {
            StoreHealth::Ok
        }
    }

    fn attach(&self, cluster: &Arc<Cluster>) {
        if self.inner.cluster.set(cluster.clone()).is_ok() {
            // Pick up the shared node table now rather than at the first re-sync.
            let inner = self.inner.clone();
            tokio::spawn(async move {
                if let Err(e) = inner.resync_nodes().await {
                    tracing::warn!(error = %e, "initial node table sync failed");
                }
            });
        }
    }

    fn share_node(&self, update: NodeUpdate) {
        self.inner.sync.own(&update, wall_ms());
        self.inner.admin_sent(&update, true);
        let _ = self.inner.node_tx.send(update);
    }

    fn save_learned(&self, room: &RoomKey, learned: Learned) {
        let _ = self
            .inner
            .learned_tx
            .send(LearnedOp::Save(room.as_str().to_string(), learned));
    }

    fn forget_learned(&self, before: Millis, now: Millis) {
        let _ = self.inner.learned_tx.send(LearnedOp::Forget(before, now));
    }

    fn take_observed(&self) -> Vec<crate::cluster::sync::Observed> {
        self.inner.sync.take_observed()
    }

    fn take_learned(&self) -> Vec<(RoomKey, Learned)> {
        self.inner
            .learned_inbox
            .lock()
            .map(|mut inbox| std::mem::take(&mut *inbox))
            .unwrap_or_default()
    }

    async fn load_learned(&self) -> Result<Vec<(RoomKey, Learned)>, StoreError> {
        let i = &self.inner;
        let mut c = i.conn();
        let all: HashMap<String, String> = i
            .run(
                "load learned",
                redis::cmd("HGETALL")
                    .arg(&i.keys.learned)
                    .query_async(&mut c),
            )
            .await?;
        Ok(all
            .into_iter()
            .filter_map(|(room, v)| {
                let room = RoomKey::parse(&room, Normalization::None).ok()?;
                Some((room, Learned::decode(&v)?))
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    fn n(id: &str) -> NodeId {
        NodeId::parse(id).unwrap()
    }

    fn pinned(node: &str, expected: Option<&str>) -> Pending {
        Pending::Pinned {
            node: n(node),
            expected: expected.map(n),
        }
    }

    fn released(node: &str) -> Pending {
        Pending::Released { node: n(node) }
    }

    fn replaced(node: &str, released: &str) -> Pending {
        Pending::Replaced {
            node: n(node),
            released: n(released),
        }
    }

    /// A write-back that failed, and a decision taken while it was in flight (queued as if
    /// it had gone through): what is queued then starts from what the store still holds.
    #[test]
    fn a_decision_taken_during_a_failed_write_back_starts_from_what_the_store_still_holds() {
        let cases = [
            // A release of X failed; the room was pinned to B meanwhile: X -> B.
            (released("x"), pinned("b", None), replaced("b", "x")),
            (released("x"), replaced("b", "c"), replaced("b", "x")),
            // ... and released again: X is still the store's pin to release.
            (released("x"), released("b"), released("x")),
            (replaced("a", "x"), released("a"), released("x")),
            (
                replaced("a", "x"),
                pinned("b", Some("a")),
                replaced("b", "x"),
            ),
            // A pin over E failed; the room was re-pinned: still from E.
            (
                pinned("a", Some("e")),
                pinned("b", Some("a")),
                pinned("b", Some("e")),
            ),
            (pinned("a", None), replaced("b", "a"), pinned("b", None)),
            // A pin failed and the room was released meanwhile: nothing of ours is stored.
            (pinned("a", None), released("a"), released("a")),
            // ... a pin over E: E is what the store holds, and what the release must free.
            (pinned("a", Some("e")), released("a"), released("e")),
        ];
        for (failed, newer, want) in cases {
            let got = failed.clone().then(newer.clone());
            assert_eq!(
                format!("{got:?}"),
                format!("{want:?}"),
                "{failed:?} then {newer:?}"
            );
        }
    }

    #[test]
    fn a_queued_decision_names_the_node_it_pins_and_the_one_it_replaces() {
        assert!(pinned("b", Some("e")).names(&n("b")));
        assert!(pinned("b", Some("e")).names(&n("e")));
        assert!(!pinned("b", None).names(&n("e")));
        assert!(released("x").names(&n("x")));
        assert!(!released("x").names(&n("b")));
        assert!(replaced("b", "x").names(&n("x")) && replaced("b", "x").names(&n("b")));
        assert!(!replaced("b", "x").names(&n("d")));
    }

    #[test]
    fn a_batch_of_index_changes_leaves_each_room_as_its_last_change() {
        let ops = [
            IndexOp::Add("a".into()),
            IndexOp::Remove("a".into()),
            IndexOp::Add("a".into()),
            IndexOp::Add("b".into()),
            IndexOp::Remove("b".into()),
            IndexOp::Remove("c".into()),
        ];
        let last = last_index_ops(&ops);
        assert_eq!(last.len(), 3);
        assert!(last["a"], "released and pinned again: indexed");
        assert!(!last["b"], "pinned and released: not indexed");
        assert!(!last["c"]);
    }

    #[tokio::test]
    async fn a_cluster_that_cannot_be_reached_is_named_without_its_password() {
        // A port nothing listens on: taken, then let go.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut cfg = crate::config::Config::default();
        cfg.store.kind = crate::config::StoreKind::Redis;
        cfg.store.cluster_nodes = vec![format!("redis://:hunter2-cluster-pw@127.0.0.1:{port}")];
        cfg.store.connect_timeout = Duration::from_millis(200);
        let e = format!(
            "{:#}",
            crate::store::open(&cfg)
                .await
                .err()
                .expect("no Redis there")
        );
        assert!(e.contains("cannot connect to Redis Cluster"), "{e}");
        assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_reload_after_an_outage_keeps_the_decisions_not_written_back_yet() {
        let pin = |node: &str| Pin {
            node: NodeId::parse(node).unwrap(),
            created_at: 5,
            confirmed_at: 5,
        };
        let ts0 = 1_000;
        let entry = |pin: Option<Pin>, ts| Cached { pin, ts };
        // A pin placed locally during the recovery, its write-back queued (or about to be).
        for queued in [true, false] {
            let local = entry(Some(pin("x")), 0);
            assert!(!loaded_pin_replaces(&local, queued, ts0));
            assert!(is_local_decision(&local, queued));
        }
        // A local release, queued: the room stays released until the write-back.
        let released = entry(None, 0);
        assert!(!loaded_pin_replaces(&released, true, ts0));
        assert!(is_local_decision(&released, true));
        // A room the cache never had (the reload's own placeholder) takes the store's pin.
        assert!(loaded_pin_replaces(&released, false, ts0));
        assert!(!is_local_decision(&released, false));
        // Redis's own changes: the older one is replaced, a newer one (a message that came
        // in during the reload) stays.
        assert!(loaded_pin_replaces(&entry(Some(pin("y")), 900), false, ts0));
        assert!(!loaded_pin_replaces(
            &entry(Some(pin("y")), 1_100),
            false,
            ts0
        ));
    }

    fn report(id: &str, load: f64) -> NodeUpdate {
        NodeUpdate::Report {
            id: id.into(),
            info: crate::cluster::sync::WireInfo {
                url: "http://127.0.0.1:1".into(),
                upstream: "http://127.0.0.1:1".into(),
                capacity: 100.0,
                region: None,
                tags: vec![],
            },
            load,
            cpu: None,
            state: crate::placement::AdminState::Active,
            at: 1,
            rooms: None,
            counts: None,
        }
    }

    fn reserved(id: &str, milli: i64) -> NodeUpdate {
        NodeUpdate::Reserved {
            id: id.into(),
            router: "r".into(),
            reserved_milli: milli,
            at: 1,
        }
    }

    #[test]
    fn queued_reports_and_reservations_are_superseded_by_the_newest_of_each_node() {
        let admin = NodeUpdate::Admin {
            id: "n1".into(),
            state: crate::placement::AdminState::Draining,
        };
        let removed = NodeUpdate::Removed {
            id: "n3".into(),
            at: 1,
            silent_since: None,
        };
        let mut batch = vec![
            report("n1", 1.0),
            reserved("n1", 1_000),
            admin.clone(),
            report("n1", 2.0),
            reserved("n2", 5_000),
            reserved("n1", 2_000),
            removed.clone(),
        ];
        supersede(&mut batch);
        assert_eq!(
            batch,
            vec![
                admin,
                report("n1", 2.0),
                reserved("n2", 5_000),
                reserved("n1", 2_000),
                removed
            ]
        );
    }

    #[test]
    fn a_kept_removal_is_dropped_when_the_node_reports_again_before_it_is_written() {
        let removed = |id: &str, at| NodeUpdate::Removed {
            id: id.into(),
            at,
            silent_since: None,
        };
        let report_at = |id: &str, when| {
            let mut r = report(id, 0.0);
            if let NodeUpdate::Report { at, .. } = &mut r {
                *at = when;
            }
            r
        };
        let admin = NodeUpdate::Admin {
            id: "n1".into(),
            state: crate::placement::AdminState::Draining,
        };
        let mut kept = HashMap::new();
        // Redis is down: n1 and n2 are removed (their earlier reports go), and reservations
        // are not kept.
        keep_unwritten(
            &mut kept,
            &[
                report_at("n1", 8_000),
                admin.clone(),
                removed("n1", 9_000),
                removed("n2", 9_000),
                reserved("n1", 1_000),
            ],
        );
        assert_eq!(kept.len(), 3);
        // n1 comes back and heartbeats to this router: its removal is old news, its admin
        // state is not, and its newest report is written back with it. A report from
        // before n2's removal leaves that one kept, and is not.
        keep_unwritten(&mut kept, &[report_at("n1", 9_500), report_at("n2", 9_000)]);
        keep_unwritten(&mut kept, &[report_at("n1", 9_700)]);
        let left: Vec<_> = kept.into_values().collect();
        assert_eq!(left.len(), 3, "{left:?}");
        assert!(left.contains(&admin));
        assert!(left.contains(&removed("n2", 9_000)));
        assert!(
            left.contains(&report_at("n1", 9_700)),
            "the newest report only"
        );
    }

    #[test]
    fn every_key_of_a_room_is_in_one_slot_and_rooms_spread() {
        let k = Keys::new("rr");
        assert_eq!(k.room("lobby"), "rr:room:{lobby}");
        assert_eq!(
            Slot::for_key(k.room("lobby")),
            Slot::for_key("other-prefix:room:{lobby}")
        );
        // Shared keys share the prefix's slot (node table and index).
        assert_eq!(Slot::for_key(&k.nodes), Slot::for_key(&k.admin));
        assert_eq!(Slot::for_key(&k.nodes), Slot::for_key(&k.rooms_index));
        // The forget script touches both learned keys.
        assert_eq!(Slot::for_key(&k.learned), Slot::for_key(&k.learned_seen));
        let slots: HashSet<_> = (0..200)
            .map(|i| format!("{:?}", Slot::for_key(k.room(&format!("room-{i}")))))
            .collect();
        assert!(
            slots.len() > 150,
            "rooms spread over slots: {}",
            slots.len()
        );
    }

    #[test]
    fn pin_values_round_trip() {
        let p = Pin {
            node: NodeId::parse("media-1").unwrap(),
            created_at: 1_700_000_000_000,
            confirmed_at: 1_700_000_000_500,
        };
        assert_eq!(decode(&encode(&p)), Some(p));
        assert_eq!(decode(""), None);
        assert_eq!(decode("bad node|1|2"), None);
    }
}

#[cfg(test)]
mod late_report_tests {
    use super::*;

    /// `WRITE_NODES`'s `late` op, against the Redis at `REDIS_URL` (which `.ci/run` sets):
    /// a report kept through an outage is stored only over an older one, so that it cannot
    /// take the place of a newer report another router stored since Redis returned.
    #[tokio::test]
    async fn a_late_report_is_stored_only_over_an_older_one() {
        let Ok(url) = std::env::var("REDIS_URL") else {
            assert!(
                std::env::var("ROOMROUTER_REQUIRE_REDIS").is_err(),
                "ROOMROUTER_REQUIRE_REDIS is set but REDIS_URL is not"
            );
            eprintln!("SKIPPED a_late_report_is_stored_only_over_an_older_one: no REDIS_URL");
            return;
        };
        let client = redis::Client::open(url).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let keys = Keys::new(&format!("rr-late-{}", rand::random::<u64>()));
        let script = Script::new(WRITE_NODES);
        let report_at = |at: Millis| {
            serde_json::json!({"kind": "report", "id": "n1", "at": at, "load": 0.0}).to_string()
        };
        let write = |op: &'static str, value: String| {
            let mut inv = script.prepare_invoke();
            inv.key(&keys.nodes)
                .key(&keys.admin)
                .key(&keys.registered)
                .arg(&keys.nodes_channel)
                .arg(op)
                .arg("n1")
                .arg(value)
                .arg("announcement");
            inv
        };
        let stored_at = |c: &mut redis::aio::MultiplexedConnection| {
            let key = keys.nodes.clone();
            let mut c = c.clone();
            async move {
                let v: String = redis::cmd("HGET")
                    .arg(key)
                    .arg("n1")
                    .query_async(&mut c)
                    .await
                    .unwrap();
                serde_json::from_str::<serde_json::Value>(&v).unwrap()["at"]
                    .as_u64()
                    .unwrap()
            }
        };
        let _: i64 = write("late", report_at(1_000))
            .invoke_async(&mut c)
            .await
            .unwrap();
        assert_eq!(stored_at(&mut c).await, 1_000, "over nothing");
        let _: i64 = write("set", report_at(2_000))
            .invoke_async(&mut c)
            .await
            .unwrap();
        let _: i64 = write("late", report_at(1_500))
            .invoke_async(&mut c)
            .await
            .unwrap();
        assert_eq!(stored_at(&mut c).await, 2_000, "a newer report stays");
        let _: i64 = write("late", report_at(3_000))
            .invoke_async(&mut c)
            .await
            .unwrap();
        assert_eq!(stored_at(&mut c).await, 3_000, "over an older one");
        // Over a registration (no report yet), as a report always goes.
        let put = serde_json::json!({"kind": "put", "id": "n1"}).to_string();
        let _: i64 = write("put", put).invoke_async(&mut c).await.unwrap();
        let _: i64 = write("late", report_at(500))
            .invoke_async(&mut c)
            .await
            .unwrap();
        assert_eq!(stored_at(&mut c).await, 500);
        let _: i64 = redis::cmd("DEL")
            .arg(&keys.nodes)
            .arg(&keys.registered)
            .query_async(&mut c)
            .await
            .unwrap();
    }
}
