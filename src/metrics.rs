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

/// Every outcome [`Metrics::decision`] counts: the `outcome` label of
/// `roomrouter_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    Pinned,
    Placed,
    PlacedOverflow,
    Replaced,
    NodeFull,
    NoCapacity,
    NotFound,
    StoreUnavailable,
}

impl Decided {
    pub const ALL: [Decided; 8] = [
        Decided::Pinned,
        Decided::Placed,
        Decided::PlacedOverflow,
        Decided::Replaced,
        Decided::NodeFull,
        Decided::NoCapacity,
        Decided::NotFound,
        Decided::StoreUnavailable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decided::Pinned => "pinned",
            Decided::Placed => "placed",
            Decided::PlacedOverflow => "placed_overflow",
            Decided::Replaced => "replaced",
            Decided::NodeFull => "node_full",
            Decided::NoCapacity => "no_capacity",
            Decided::NotFound => "not_found",
            Decided::StoreUnavailable => "store_unavailable",
        }
    }
}

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
    /// One counter per outcome, indexed by [`Decided`], created up front so the hot path
    /// never touches the family's lock: a decision is one relaxed atomic add.
    outcomes: [Counter; Decided::ALL.len()],
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
    pub learned_rooms: Gauge,
    pub store_degraded: Gauge,
    pub node_utilization: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    pub proxy: ProxyMetrics,
    /// Front-door requests and placement lookups the HTTP/1.1 fast path answered
    /// (`http::h1`).
    pub fast_requests: Counter,
    /// Connections the fast path handed to hyper (a request it does not carry).
    pub fast_handoffs: Counter,
}

/// What proxy mode counts (handles onto the router's registry, cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct ProxyMetrics {
    /// Requests a node refused or left unanswered: the failures passive health counts.
    pub upstream_failures: Counter,
    /// Nodes marked unhealthy by passive health.
    pub nodes_marked_unhealthy: Counter,
    /// WebSocket (upgraded) tunnels opened, and open now.
    pub tunnels: Counter,
    pub tunnels_open: Gauge,
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
        let learned_rooms = Gauge::default();
        registry.register(
            "learned_rooms",
            "Rooms whose size this router has learned (history kept for placement.history_ttl)",
            learned_rooms.clone(),
        );
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
        let proxy = ProxyMetrics::default();
        registry.register(
            "proxy_upstream_failures",
            "Proxied requests a node refused or did not answer in time (passive health)",
            proxy.upstream_failures.clone(),
        );
        registry.register(
            "proxy_nodes_marked_unhealthy",
            "Nodes marked unhealthy after proxy.failures_to_unhealthy failures in a row",
            proxy.nodes_marked_unhealthy.clone(),
        );
        registry.register(
            "proxy_tunnels",
            "Upgraded (WebSocket) connections tunnelled to a node",
            proxy.tunnels.clone(),
        );
        registry.register(
            "proxy_tunnels_open",
            "Upgraded (WebSocket) tunnels open now",
            proxy.tunnels_open.clone(),
        );
        let fast_requests = Counter::default();
        registry.register(
            "http_fast_path_requests",
            "Front-door requests and placement lookups answered by the HTTP/1.1 fast path",
            fast_requests.clone(),
        );
        let fast_handoffs = Counter::default();
        registry.register(
            "http_fast_path_handoffs",
            "Connections the fast path handed to hyper at a request it does not carry",
            fast_handoffs.clone(),
        );
        let outcomes = Decided::ALL.map(|d| {
            decisions
                .get_or_create(&Outcome {
                    outcome: d.as_str(),
                })
                .clone()
        });
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
            learned_rooms,
            store_degraded,
            node_utilization,
            proxy,
            fast_requests,
            fast_handoffs,
        }
    }

    /// Counts a decision.
    #[inline]
    pub fn decision(&self, outcome: Decided) {
        self.outcomes[outcome as usize].inc();
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
