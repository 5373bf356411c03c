//! Where pins live: the record `room -> node` every router instance must agree on.
//!
//! [`PinStore`] is the seam between the router and its shared state. Every operation that
//! changes a pin is conditional (pin-if-expected, confirm-if-still-mine, release-if-still-mine)
//! so that routers sharing a store never split a room. The in-memory store is the embedded
//! default; a Redis store implements the same trait for several routers, and also carries
//! their shared node state and keeps learned room sizes across restarts. The store never
//! sees HTTP and never decides placement.

pub mod learned_file;
pub mod memory;
pub mod redis;
mod sentinel;

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;

use crate::cluster::reservations::Learned;
use crate::cluster::sync::{NodeUpdate, Observed};
use crate::cluster::{Cluster, NodeId};
use crate::config::{Config, StoreKind};
use crate::placement::Millis;
use crate::room::RoomKey;

pub use self::redis::RedisStore;
pub use memory::MemoryStore;

/// A room's pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Pin {
    pub node: NodeId,
    /// When the pin was created (this placement).
    pub created_at: Millis,
    /// When a join or a node report last confirmed it.
    pub confirmed_at: Millis,
}

/// The result of a conditional pin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinOutcome {
    /// The store now holds our pin.
    Won(Pin),
    /// Not written: decide again from what the store holds now (see [`PinStore::pin_if`]).
    Lost(Option<Pin>),
}

/// One page of a listing.
#[derive(Debug, Clone, Default)]
pub struct Page {
    pub rooms: Vec<(RoomKey, Pin)>,
    /// Pass back to get the next page; `None` at the end.
    pub next_cursor: Option<String>,
}

/// The store could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("store unavailable: {0}")]
pub struct StoreError(pub String);

/// The store's health as `/readyz` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreHealth {
    Ok,
    /// Serving from a local cache; decisions are written back when the store returns.
    Degraded(String),
}

/// How [`PinStore::release_if_unconfirmed`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unconfirmed {
    /// The pin pointed at the node and had not been confirmed since: deleted.
    Released,
    /// The pin points at the node and was confirmed since (or the store cannot tell now): kept.
    Confirmed,
    /// No pin, or one to another node: nothing to release.
    NotThere,
}

