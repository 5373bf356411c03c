//! Workloads: who joins which room when, generated from a seed or read from a trace.
//!
//! A [`Workload`] is plain data (room sessions, each with its participants' stays, plus the
//! burst windows and the scale-out / failure times), so the very same workload is replayed
//! through every policy. The three standard workloads of the simulator issue live here:
//! steady small rooms, steady heavy-tailed rooms and the school day (also on a cluster sized
//! with the headroom operators plan for), each with size hints absent, noisy or exact.
//! [`Workload::peak_demand`] is the busiest moment of a workload, the lower bound of every
//! policy's peak. Hints come from their own random stream, so the three hint modes
//! of a workload have identical sessions.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp, Zipf};
use serde::{Deserialize, Serialize};

use crate::placement::Millis;

pub const SECOND: Millis = 1_000;
pub const MINUTE: Millis = 60 * SECOND;
pub const HOUR: Millis = 60 * MINUTE;

/// One participant's presence in a room: joins at `join`, leaves at `leave` (> `join`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stay {
    pub join: Millis,
    pub leave: Millis,
}

/// One session of a room: from its first join until it is empty again. Recurring rooms have
/// several sessions with the same `room` key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// The room key (what the real router hashes).
    pub room: String,
    /// The size hint a join carries, if any.
    pub hint: Option<u32>,
    /// Participants, in any order.
    pub stays: Vec<Stay>,
}

impl Session {
    /// Time of the first join.
    pub fn start(&self) -> Millis {
        self.stays.iter().map(|s| s.join).min().unwrap_or(0)
    }
}

/// A complete workload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Workload {
    pub name: String,
    pub sessions: Vec<Session>,
    /// Windows in which many rooms start together; sessions starting in one form a burst.
    pub bursts: Vec<(Millis, Millis)>,
    /// Balance figures (utilization, refusals, herding) are measured before this time.
    pub measure_until: Millis,
    /// When a node is added (scale-out), if ever.
    pub scale_out_at: Option<Millis>,
    /// When node 0 fails (stops for good), if ever.
    pub fail_at: Option<Millis>,
    /// The simulation stops here.
    pub end: Millis,
    /// Room sizes the routers learned before the run, as `RoomHistory` learns them from node
    /// reports: `(room, peak participants of one earlier session)`, oldest first. A school's
    /// classes meet every week and the router keeps history for 8 days
    /// (`placement.history_ttl`), so on any day but its very first it knows the first
    /// lesson's classes too. Empty for rooms that do not recur and for traces.
    #[serde(default)]
    pub learned: Vec<(String, u32)>,
}

impl Workload {
    /// The busiest moment of the measured part: the most participants present at once and
    /// when, sampled as the simulator samples (the state after every join and leave at or
    /// before each multiple of `sample_ms`, before `measure_until`). It depends on the
    /// workload alone: whatever a policy does, the total load on the nodes at that moment
    /// is this (less any joins no node could take), so the busiest node is at least this
    /// divided by the total capacity. Every policy's peak is bounded below by it.
    pub fn peak_demand(&self, sample_ms: Millis) -> (u32, Millis) {
        let mut joins: Vec<Millis> = self.all_stays().map(|s| s.join).collect();
        let mut leaves: Vec<Millis> = self.all_stays().map(|s| s.leave).collect();
        joins.sort_unstable();
        leaves.sort_unstable();
        let (mut j, mut l) = (0, 0);
        let mut best = (0u32, 0);
        let step = sample_ms.max(1);
        let mut t = 0;
        while t < self.measure_until {
            while j < joins.len() && joins[j] <= t {
                j += 1;
            }
            while l < leaves.len() && leaves[l] <= t {
                l += 1;
            }
            // A stay that has left has joined: j >= l.
            let present = (j - l) as u32;
            if present > best.0 {
                best = (present, t);
            }
            t += step;
        }
        best
    }

