//! Prometheus metrics: one registry owned by the router (no process globals), rendered in the
//! text exposition format by `GET /metrics`. Gauges that describe current state (nodes, pins)
//! are filled in at scrape time from the registry and the store.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Metric, Registry, Unit};

/// Every outcome [`Metrics::decision`] counts: the `outcome` label of
/// `roomrouter_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decided {
    Pinned,
    /// Another request of a session a join already admitted (proxy mode: a page's assets,
    /// polls), sent to its room's node: not a join, and not counted as one.
    InSession,
    Placed,
    PlacedOverflow,
    Replaced,
    NodeFull,
    NoCapacity,
    NotFound,
    Starting,
    StoreUnavailable,
}

impl Decided {
    pub const ALL: [Decided; 10] = [
        Decided::Pinned,
        Decided::InSession,
        Decided::Placed,
        Decided::PlacedOverflow,
        Decided::Replaced,
        Decided::NodeFull,
        Decided::NoCapacity,
        Decided::NotFound,
        Decided::Starting,
        Decided::StoreUnavailable,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decided::Pinned => "pinned",
            Decided::InSession => "in_session",
            Decided::Placed => "placed",
            Decided::PlacedOverflow => "placed_overflow",
            Decided::Replaced => "replaced",
            Decided::NodeFull => "node_full",
            Decided::NoCapacity => "no_capacity",
            Decided::NotFound => "not_found",
            Decided::Starting => "starting",
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
    /// One scrape at a time fills the gauges set at render time and encodes them: two at
    /// once would each clear the other's per-node series ([`Metrics::render_with`]).
    scrape: std::sync::Mutex<()>,
    /// One counter per outcome, indexed by [`Decided`], created up front so the hot path
    /// never touches the family's lock: a decision is one relaxed atomic add.
    outcomes: [Counter; Decided::ALL.len()],
    /// Joins and lookups by outcome: pinned, placed, replaced, node_full, no_capacity, ...
    pub decisions: Family<Outcome, Counter>,
    pub heartbeats: Counter,
    /// Rooms a node reported while pinned elsewhere (a split, ended through `evict`).
    pub splits_detected: Counter,
    /// Rooms not moved off a node this router took for gone, because the shared store said
    /// another router still hears it.
    pub moves_held: Counter,
    /// Room entries of heartbeats that were not valid room ids (skipped; the heartbeat
    /// applied without them).
    pub heartbeat_rooms_refused: Counter,
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
    /// How long decisions that took the general path (not decided from a holding pin) took.
    pub slow_decisions: Latency,
    /// Proxy mode: how long each node took to answer, per node (filled at render time).
    pub upstream_response: NodeLatencies,
    /// How long applying a node's heartbeat took.
    pub heartbeat_time: Latency,
    /// Active health checks (`health.probe_interval`): probes that failed, and nodes they
    /// marked unhealthy.
    pub probe_failures: Counter,
    pub probe_marked_unhealthy: Counter,
    pub probes_short: Counter,
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

/// A new metric of type `M`, registered under `name` with `help`; the handle to keep.
fn registered<M: Metric + Clone + Default>(registry: &mut Registry, name: &str, help: &str) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("roomrouter");
        let decisions: Family<Outcome, Counter> = registered(
            &mut registry,
            "decisions",
            "Join and lookup decisions by outcome",
        );
        let heartbeats: Counter = registered(&mut registry, "heartbeats", "Heartbeats accepted");
        let splits_detected: Counter = registered(
            &mut registry,
            "splits_detected",
            "Rooms reported by a node while pinned to another (evicted)",
        );
        let moves_held: Counter = registered(
            &mut registry,
            "moves_held",
            "Joins whose room stayed on a node this router took for gone, because the shared \
             store said another router still hears it",
        );
        let heartbeat_rooms_refused: Counter = registered(
            &mut registry,
            "heartbeat_rooms_refused",
            "Rooms listed in node heartbeats that are not valid room ids (a '/', a control \
             character, over 256 bytes): skipped, the rest of the heartbeat applied",
        );
        let pins_released: Family<Outcome, Counter> =
            registered(&mut registry, "pins_released", "Pins released, by reason");
        let errors: Family<StatusLabels, Counter> = registered(
            &mut registry,
            "http_errors",
            "Error responses by stable code",
        );
        let nodes_healthy: Gauge = registered(
            &mut registry,
            "nodes_healthy",
            "Nodes with a recent heartbeat",
        );
        let nodes_total: Gauge = registered(&mut registry, "nodes", "Nodes known");
        let pins: Gauge = registered(&mut registry, "pins", "Rooms pinned");
        let learned_rooms: Gauge = registered(
            &mut registry,
            "learned_rooms",
            "Rooms whose size this router has learned (history kept for placement.history_ttl)",
        );
        let store_degraded: Gauge = registered(
            &mut registry,
            "store_degraded",
            "1 while the store is unreachable, or answers but this router has not caught up with it",
        );
        let node_utilization: Family<NodeLabels, Gauge<f64, AtomicU64>> = registered(
            &mut registry,
            "node_utilization",
            "Estimated utilization (reported + pending + reserved) / capacity",
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
        let fast_requests: Counter = registered(
            &mut registry,
            "http_fast_path_requests",
            "Front-door requests and placement lookups answered by the HTTP/1.1 fast path",
        );
        let fast_handoffs: Counter = registered(
            &mut registry,
            "http_fast_path_handoffs",
            "Connections the fast path handed to hyper at a request it does not carry",
        );
        let slow_decisions = Latency::default();
        registry.register_with_unit(
            "decision_slow_path",
            "Time to decide joins and lookups that a holding pin could not decide alone: a new \
             room, a re-placement, a pin due for confirmation, any store round trip. A room \
             whose pin holds is decided from it in well under a microsecond and is not timed",
            Unit::Seconds,
            slow_decisions.clone(),
        );
        let heartbeat_time = Latency::default();
        registry.register_with_unit(
            "heartbeat",
            "Time to apply a node's heartbeat: recording its load, reconciling the rooms it \
             lists with the pins (store round trips), the reply",
            Unit::Seconds,
            heartbeat_time.clone(),
        );
        let probe_failures: Counter = registered(
            &mut registry,
            "health_probe_failures",
            "Active health probes (health.probe_interval) a node refused or left unanswered",
        );
        let probe_marked_unhealthy: Counter = registered(
            &mut registry,
            "health_probe_nodes_marked_unhealthy",
            "Nodes marked unhealthy after health.failures failed probes in a row",
        );
        let probes_short: Counter = registered(
            &mut registry,
            "health_probes_short",
            "Active health probes the router could not make for want of its own resources \
             (file descriptors, local ports, memory); held against no node",
        );
        let upstream_response = NodeLatencies::default();
        registry.register_collector(Box::new(NodeLatencyFamily {
            name: "proxy_upstream_response",
            help: "Proxy mode: time from taking (or opening) a connection to a node until its \
                   response head arrived, per node; requests the node failed are not timed \
                   (roomrouter_proxy_upstream_failures_total counts them).",
            readings: upstream_response.clone(),
        }));
        let outcomes = Decided::ALL.map(|d| {
            decisions
                .get_or_create(&Outcome {
                    outcome: d.as_str(),
                })
                .clone()
        });
        Metrics {
            registry,
            scrape: std::sync::Mutex::new(()),
            outcomes,
            decisions,
            heartbeats,
            splits_detected,
            moves_held,
            heartbeat_rooms_refused,
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
            slow_decisions,
            upstream_response,
            heartbeat_time,
            probe_failures,
            probe_marked_unhealthy,
            probes_short,
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

    /// The text exposition, after `fill` has set the gauges that are read at render time:
    /// no other scrape runs between the two.
    pub fn render_with(&self, fill: impl FnOnce(&Metrics)) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        fill(self);
        self.render()
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Upper bounds of [`Latency`]'s buckets, in nanoseconds: 10 µs to 1 s, then +Inf.
const LATENCY_BOUNDS_NS: [u64; 16] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Latency counts that any thread records into with relaxed atomic adds: no lock, so
/// recording never waits on a scrape or on another thread. `prometheus_client`'s own
/// histogram takes a write lock per observation, which the request path must not. A scrape
/// reads the counters one by one; it may see an observation in a bucket and not yet in the
/// sum, never a count that disagrees with the buckets (the count is their sum).
#[derive(Debug, Default)]
pub struct LatencyCounts {
    /// Observations per bucket (not cumulative); the last one is +Inf.
    buckets: [AtomicU64; LATENCY_BOUNDS_NS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyCounts {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = LATENCY_BOUNDS_NS.partition_point(|&b| b < ns);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// What has been recorded so far.
    pub fn read(&self) -> LatencyReading {
        LatencyReading {
            buckets: std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed)),
            sum_ns: self.sum_ns.load(Ordering::Relaxed),
        }
    }
}

/// A copy of [`LatencyCounts`] taken for a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LatencyReading {
    pub buckets: [u64; LATENCY_BOUNDS_NS.len() + 1],
    pub sum_ns: u64,
}

impl LatencyReading {
    /// Observations in all.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    /// Encodes the reading as one histogram sample set.
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // (upper bound in seconds, observations in that bucket alone); the last bound is
        // `f64::MAX`, which the encoder writes as `+Inf`.
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_NS
            .iter()
            .map(|&b| b as f64 / 1e9)
            .chain(std::iter::once(f64::MAX))
            .zip(self.buckets)
            .collect();
        let sum = self.sum_ns as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, self.count(), &buckets, None)
    }
}

/// An unlabelled latency histogram for the registry.
#[derive(Debug, Clone, Default)]
pub struct Latency(std::sync::Arc<LatencyCounts>);

impl Latency {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, d: Duration) {
        self.0.observe(d)
    }
}

