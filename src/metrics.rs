//! Prometheus metrics: one registry owned by the router (no process globals), rendered in the
//! text exposition format by `GET /metrics`. Gauges that describe current state (nodes, pins)
//! are filled in at scrape time from the registry and the store.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Every outcome [`Metrics::decision`] counts.
pub const DECISION_OUTCOMES: [&str; 8] = [
    "pinned",
    "placed",
    "placed_overflow",
    "replaced",
    "node_full",
    "no_capacity",
    "not_found",
    "store_unavailable",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub code: &'static str,
}

/// Every metric the router exports.
pub struct Metrics {
    registry: Registry,
    /// One counter per outcome, created up front so the hot path never touches the family's
    /// lock: a decision is one relaxed atomic add.
    outcomes: Vec<(&'static str, Counter)>,
    /// Joins and lookups by outcome: pinned, placed, replaced, node_full, no_capacity, ...
    pub decisions: Family<Outcome, Counter>,
    pub heartbeats: Counter,
    /// Rooms a node reported while pinned elsewhere (a split, ended through `evict`).
    pub splits_detected: Counter,
    pub pins_released: Family<Outcome, Counter>,
    /// HTTP errors by stable code.
    pub errors: Family<StatusLabels, Counter>,
    pub nodes_healthy: Gauge,
    pub nodes_total: Gauge,
    pub pins: Gauge,
    pub store_degraded: Gauge,
    pub node_utilization: Family<NodeLabels, Gauge<f64, AtomicU64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("roomrouter");
        let decisions = Family::<Outcome, Counter>::default();
        registry.register(
            "decisions",
            "Join and lookup decisions by outcome",
            decisions.clone(),
        );
        let heartbeats = Counter::default();
        registry.register("heartbeats", "Heartbeats accepted", heartbeats.clone());
        let splits_detected = Counter::default();
        registry.register(
            "splits_detected",
            "Rooms reported by a node while pinned to another (evicted)",
            splits_detected.clone(),
        );
        let pins_released = Family::<Outcome, Counter>::default();
        registry.register(
            "pins_released",
            "Pins released, by reason",
            pins_released.clone(),
        );
        let errors = Family::<StatusLabels, Counter>::default();
        registry.register(
            "http_errors",
            "Error responses by stable code",
            errors.clone(),
        );
        let nodes_healthy = Gauge::default();
        registry.register(
            "nodes_healthy",
            "Nodes with a recent heartbeat",
            nodes_healthy.clone(),
        );
        let nodes_total = Gauge::default();
        registry.register("nodes", "Nodes known", nodes_total.clone());
        let pins = Gauge::default();
        registry.register("pins", "Rooms pinned", pins.clone());
        let store_degraded = Gauge::default();
        registry.register(
            "store_degraded",
            "1 while the store is unreachable",
            store_degraded.clone(),
        );
        let node_utilization = Family::<NodeLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "node_utilization",
            "Estimated utilization (reported + pending + reserved) / capacity",
            node_utilization.clone(),
        );
        let outcomes = DECISION_OUTCOMES
            .iter()
            .map(|o| (*o, decisions.get_or_create(&Outcome { outcome: o }).clone()))
            .collect();
        Metrics {
            registry,
            outcomes,
            decisions,
            heartbeats,
            splits_detected,
            pins_released,
            errors,
            nodes_healthy,
            nodes_total,
            pins,
            store_degraded,
            node_utilization,
        }
    }

    /// Counts a decision; `outcome` is one of [`DECISION_OUTCOMES`].
    #[inline]
    pub fn decision(&self, outcome: &'static str) {
        // Pointer comparison first: callers pass the same &'static str literals.
        match self
            .outcomes
            .iter()
            .find(|(o, _)| std::ptr::eq(*o, outcome) || *o == outcome)
        {
            Some((_, c)) => {
                c.inc();
            }
            None => {
                self.decisions.get_or_create(&Outcome { outcome }).inc();
            }
        }
    }

    pub fn released(&self, outcome: &'static str) {
        self.pins_released.get_or_create(&Outcome { outcome }).inc();
    }

    pub fn error(&self, code: &'static str) {
        self.errors.get_or_create(&StatusLabels { code }).inc();
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
