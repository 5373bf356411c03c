//! The load harness's results: a serializable [`LoadReport`] (the JSON file) and its
//! readable table, and the same for the constant-rate mode ([`RateReport`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::kthreads::KernelThreads;
use super::split::SplitRoom;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// Node utilization at one moment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UtilSample {
    pub t_s: f64,
    pub nodes: usize,
    /// Highest load / capacity over the live nodes.
    pub max: f64,
    /// Mean load / capacity over the live nodes.
    pub mean: f64,
    /// Participants on all live nodes.
    pub participants: u64,
}

/// Utilization over the run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UtilSummary {
    pub peak_max: f64,
    /// Highest max/mean over the samples whose mean is at least 5% (below that the ratio is
    /// noise from a handful of participants).
    pub peak_max_over_mean: f64,
    /// Average of max/mean over the same samples.
    pub avg_max_over_mean: f64,
    pub samples: Vec<UtilSample>,
}

impl UtilSummary {
    pub fn of(samples: Vec<UtilSample>) -> Option<UtilSummary> {
        if samples.is_empty() {
            return None;
        }
        let ratios: Vec<f64> = samples
            .iter()
            .filter(|s| s.mean >= 0.05)
            .map(|s| s.max / s.mean)
            .collect();
        Some(UtilSummary {
            peak_max: samples.iter().map(|s| s.max).fold(0.0, f64::max),
            peak_max_over_mean: ratios.iter().copied().fold(0.0, f64::max),
            avg_max_over_mean: if ratios.is_empty() {
                0.0
            } else {
                ratios.iter().sum::<f64>() / ratios.len() as f64
            },
            samples,
        })
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// What was driven: router URLs, and whether the harness started the cluster.
    pub target: String,
    pub settings: serde_json::Value,
    /// Joins in the schedule: `completed + not_sent + aborted_at_stop`.
    pub scheduled: u64,
    /// Decisions that got an HTTP answer or a transport failure (timeout, refused
    /// connection, ...).
    pub completed: u64,
    /// Of those, decisions that got an HTTP answer (any status): what the latency
    /// percentiles count.
    pub answered: u64,
    /// Decisions answered 2xx/3xx.
    pub ok: u64,
    /// Joins the hard stop (`duration + timeout + 1 s`) found not sent yet (no free
    /// connection until then). Also in `errors`.
    pub not_sent: u64,
    /// Joins sent but still unanswered at the hard stop (aborted). Also in `errors`.
    pub aborted_at_stop: u64,
    /// Joins that timed out (`--timeout`) without an answer. Also in `errors`.
    pub timed_out: u64,
    /// False when a join got no latency figure (`answered < scheduled`): it timed out
    /// (`timed_out`), failed without an answer (refused connection, transport, answer body
    /// failed or too large: in `errors`), or was dropped by the hard stop (`not_sent`,
    /// `aborted_at_stop`). Only answers are timed, and the joins without one include the
    /// slowest (a timeout, the hard stop's) or took an unknown time up to `--timeout`, so the
    /// latency percentiles then may understate the tail.
    pub latency_complete: bool,
    /// From the start of the run to the last HTTP answer to a decision (transport failures
    /// and timeouts, which end later without an answer, do not stretch it).
    pub elapsed_s: f64,
    /// Answered decisions (`answered`) per second of `elapsed_s`: refusals (a `503
    /// no_capacity` is quick to give) included.
    pub throughput_per_s: f64,
    /// Joins the nodes accepted (`ok`) per second of `elapsed_s`: the throughput that
    /// seated someone.
    pub ok_per_s: f64,
    /// Decision latency from the *scheduled* send time (open loop: no coordinated omission),
    /// of answered decisions only (transport failures are in `errors`, not here; refusals
    /// such as `503 no_capacity` are answers, and in it: a run with errors says so).
    pub latency_us: Percentiles,
    /// Decision latency from the actual send (service time), of answered decisions.
    pub service_us: Percentiles,
    /// Failed decisions by `status error_code`, by transport failure (`connect`,
    /// `timeout`, `transport`), or dropped by the hard stop (`not sent by the hard stop`,
    /// `no answer by the hard stop`).
    pub errors: BTreeMap<String, u64>,
    /// Joins the nodes accepted: redirects followed, and proxy-mode answers (a `2xx` with
    /// `X-Room-Node` and no `Location` is the node's own answer to the join).
    pub node_joins: u64,
    /// Participants that left through the node's leave endpoint.
    pub leaves: u64,
    /// Of those, proxy-mode leaves sent through the router (the harness did not know, or
    /// could not connect to, the node's URL).
    pub leaves_through_router: u64,
    /// Failed node joins and leaves by kind. `leave 404`: the node holds nobody of the
    /// room (the followed `--path` is no join on the node, say); the split detector drops
    /// that participant.
    pub node_errors: BTreeMap<String, u64>,
    pub rooms_seen: usize,
    /// Rooms whose participants were on two live nodes at once. Must be 0.
    pub split_rooms: u64,
    /// Rooms sent to another node while a participant whose leave failed (`leave ...` in
    /// `node_errors`) may still have been on the old one: not counted in `split_rooms`,
    /// since the node may have taken the leave and lost the answer (see `load::split`).
    pub possible_splits: u64,
    pub split_examples: Vec<SplitRoom>,
    /// Moves of rooms in use (a participant sent to another live node than the room's last
    /// while it still had participants elsewhere; a room that moves twice counts twice)
    /// from the node's addition to the next cluster event, or to the end; must be 0.
    pub rooms_moved_after_add: Option<u64>,
    /// Moves of rooms other than the killed node's from the kill to the next cluster event,
    /// or to the end; must be 0.
    pub rooms_moved_after_kill: Option<u64>,
    /// Rooms with participants on the killed node when it died.
    pub rooms_on_killed_node: Option<u64>,
    /// Of those, rooms that came back on another node during the run.
    pub rooms_failed_over: Option<u64>,
    pub utilization: Option<UtilSummary>,
    /// Cluster events during the run (`2.000s added media-4`).
    pub events: Vec<String>,
}

fn us(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} ms", v as f64 / 1000.0)
    } else {
        format!("{v} µs")
    }
}