    fn all_stays(&self) -> impl Iterator<Item = &Stay> {
        self.sessions.iter().flat_map(|s| &s.stays)
    }
}

/// The independent random streams of a run, each seeded from the run's seed by
/// [`Stream::seed`]: a constant per stream mixed in through SplitMix64, so no two streams of
/// one seed are the same. (XOR-ing a constant into the seed made the small-rooms generator,
/// `seed ^ 0`, and router 0's two-choice draws, `seed ^ 0 * k`, one stream.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// A steady workload's rooms and stays.
    Steady(StandardWorkload),
    /// The school day's rooms, classes and lessons (both school days).
    SchoolDay,
    /// The school day's earlier lessons, whose peaks the routers learned.
    EarlierLessons,
    /// Size hints (noisy ones' noise).
    Hints,
    /// Router `r`'s own random choices (LiveKit's two-choice).
    Router(usize),
    /// When the failed node's participants come back.
    Reconnect,
}

impl Stream {
    /// A constant per stream, no two alike.
    fn tag(self) -> u64 {
        match self {
            Stream::Steady(kind) => 0x100 + kind as u64,
            Stream::SchoolDay => 0x200,
            Stream::EarlierLessons => 0x201,
            Stream::Hints => 0x202,
            Stream::Reconnect => 0x203,
            Stream::Router(r) => (1 << 32) + r as u64,
        }
    }

    /// This stream's seed under the run's `seed`: distinct for distinct streams (SplitMix64's
    /// finalizer is a bijection, applied to the seed XOR a bijective image of the tag).
    pub fn seed(self, seed: u64) -> u64 {
        splitmix64(seed ^ splitmix64(self.tag()))
    }

    /// A generator of this stream under the run's `seed`.
    pub fn rng(self, seed: u64) -> StdRng {
        StdRng::seed_from_u64(self.seed(seed))
    }
}

/// SplitMix64's output function (Steele, Lea and Flood), a bijection on `u64`.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Which of the standard workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum StandardWorkload {
    /// (a) steady state, rooms of 2-6 participants.
    SmallRooms,
    /// (b) steady state, Zipf-like room sizes up to 30% of a node.
    HeavyTailed,
    /// (c) hundreds of rooms starting within a minute every hour, growing over minutes.
    SchoolDay,
    /// (c') the school day on a cluster sized as operators size one: fewer lesson rooms per
    /// node, so that the cluster's mean at its busiest moment is about 58% (the standard
    /// school day runs it at about 73%; means over seeds 1-8).
    SchoolDaySized,
}

impl StandardWorkload {
    pub const ALL: [StandardWorkload; 4] = [
        StandardWorkload::SmallRooms,
        StandardWorkload::HeavyTailed,
        StandardWorkload::SchoolDay,
        StandardWorkload::SchoolDaySized,
    ];

    /// The school days, for the checks that concern them.
    pub const SCHOOL_DAYS: [StandardWorkload; 2] = [
        StandardWorkload::SchoolDay,
        StandardWorkload::SchoolDaySized,
    ];

    pub fn name(self) -> &'static str {
        match self {
            StandardWorkload::SmallRooms => "small_rooms",
            StandardWorkload::HeavyTailed => "heavy_tailed",
            StandardWorkload::SchoolDay => "school_day",
            StandardWorkload::SchoolDaySized => "school_day_sized",
        }
    }
}

/// What the joins say about the room's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum HintMode {
    /// No hint: the router uses history, else its default reserve.
    Absent,
    /// The true size times a random factor in 0.6..1.4.
    Noisy,
    /// The true size.
    Exact,
}

impl HintMode {
    pub const ALL: [HintMode; 3] = [HintMode::Absent, HintMode::Noisy, HintMode::Exact];

    pub fn name(self) -> &'static str {
        match self {
            HintMode::Absent => "absent",
            HintMode::Noisy => "noisy",
            HintMode::Exact => "exact",
        }
    }
}

