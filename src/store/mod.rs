//! Where pins live: the record `room -> node` every router instance must agree on.
//!
//! [`PinStore`] is the seam between the router and its shared state. Every operation that
//! changes a pin is conditional (pin-if-expected, confirm-if-still-mine, release-if-still-mine)
//! so that routers sharing a store never split a room. The in-memory store is the embedded
//! default; a Redis store implements the same trait for several routers. The store never
//! sees HTTP and never decides placement.

pub mod memory;

use std::future::Future;

use serde::Serialize;

use crate::cluster::NodeId;
use crate::placement::Millis;
use crate::room::RoomKey;

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
    /// The store held something else (another router won); this is what it holds now.
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

/// The pin store. All methods are atomic per room.
pub trait PinStore: Send + Sync + 'static {
    /// The room's pin, if any.
    fn get(&self, room: &RoomKey) -> impl Future<Output = Result<Option<Pin>, StoreError>> + Send;

    /// Sets the pin to `node` if the current pin's node is `expected` (`None`: no pin).
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
    fn sweep_idle(
        &self,
        before: Millis,
    ) -> impl Future<Output = Result<Vec<(RoomKey, NodeId)>, StoreError>> + Send;

    /// Number of pins (may be approximate for shared stores).
    fn count(&self) -> impl Future<Output = Result<usize, StoreError>> + Send;

    /// Health for `/readyz` and metrics.
    fn health(&self) -> StoreHealth;
}