impl LoadReport {
    /// The readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "roomrouter load: {}", self.target);
        let _ = writeln!(
            s,
            "  joins      scheduled {}  completed {}  answered {}  ok {}  in {:.2} s  = {:.0} answered/s, {:.0} ok/s",
            self.scheduled,
            self.completed,
            self.answered,
            self.ok,
            self.elapsed_s,
            self.throughput_per_s,
            self.ok_per_s
        );
        latency_header(&mut s);
        latency_row(&mut s, "from schedule (open)", &self.latency_us);
        latency_row(&mut s, "service (from send)", &self.service_us);
        if !self.latency_complete {
            let failed = self
                .completed
                .saturating_sub(self.answered)
                .saturating_sub(self.timed_out);
            let _ = writeln!(
                s,
                "  note       latency INCOMPLETE: {} joins have no figure ({} timed out, {failed} failed without an answer, {} not sent and {} unanswered at the hard stop), the run's most delayed among them: the percentiles above may understate the tail",
                self.scheduled.saturating_sub(self.answered),
                self.timed_out,
                self.not_sent,
                self.aborted_at_stop
            );
        }
        let errs = counts::<String>;
        let _ = writeln!(s, "  errors     {}", errs(&self.errors));
        let via = if self.leaves_through_router > 0 {
            format!(" ({} through the router)", self.leaves_through_router)
        } else {
            String::new()
        };
        let _ = writeln!(
            s,
            "  nodes      joins {}  leaves {}{via}  errors {}",
            self.node_joins,
            self.leaves,
            errs(&self.node_errors)
        );
        if let Some(n) = self.node_errors.get(super::engine::LEAVE_404) {
            let _ = writeln!(
                s,
                "  note       {n} leaves answered 404: the node held nobody of the room (is --path a join on the node?); the split detector dropped those participants"
            );
        }
        let _ = writeln!(
            s,
            "  rooms      seen {}  SPLIT {}{}",
            self.rooms_seen,
            self.split_rooms,
            if self.split_rooms == 0 {
                "  (ok)".to_string()
            } else {
                format!(
                    "  (e.g. {})",
                    self.split_examples
                        .iter()
                        .take(3)
                        .map(|r| format!("{} on {}", r.room, r.nodes.join("+")))
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        );
        if self.possible_splits > 0 {
            let _ = writeln!(
                s,
                "  note       {} rooms went to another node while a participant whose leave failed may still have been on the old one (possible splits, not counted above: check the nodes)",
                self.possible_splits
            );
        }
        if let Some(n) = self.rooms_moved_after_add {
            let _ = writeln!(s, "  scale-out  room moves after the node was added: {n}");
        }
        if let Some(n) = self.rooms_moved_after_kill {
            let _ = writeln!(
                s,
                "  failure    rooms on the killed node {}, failed over {}, moves of other rooms {n}",
                self.rooms_on_killed_node.unwrap_or(0),
                self.rooms_failed_over.unwrap_or(0)
            );
        }
        if let Some(u) = &self.utilization {
            let _ = writeln!(
                s,
                "  utilization peak max {:.2}  max/mean: peak {:.2}, average {:.2}  ({} samples)",
                u.peak_max,
                u.peak_max_over_mean,
                u.avg_max_over_mean,
                u.samples.len()
            );
        }
        for e in &self.events {
            let _ = writeln!(s, "  event      {e}");
        }
        s
    }
}

/// What one constant-rate run measured (`roomrouter load --constant-rate`).
#[derive(Debug, Clone, Serialize)]
pub struct RateReport {
    /// The target URLs.
    pub target: String,
    pub settings: serde_json::Value,
    /// Requests per second asked for.
    pub target_rate: f64,
    pub connections: usize,
    /// Requests in the plan: `floor(rate x (warmup + duration))`.
    pub planned: u64,
    /// Requests that left (the rest were not sent by the hard stop).
    pub sent: u64,
    /// Of `sent`, those of the warm-up (`--warmup`): answered and counted by status, but in
    /// no latency figure and not in `late_sends`.
    pub warmup_sent: u64,
    /// Requests that got an HTTP answer (any status).
    pub answered: u64,
    /// Answers with a 2xx or 3xx status.
    pub ok: u64,
    /// From the planned start to the last answer.
    pub elapsed_s: f64,
    /// Answers per second of `elapsed_s`.
    pub achieved_per_s: f64,
    /// Sends that left more than 1 ms after their planned time (the client fell behind,
    /// or a connection waited for a slow answer).
    pub late_sends: u64,
    /// What paced the sends: `spin` (`--pacing spin`: at most about 10 µs after the plan,
    /// the load tool never sleeps), `wheel` (`--pacing wheel`, Linux: at most about 100 µs
    /// after) or `tokio` (1 ms timer: up to 1 ms early); `mixed` if the wheel's timer
    /// failed during the run. See `load::pace`.
    pub pacing: String,
    /// CPU the load tool itself used during the run, in cores (1.0: one core busy the whole
    /// time; Linux only). Near the cores it has, the load tool is its own bottleneck: its
    /// late sends, and the latency from plan they add, are its own, not the server's. A
    /// spin-paced run reads at least 1.0 by design; its late sends tell instead.
    pub load_tool_cores: Option<f64>,
    /// How long the kernel's own threads ran over the run, and which ran longest (Linux,
    /// where `/proc` shows them): time they took from whatever ran on their cores, the
    /// server's and the load tool's included. See `load::kthreads`.
    pub kernel_threads: Option<KernelThreads>,
    /// Connections opened during the run (after a close, timeout or failure).
    pub reconnects: u64,
    /// Requests sent a second time, on a new connection, because the server closed the kept
    /// connection they went out on without answering (its keep-alive timeout racing the
    /// send). Each is also one of `reconnects`; a second failure is counted in `errors`.
    pub retried: u64,
    /// Latency of answered requests from the *planned* send time (no coordinated omission).
    pub latency_us: Percentiles,
    /// Latency of answered requests from the actual send (what a closed loop would report).
    pub service_us: Percentiles,
    /// Answers by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests without an answer, by kind (`timeout`, `connect`, `closed`, `reset`,
    /// `transport`, `not sent by the hard stop`).
    pub errors: BTreeMap<String, u64>,
    /// False when a measured request (one after the warm-up) got no latency figure: it timed
    /// out, failed without an answer (`connect`, `closed`, `reset`, `transport`), was not
    /// sent by the hard stop, or went with an aborted connection task. Only answers are
    /// timed, and the requests without one include the slowest (a timeout, the hard stop's)
    /// or took an unknown time up to `--timeout`, so the percentiles then may understate the
    /// tail.
    pub latency_complete: bool,
}

fn latency_header(s: &mut String) {
    let _ = writeln!(
        s,
        "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
}

fn latency_row(s: &mut String, name: &str, p: &Percentiles) {
    let _ = writeln!(
        s,
        "  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        name,
        us(p.p50),
        us(p.p90),
        us(p.p99),
        us(p.p999),
        us(p.max),
        us(p.mean.round() as u64)
    );
}

fn counts<K: std::fmt::Display>(m: &BTreeMap<K, u64>) -> String {
    if m.is_empty() {
        "none".to_string()
    } else {
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl RateReport {
    /// The readable table.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "roomrouter load --constant-rate: {}", self.target);
        let _ = writeln!(
            s,
            "  requests   planned {}  sent {}  answered {}  ok {}  in {:.2} s",
            self.planned, self.sent, self.answered, self.ok, self.elapsed_s
        );
        if self.warmup_sent > 0 {
            let _ = writeln!(
                s,
                "  warm-up    the first {} sent are not measured (--warmup)",
                self.warmup_sent
            );
        }
        let _ = writeln!(
            s,
            "  rate       target {:.0}/s  achieved {:.0}/s  over {} connections  late sends (>1 ms) {}  reconnects {} (retried sends {})  paced by {}",
            self.target_rate, self.achieved_per_s, self.connections, self.late_sends, self.reconnects, self.retried, self.pacing
        );
        if let Some(c) = self.load_tool_cores {
            let _ = writeln!(
                s,
                "  load tool  {c:.2} cores busy (its own CPU over the run)"
            );
        }
        if let Some(k) = &self.kernel_threads {
            let _ = writeln!(
                s,
                "  kernel     its threads ran {:.1} ms in all ({} seen; longest {} {:.1} ms): time taken from whatever ran on their cores",
                k.run_ms, k.threads, k.busiest, k.busiest_ms
            );
            if let Some(note) = k.note() {
                let _ = writeln!(s, "  note       {note}");
            }
        }
        let measured = self.sent - self.warmup_sent;
        if self.late_sends * 100 > measured {
            let _ = writeln!(
                s,
                "  note       {:.1}% of sends left more than 1 ms late: latency from plan includes the load tool's own delay (short of CPU, or Tokio's timer firing late: try --pacing wheel, or spin with a core to spare) or a slow connection's",
                self.late_sends as f64 * 100.0 / measured as f64
            );
        }
        latency_header(&mut s);
        latency_row(&mut s, "from plan (constant)", &self.latency_us);
        latency_row(&mut s, "service (from send)", &self.service_us);
        if !self.latency_complete {
            let _ = writeln!(
                s,
                "  note       latency INCOMPLETE: measured requests that timed out, failed without an answer or were not sent by the hard stop (errors below) have no figure, the run's slowest among them: the percentiles above may understate the tail"
            );
        }
        let _ = writeln!(s, "  statuses   {}", counts(&self.statuses));
        let _ = writeln!(s, "  errors     {}", counts(&self.errors));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_utilization_summaries() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for v in 1..=1000u64 {
            h.record(v).unwrap();
        }
        let p = Percentiles::of(&h);
        assert_eq!(p.count, 1000);
        assert!((499..=501).contains(&p.p50), "{p:?}");
        assert!((989..=991).contains(&p.p99), "{p:?}");
        assert_eq!(p.max, 1000);
        assert_eq!(Percentiles::of(&Histogram::new(3).unwrap()).count, 0);

        let sample = |max, mean| UtilSample {
            t_s: 0.0,
            nodes: 3,
            max,
            mean,
            participants: 0,
        };
        let u =
            UtilSummary::of(vec![sample(0.02, 0.01), sample(0.6, 0.5), sample(0.8, 0.5)]).unwrap();
        assert_eq!(u.peak_max, 0.8);
        assert!((u.peak_max_over_mean - 1.6).abs() < 1e-9);
        assert!((u.avg_max_over_mean - 1.4).abs() < 1e-9);
        assert!(UtilSummary::of(vec![]).is_none());
    }
}