/// The knobs of the generated workloads. [`WorkloadParams::standard`] gives the issue's
/// figures; tests shrink them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadParams {
    /// Total capacity of the initial cluster, in load units.
    pub total_capacity: f64,
    /// Capacity of one node (sets the largest heavy-tailed room).
    pub node_capacity: f64,
    pub seed: u64,
    /// Steady workloads: length of the measured part (then scale-out, failure, 30 min more).
    pub steady_measure: Millis,
    /// Steady workloads: target mean utilization.
    pub steady_utilization: f64,
    /// School day: number of lessons (one burst each, an hour apart).
    pub lessons: u32,
    /// School day: rooms starting per lesson, per node of the initial cluster.
    pub lesson_rooms_per_node: f64,
    /// The sized school day: the same, with this many rooms per lesson and node.
    pub sized_lesson_rooms_per_node: f64,
    /// School day: number of nodes (with `lesson_rooms_per_node`, the rooms per burst).
    pub nodes: usize,
    /// School day: utilization of the background small rooms.
    pub background_utilization: f64,
}

impl WorkloadParams {
    /// The standard figures for `nodes` nodes of `node_capacity` each.
    pub fn standard(nodes: usize, node_capacity: f64, seed: u64) -> Self {
        WorkloadParams {
            total_capacity: nodes as f64 * node_capacity,
            node_capacity,
            seed,
            steady_measure: 150 * MINUTE,
            steady_utilization: 0.65,
            lessons: 4,
            lesson_rooms_per_node: 12.5,
            // About 58% mean at the busiest moment instead of 73%: 25% more nodes for the
            // same school, the headroom operators plan for a daily peak.
            sized_lesson_rooms_per_node: 9.5,
            nodes,
            background_utilization: 0.10,
        }
    }
}

/// Generates a standard workload.
pub fn generate(kind: StandardWorkload, hints: HintMode, p: &WorkloadParams) -> Workload {
    let mut w = match kind {
        StandardWorkload::SmallRooms => steady(kind, p, &SizeDist::Uniform(2, 6)),
        StandardWorkload::HeavyTailed => {
            let max = ((0.3 * p.node_capacity).round() as u32).max(3);
            steady(kind, p, &SizeDist::Zipf { max, s: 1.2 })
        }
        StandardWorkload::SchoolDay => school_day(p, p.lesson_rooms_per_node),
        StandardWorkload::SchoolDaySized => school_day(p, p.sized_lesson_rooms_per_node),
    };
    apply_hints(&mut w, hints, p.seed);
    w.name = format!("{}/{}", kind.name(), hints.name());
    w
}

/// Sets each session's hint from its true size (its number of stays).
pub fn apply_hints(w: &mut Workload, mode: HintMode, seed: u64) {
    let mut rng = Stream::Hints.rng(seed);
    for s in &mut w.sessions {
        let size = s.stays.len() as f64;
        let noise: f64 = rng.random_range(0.6..1.4);
        s.hint = match mode {
            HintMode::Absent => None,
            HintMode::Exact => Some(s.stays.len() as u32),
            HintMode::Noisy => Some(((size * noise).round() as u32).max(1)),
        };
    }
}

enum SizeDist {
    Uniform(u32, u32),
    /// 1 + Zipf over 1..max-1: sizes 2..=max.
    Zipf {
        max: u32,
        s: f64,
    },
}

impl SizeDist {
    fn mean(&self) -> f64 {
        match *self {
            SizeDist::Uniform(a, b) => (a + b) as f64 / 2.0,
            SizeDist::Zipf { max, s } => {
                let n = max - 1;
                let z: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
                let m: f64 = (1..=n).map(|k| (k as f64).powf(1.0 - s)).sum();
                1.0 + m / z
            }
        }
    }