impl TypedMetric for Latency {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Latency {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        self.0.read().encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// A latency histogram per node, labelled `node`: the router fills it from each node's
/// [`LatencyCounts`] when it renders the metrics (`set`), so that nodes that left the
/// cluster leave the exposition with it.
#[derive(Debug, Clone, Default)]
pub struct NodeLatencies(std::sync::Arc<std::sync::Mutex<Vec<(NodeLabels, LatencyReading)>>>);

impl NodeLatencies {
    /// Replaces the readings (one per node).
    pub fn set(&self, readings: Vec<(NodeLabels, LatencyReading)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = readings;
    }
}

/// The descriptor of a labelled histogram family that [`NodeLatencies`] encodes.
#[derive(Debug)]
struct NodeLatencyFamily {
    name: &'static str,
    help: &'static str,
    readings: NodeLatencies,
}

impl Collector for NodeLatencyFamily {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let readings = self.readings.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut family =
            encoder.encode_descriptor(self.name, self.help, Some(&Unit::Seconds), Latency::TYPE)?;
        for (labels, reading) in readings.iter() {
            reading.encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_cumulative_in_the_exposition_and_count_every_observation() {
        let m = Metrics::new();
        m.slow_decisions.observe(Duration::from_micros(7));
        m.slow_decisions.observe(Duration::from_micros(10));
        m.slow_decisions.observe(Duration::from_micros(300));
        m.slow_decisions.observe(Duration::from_secs(3));
        let text = m.render();
        for line in [
            "roomrouter_decision_slow_path_seconds_bucket{le=\"0.00001\"} 2",
            "roomrouter_decision_slow_path_seconds_bucket{le=\"0.00025\"} 2",
            "roomrouter_decision_slow_path_seconds_bucket{le=\"0.0005\"} 3",
            "roomrouter_decision_slow_path_seconds_bucket{le=\"1.0\"} 3",
            "roomrouter_decision_slow_path_seconds_bucket{le=\"+Inf\"} 4",
            "roomrouter_decision_slow_path_seconds_count 4",
            "roomrouter_decision_slow_path_seconds_sum 3.000317",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(text.contains("# TYPE roomrouter_decision_slow_path_seconds histogram"));
    }
}