/// The pin store. All methods are atomic per room.
pub trait PinStore: Send + Sync + 'static {
    /// The room's pin, if any.
    fn get(&self, room: &RoomKey) -> impl Future<Output = Result<Option<Pin>, StoreError>> + Send;

    /// The hot path's read: hands the room's pin (or `None`: no pin) to `f` without waiting
    /// and without copying it, if this process holds an authoritative view of the pins (the
    /// memory map; the Redis store's complete cache). `f` runs while the store holds the
    /// room's entry for reading, so it must not call back into the store. A store that would
    /// have to ask elsewhere returns `None`, and the caller falls back to [`PinStore::get`].
    fn peek<R>(&self, room: &RoomKey, f: impl FnOnce(Option<&Pin>) -> R) -> Option<R> {
        let _ = (room, f);
        None
    }

    /// Sets the pin to `node` if the current pin's node is `expected` (`None`: no pin).
    /// `Lost` with the pin held now means "decide again from this": another router won, or
    /// the store's mode changed under the call (an outage began, or a catching-up store
    /// caught up), so that `node`, chosen by the old mode's rule, is not written. The pin
    /// handed back may be `expected` itself.
    fn pin_if(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> impl Future<Output = Result<PinOutcome, StoreError>> + Send;

    /// Refreshes the pin's confirmation time if it still points at `node`.
    fn confirm(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the pin if it still points at `node` (compare-and-delete).
    fn release_if(
        &self,
        room: &RoomKey,
        node: &NodeId,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Deletes the pin if it still points at `node` and `keep()` says no, asking `keep` where
    /// no join can read the pin meanwhile (the memory store: under the room's entry lock,
    /// which the hot path holds while it records a pinned join), so that a join routed
    /// between the question and the delete is never left without its pin. `Confirmed`: kept
    /// because `keep` said so. Default: asks `keep`, then [`PinStore::release_if`] (a shared
    /// store decides on confirmations instead, [`PinStore::release_if_unconfirmed`]).
    fn release_unless(
        &self,
        room: &RoomKey,
        node: &NodeId,
        keep: impl FnOnce() -> bool + Send,
    ) -> impl Future<Output = Result<Unconfirmed, StoreError>> + Send {
        async move {
            if keep() {
                return Ok(Unconfirmed::Confirmed);
            }
            Ok(match self.release_if(room, node).await? {
                true => Unconfirmed::Released,
                false => Unconfirmed::NotThere,
            })
        }
    }

    /// Deletes the pin if it still points at `node` and was last confirmed before `before`,
    /// deciding atomically on the confirmation the store holds (a shared store's cache does
    /// not see other routers' confirmations).
    fn release_if_unconfirmed(
        &self,
        room: &RoomKey,
        node: &NodeId,
        before: Millis,
    ) -> impl Future<Output = Result<Unconfirmed, StoreError>> + Send;

    /// Deletes the pin whatever it points at (admin).
    fn remove(
        &self,
        room: &RoomKey,
    ) -> impl Future<Output = Result<Option<Pin>, StoreError>> + Send;

    /// Rooms in key order after `cursor`, at most `limit`.
    fn list(
        &self,
        cursor: Option<&str>,
        limit: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Releases pins not confirmed since `before`; returns the released rooms and their nodes.
    /// A pin confirmed later than `now` was confirmed before the wall clock stepped back: it
    /// counts as confirmed now, so that it goes idle on time and, in a shared store, its
    /// next confirmation is written (refreshing the store's expiry) on time too.
    fn sweep_idle(
        &self,
        before: Millis,
        now: Millis,
    ) -> impl Future<Output = Result<Vec<(RoomKey, NodeId)>, StoreError>> + Send;

    /// Number of pins (may be approximate for shared stores).
    fn count(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// The room's pin as the store itself holds it now, its confirmation included: a shared
    /// store asks Redis, whose copy other routers' confirmations reach without telling this
    /// router's cache (they are not published). For rare decisions only. Default: [`get`].
    ///
    /// [`get`]: PinStore::get
    fn get_stored(
        &self,
        room: &RoomKey,
    ) -> impl Future<Output = Result<Option<Pin>, StoreError>> + Send {
        self.get(room)
    }

    /// Whether the store's shared node table says `node` is alive: some router heard its
    /// report within the heartbeat timeout, and no admin disabled it. The router asks before
    /// it moves a room off a node it takes for gone: its own view may be the one behind (a
    /// silent subscription, a node table still loading), and moving a live meeting splits
    /// it. `None`: no shared view (one router), or the store did not answer (the router
    /// then decides on its own view, as during an outage). Default: `None`.
    fn node_alive_elsewhere(&self, _node: &NodeId) -> impl Future<Output = Option<bool>> + Send {
        async { None }
    }

    /// Whether any pin satisfies `f`. Every store holds all pins locally (the memory store
    /// its map, the Redis store its complete cache), so this waits on nothing; it visits
    /// every pin, so it serves rare decisions (removing a drained node), never a join.
    fn any_pin(&self, f: impl FnMut(&RoomKey, &Pin) -> bool) -> bool;

    /// Whether this router decides alone: a store other routers share that it cannot reach
    /// now, whose decisions it takes from its own cache and writes back later. New rooms
    /// are then placed by a rule every router applies alike (`placement::choose_alone`),
    /// and a node's report of a room pinned elsewhere is not a split to evict (which half
    /// the store keeps is decided at the write-back). Default: false.
    fn deciding_alone(&self) -> bool {
        false
    }

    /// Health for `/readyz` and metrics.
    fn health(&self) -> StoreHealth;

    /// Whether other routers may use this store too, so that joins this router did not route
    /// can be pending on its pins (the router then keeps an ended room's pin for a ticket's
    /// lifetime after its last confirmation, not only after its own last join, through
    /// [`PinStore::release_if_unconfirmed`]). Default: no.
    fn shared(&self) -> bool {
        false
    }

    /// Shared node state: the router calls this once, with its node table, when it is built.
    /// A shared store applies other routers' node updates to it. Default: nothing.
    fn attach(&self, _cluster: &Arc<Cluster>) {}

    /// Shared node state: the router calls this after a heartbeat or an admin action changed
    /// a node. A shared store writes it down and tells the other routers; it must not block
    /// (it queues). Default: nothing (one router).
    fn share_node(&self, _update: NodeUpdate) {}

    /// Learned room sizes: the router calls this when a room's session ended and taught it
    /// something. A shared store keeps it, so that a restarted router, or one started later,
    /// knows the room's size without waiting a week for its next session. Best effort: it
    /// must not block (it queues) and may drop it while the store is unreachable. Default:
    /// nothing. (The memory store keeps them in `store.learned_file` if one is set.)
    fn save_learned(&self, _room: &RoomKey, _learned: Learned) {}

    /// Forgets the learned sizes of rooms not reported since `before` (`history_ttl`), and
    /// brings times later than `now` back to `now`: stamped while the wall clock was ahead
    /// (it stepped back since), they would outlive `history_ttl` by the step. Called by the
    /// router's sweep; queues like [`PinStore::save_learned`].
    fn forget_learned(&self, _before: Millis, _now: Millis) {}

    /// Writes out what it keeps of learned sizes locally, now: called when the router stops,
    /// which cannot wait for the store to be dropped (a connection task the shutdown let go
    /// may still hold the app when the process exits). Default: nothing to write.
    fn flush_learned(&self) {}

    /// Learned sizes other routers saved since the last call (a shared store hears of
    /// them), for the router's sweep to take. Default: none.
    fn take_learned(&self) -> Vec<(RoomKey, Learned)> {
        Vec::new()
    }

    /// Participants that other routers' heartbeats reported since the last call (a shared
    /// store hears of them with the node reports), for this router to settle its own
    /// reservations with, as its own heartbeats do. Default: none.
    fn take_observed(&self) -> Vec<Observed> {
        Vec::new()
    }

    /// Every room's learned sizes the store keeps, for a router starting.
    fn load_learned(
        &self,
    ) -> impl Future<Output = Result<Vec<(RoomKey, Learned)>, StoreError>> + Send {
        async { Ok(Vec::new()) }
    }
}

/// The store chosen at run time: static dispatch by `match`, no boxing on the hot path.
pub enum AnyStore {
    Memory(MemoryStore),
    Redis(RedisStore),
}

/// Opens the store `[store]` asks for. For Redis this connects (within
/// `store.connect_timeout`), loads the pins into the local cache and starts the background
/// tasks (subscription, reconnection, node re-sync); they stop when the store is dropped.
pub async fn open(cfg: &Config) -> anyhow::Result<AnyStore> {
    Ok(match cfg.store.kind {
        StoreKind::Memory => AnyStore::Memory(match &cfg.store.learned_file {
            Some(path) => MemoryStore::with_learned_file(path, cfg.rooms.normalization)?,
            None => MemoryStore::new(),
        }),
        StoreKind::Redis => AnyStore::Redis(
            RedisStore::connect(
                &cfg.store,
                cfg.placement.room_idle_ttl,
                cfg.placement.heartbeat_timeout,
                !cfg.health.probe_interval.is_zero(),
            )
            .await?,
        ),
    })
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Memory($s) => $e,
            AnyStore::Redis($s) => $e,
        }
    };
}

impl PinStore for AnyStore {
    async fn get(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        delegate!(self, s => s.get(room).await)
    }
    async fn get_stored(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        delegate!(self, s => s.get_stored(room).await)
    }
    async fn node_alive_elsewhere(&self, node: &NodeId) -> Option<bool> {
        delegate!(self, s => s.node_alive_elsewhere(node).await)
    }
    fn any_pin(&self, f: impl FnMut(&RoomKey, &Pin) -> bool) -> bool {
        delegate!(self, s => s.any_pin(f))
    }
    async fn pin_if(
        &self,
        room: &RoomKey,
        node: &NodeId,
        expected: Option<&NodeId>,
        now: Millis,
    ) -> Result<PinOutcome, StoreError> {
        delegate!(self, s => s.pin_if(room, node, expected, now).await)
    }
    async fn confirm(
        &self,
        room: &RoomKey,
        node: &NodeId,
        now: Millis,
    ) -> Result<bool, StoreError> {
        delegate!(self, s => s.confirm(room, node, now).await)
    }
    async fn release_if(&self, room: &RoomKey, node: &NodeId) -> Result<bool, StoreError> {
        delegate!(self, s => s.release_if(room, node).await)
    }
    async fn release_unless(
        &self,
        room: &RoomKey,
        node: &NodeId,
        keep: impl FnOnce() -> bool + Send,
    ) -> Result<Unconfirmed, StoreError> {
        delegate!(self, s => s.release_unless(room, node, keep).await)
    }
    async fn release_if_unconfirmed(
        &self,
        room: &RoomKey,
        node: &NodeId,
        before: Millis,
    ) -> Result<Unconfirmed, StoreError> {
        delegate!(self, s => s.release_if_unconfirmed(room, node, before).await)
    }
    async fn remove(&self, room: &RoomKey) -> Result<Option<Pin>, StoreError> {
        delegate!(self, s => s.remove(room).await)
    }
    async fn list(&self, cursor: Option<&str>, limit: usize) -> Result<Page, StoreError> {
        delegate!(self, s => s.list(cursor, limit).await)
    }
    async fn sweep_idle(
        &self,
        before: Millis,
        now: Millis,
    ) -> Result<Vec<(RoomKey, NodeId)>, StoreError> {
        delegate!(self, s => s.sweep_idle(before, now).await)
    }
    async fn count(&self) -> Result<usize, StoreError> {
        delegate!(self, s => s.count().await)
    }
    #[inline]
    fn peek<R>(&self, room: &RoomKey, f: impl FnOnce(Option<&Pin>) -> R) -> Option<R> {
        delegate!(self, s => s.peek(room, f))
    }
    fn health(&self) -> StoreHealth {
        delegate!(self, s => s.health())
    }
    fn shared(&self) -> bool {
        delegate!(self, s => s.shared())
    }
    fn deciding_alone(&self) -> bool {
        delegate!(self, s => s.deciding_alone())
    }
    fn attach(&self, cluster: &Arc<Cluster>) {
        delegate!(self, s => s.attach(cluster))
    }
    fn share_node(&self, update: NodeUpdate) {
        delegate!(self, s => s.share_node(update))
    }
    fn save_learned(&self, room: &RoomKey, learned: Learned) {
        delegate!(self, s => s.save_learned(room, learned))
    }
    fn forget_learned(&self, before: Millis, now: Millis) {
        delegate!(self, s => s.forget_learned(before, now))
    }
    fn flush_learned(&self) {
        delegate!(self, s => s.flush_learned())
    }
    fn take_learned(&self) -> Vec<(RoomKey, Learned)> {
        delegate!(self, s => s.take_learned())
    }
    fn take_observed(&self) -> Vec<Observed> {
        delegate!(self, s => s.take_observed())
    }
    async fn load_learned(&self) -> Result<Vec<(RoomKey, Learned)>, StoreError> {
        delegate!(self, s => s.load_learned().await)
    }
}