    fn sample(&self, rng: &mut StdRng) -> u32 {
        match *self {
            SizeDist::Uniform(a, b) => rng.random_range(a..=b),
            SizeDist::Zipf { max, s } => {
                let z = Zipf::new((max - 1) as f64, s).expect("valid Zipf parameters");
                1 + z.sample(rng) as u32
            }
        }
    }
}

const STEADY_MEAN_DURATION: Millis = 30 * MINUTE;
const STEADY_MIN_DURATION: Millis = 5 * MINUTE;

/// Stays of a room of `size` from `start` to `end`: joins spread after the start (mean
/// `growth`, capped at `growth_cap`), leaves in the last minute or two, one in ten early.
fn stays(
    rng: &mut StdRng,
    start: Millis,
    end: Millis,
    size: u32,
    growth: f64,
    growth_cap: Millis,
) -> Vec<Stay> {
    let grow = Exp::new(1.0 / growth).expect("positive mean");
    (0..size)
        .map(|i| {
            let delay = if i == 0 {
                0
            } else {
                (grow.sample(rng) as Millis).min(growth_cap)
            };
            let join = start + delay;
            let mut leave = end.saturating_sub(rng.random_range(0..=2 * MINUTE));
            if rng.random_bool(0.1) {
                leave = rng.random_range(join..=leave.max(join));
            }
            Stay {
                join,
                leave: leave.max(join + SECOND),
            }
        })
        .collect()
}

/// The most participants present at once among `stays` (what a node reports at a room's
/// busiest moment, and so what the router's history learns).
pub fn peak_present(stays: &[Stay]) -> u32 {
    let mut edges: Vec<(Millis, i32)> = stays
        .iter()
        .flat_map(|s| [(s.join, 1), (s.leave, -1)])
        .collect();
    // A leave and a join at the same instant: the leave first.
    edges.sort_unstable();
    let (mut present, mut peak) = (0i32, 0i32);
    for (_, d) in edges {
        present += d;
        peak = peak.max(present);
    }
    peak as u32
}

/// Steady state: Poisson room arrivals with exponential durations, sized to the target
/// utilization; scale-out at the end of the measured part, node failure 10 min later.
fn steady(kind: StandardWorkload, p: &WorkloadParams, sizes: &SizeDist) -> Workload {
    let mut rng = Stream::Steady(kind).rng(p.seed);
    let measure_until = p.steady_measure;
    let scale_out_at = measure_until;
    let fail_at = measure_until + 10 * MINUTE;
    let end = measure_until + 30 * MINUTE;
    let sessions = poisson_rooms(
        &mut rng,
        p.total_capacity * p.steady_utilization,
        sizes,
        end,
        "r",
    );
    Workload {
        name: kind.name().to_string(),
        sessions,
        bursts: vec![],
        measure_until,
        scale_out_at: Some(scale_out_at),
        fail_at: Some(fail_at),
        end,
        learned: vec![],
    }
}

/// Rooms arriving as a Poisson process over `0..end` with a mean load of `load` units.
fn poisson_rooms(
    rng: &mut StdRng,
    load: f64,
    sizes: &SizeDist,
    end: Millis,
    prefix: &str,
) -> Vec<Session> {
    // A participant stays about 7% less than the room lasts (late joins, early leaves).
    let mean_duration = (STEADY_MEAN_DURATION + STEADY_MIN_DURATION) as f64 * 0.93;
    let rate = load / (sizes.mean() * mean_duration); // rooms per ms
    let gap = Exp::new(rate).expect("positive rate");
    let dur = Exp::new(1.0 / STEADY_MEAN_DURATION as f64).expect("positive mean");
    let mut t = 0.0;
    let mut out = Vec::new();
    let mut i = 0u64;
    loop {
        t += gap.sample(rng);
        if t as Millis >= end {
            return out;
        }
        let start = t as Millis;
        let d = STEADY_MIN_DURATION + dur.sample(rng) as Millis;
        let size = sizes.sample(rng);
        out.push(Session {
            room: format!("{prefix}-{i}"),
            hint: None,
            stays: stays(rng, start, start + d, size, 20_000.0, 3 * MINUTE),
        });
        i += 1;
    }
}

/// The school day: background small rooms, and every hour a lesson: hundreds of recurring
/// class rooms (`rooms_per_node` per node) starting within a minute and filling up over a few
/// minutes, for 50 minutes. It is not the school's first day: the routers learned every
/// class's size from three earlier lessons (`Workload::learned`).
fn school_day(p: &WorkloadParams, rooms_per_node: f64) -> Workload {
    let mut rng = Stream::SchoolDay.rng(p.seed);
    let first = 30 * MINUTE;
    let lessons = p.lessons.max(1) as Millis;
    let last = first + (lessons - 1) * HOUR;
    let measure_until = last + 25 * MINUTE;
    let scale_out_at = measure_until;
    let fail_at = measure_until + 10 * MINUTE;
    let end = last + 55 * MINUTE;
    let mut sessions = poisson_rooms(
        &mut rng,
        p.total_capacity * p.background_utilization,
        &SizeDist::Uniform(2, 6),
        end,
        "bg",
    );
    let classes = (rooms_per_node * p.nodes as f64).round().max(1.0) as usize;
    let nominal: Vec<u32> = (0..classes).map(|_| rng.random_range(4..=25)).collect();
    let mut bursts = Vec::new();
    for l in 0..lessons {
        let t0 = first + l * HOUR;
        bursts.push((t0, t0 + MINUTE));
        for (c, &n) in nominal.iter().enumerate() {
            let start = t0 + rng.random_range(0..MINUTE);
            sessions.push(Session {
                room: format!("class-{c}"),
                hint: None,
                stays: lesson(&mut rng, n, start),
            });
        }
    }
    // The same classes on earlier days (their own attendance, from their own random stream,
    // so the day itself is the same with or without them): what the router learned.
    let mut earlier = Stream::EarlierLessons.rng(p.seed);
    let mut learned = Vec::with_capacity(EARLIER_LESSONS * nominal.len());
    for _ in 0..EARLIER_LESSONS {
        for (c, &n) in nominal.iter().enumerate() {
            let peak = peak_present(&lesson(&mut earlier, n, 0));
            learned.push((format!("class-{c}"), peak));
        }
    }
    Workload {
        name: StandardWorkload::SchoolDay.name().to_string(),
        sessions,
        bursts,
        measure_until,
        scale_out_at: Some(scale_out_at),
        fail_at: Some(fail_at),
        end,
        learned,
    }
}

/// Earlier lessons of each class the routers remember (`RoomHistory` keeps three peaks).
const EARLIER_LESSONS: usize = 3;

/// One lesson of a class of `n` pupils from `start`: 75-100% of them come, over the first
/// few minutes, for 50 minutes.
fn lesson(rng: &mut StdRng, n: u32, start: Millis) -> Vec<Stay> {
    let present = ((n as f64 * rng.random_range(0.75..=1.0)).round() as u32).max(2);
    stays(
        rng,
        start,
        start + 50 * MINUTE,
        present,
        60_000.0,
        5 * MINUTE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> WorkloadParams {
        let mut p = WorkloadParams::standard(4, 100.0, 7);
        p.steady_measure = 60 * MINUTE;
        p.lessons = 2;
        p
    }

    #[test]
    fn hint_modes_share_the_same_sessions() {
        let p = small();
        let a = generate(StandardWorkload::HeavyTailed, HintMode::Absent, &p);
        let e = generate(StandardWorkload::HeavyTailed, HintMode::Exact, &p);
        assert_eq!(a.sessions.len(), e.sessions.len());
        for (x, y) in a.sessions.iter().zip(&e.sessions) {
            assert_eq!(x.stays, y.stays);
            assert_eq!(x.hint, None);
            assert_eq!(y.hint, Some(y.stays.len() as u32));
        }
    }

    #[test]
    fn small_rooms_have_two_to_six_participants() {
        let w = generate(StandardWorkload::SmallRooms, HintMode::Absent, &small());
        assert!(w.sessions.len() > 50);
        assert!(w.sessions.iter().all(|s| (2..=6).contains(&s.stays.len())));
    }

    #[test]
    fn heavy_tailed_rooms_stay_within_thirty_percent_of_a_node_and_have_a_tail() {
        let w = generate(StandardWorkload::HeavyTailed, HintMode::Absent, &small());
        let max = w.sessions.iter().map(|s| s.stays.len()).max().unwrap();
        assert!(max <= 30, "largest room {max}");
        assert!(max >= 15, "no tail: largest room {max}");
    }

    #[test]
    fn school_day_rooms_start_within_a_minute_of_each_hour_and_recur() {
        let p = small();
        let w = generate(StandardWorkload::SchoolDay, HintMode::Absent, &p);
        assert_eq!(w.bursts.len(), 2);
        let in_burst = |t: Millis| w.bursts.iter().any(|&(a, b)| t >= a && t < b);
        let classes: Vec<&Session> = w
            .sessions
            .iter()
            .filter(|s| s.room.starts_with("class-"))
            .collect();
        assert_eq!(classes.len(), 2 * 50);
        assert!(classes.iter().all(|s| in_burst(s.start())));
        assert_eq!(
            classes.iter().filter(|s| s.room == "class-0").count(),
            2,
            "a class room recurs every lesson"
        );
    }

    #[test]
    fn the_school_days_classes_were_learned_on_earlier_days_and_nothing_else_was() {
        let p = small();
        let w = generate(StandardWorkload::SchoolDay, HintMode::Absent, &p);
        assert_eq!(w.learned.len(), EARLIER_LESSONS * 50);
        for c in 0..50 {
            let room = format!("class-{c}");
            let peaks: Vec<u32> = w
                .learned
                .iter()
                .filter(|(r, _)| *r == room)
                .map(|&(_, p)| p)
                .collect();
            assert_eq!(peaks.len(), EARLIER_LESSONS, "{room}");
            // Classes have 4-25 pupils, 75-100% of whom come; a few leave early.
            assert!(
                peaks.iter().all(|p| (1..=25).contains(p)),
                "{room}: {peaks:?}"
            );
            // Earlier lessons are not today's: the class's size is learned, not copied.
            let today = w.sessions.iter().find(|s| s.room == room).unwrap();
            assert!(peaks.iter().all(|&p| p as usize <= today.stays.len() * 2));
        }
        assert!(w.learned.iter().all(|(r, _)| r.starts_with("class-")));
        let exact = generate(StandardWorkload::SchoolDay, HintMode::Exact, &p);
        assert_eq!(exact.learned, w.learned, "hint modes learned the same");
        let steady = generate(StandardWorkload::SmallRooms, HintMode::Absent, &p);
        assert!(steady.learned.is_empty(), "one-off rooms teach nothing");
    }

    #[test]
    fn peak_present_counts_the_most_participants_at_once() {
        let stay = |join: Millis, leave: Millis| Stay { join, leave };
        assert_eq!(peak_present(&[]), 0);
        // Three overlap between 3 and 4 s; one leaves at 5 s exactly as another joins.
        let stays = [
            stay(0, 10 * SECOND),
            stay(2 * SECOND, 5 * SECOND),
            stay(3 * SECOND, 4 * SECOND),
            stay(5 * SECOND, 6 * SECOND),
        ];
        assert_eq!(peak_present(&stays), 3);
    }

    #[test]
    fn peak_demand_is_the_most_participants_present_at_a_sample_before_the_measured_end() {
        let stay = |join: Millis, leave: Millis| Stay { join, leave };
        let w = Workload {
            name: "t".into(),
            sessions: vec![Session {
                room: "r".into(),
                hint: None,
                stays: vec![
                    stay(0, 10 * SECOND),
                    stay(2 * SECOND, 5 * SECOND),
                    stay(3 * SECOND, 4 * SECOND),
                    // Present between two samples only: never seen, as the simulator samples.
                    stay(3_200, 3_700),
                    // Busier, but after the measured part.
                    stay(20 * SECOND, 30 * SECOND),
                    stay(20 * SECOND, 30 * SECOND),
                    stay(20 * SECOND, 30 * SECOND),
                    stay(20 * SECOND, 30 * SECOND),
                ],
            }],
            bursts: vec![],
            measure_until: 15 * SECOND,
            scale_out_at: None,
            fail_at: None,
            end: 40 * SECOND,
            learned: vec![],
        };
        assert_eq!(w.peak_demand(SECOND), (3, 3 * SECOND));
        assert_eq!(w.peak_demand(100), (4, 3_200));
    }

    #[test]
    fn the_standard_school_day_peaks_above_70_percent_and_the_sized_one_near_60() {
        // Means over seeds 1-8, what the standard run reports (one seed's draw of class
        // sizes moves them by a few hundredths: 0.70-0.78 and 0.56-0.63 on these seeds).
        let peak_mean = |kind| {
            let sum: f64 = (1..=8)
                .map(|seed| {
                    let p = WorkloadParams::standard(20, 250.0, seed);
                    let w = generate(kind, HintMode::Absent, &p);
                    w.peak_demand(SECOND).0 as f64 / p.total_capacity
                })
                .sum();
            sum / 8.0
        };
        let standard = peak_mean(StandardWorkload::SchoolDay);
        assert!(
            (0.70..=0.80).contains(&standard),
            "a 25% cut from least-loaded's ~1.0 is then at or below the bound: {standard:.3}"
        );
        let sized = peak_mean(StandardWorkload::SchoolDaySized);
        assert!((0.55..=0.65).contains(&sized), "{sized:.3}");
    }

    #[test]
    fn the_sized_school_day_has_fewer_classes_of_the_same_kind() {
        let p = small();
        let classes = |kind| {
            generate(kind, HintMode::Absent, &p)
                .sessions
                .iter()
                .filter(|s| s.room.starts_with("class-"))
                .count()
        };
        assert_eq!(classes(StandardWorkload::SchoolDay), 2 * 50);
        assert_eq!(classes(StandardWorkload::SchoolDaySized), 2 * 38);
    }

    #[test]
    fn every_random_stream_of_a_seed_is_its_own() {
        let mut streams: Vec<Stream> = StandardWorkload::ALL
            .iter()
            .map(|&k| Stream::Steady(k))
            .collect();
        streams.extend([
            Stream::SchoolDay,
            Stream::EarlierLessons,
            Stream::Hints,
            Stream::Reconnect,
        ]);
        streams.extend((0..64).map(Stream::Router));
        for seed in (0..100).chain([u64::MAX, 0x9e37_79b9]) {
            let mut seeds: Vec<u64> = streams.iter().map(|s| s.seed(seed)).collect();
            seeds.sort_unstable();
            seeds.dedup();
            assert_eq!(seeds.len(), streams.len(), "seed {seed}");
        }
        // The two that were one: the small-rooms generator and router 0.
        let mut a = Stream::Steady(StandardWorkload::SmallRooms).rng(1);
        let mut b = Stream::Router(0).rng(1);
        assert_ne!(a.random::<u64>(), b.random::<u64>());
    }

    #[test]
    fn the_same_seed_gives_the_same_workload() {
        let p = small();
        assert_eq!(
            generate(StandardWorkload::SchoolDay, HintMode::Noisy, &p),
            generate(StandardWorkload::SchoolDay, HintMode::Noisy, &p)
        );
    }
}
