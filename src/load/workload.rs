//! The load harness's workload: a precomputed, bounded schedule of joins.
//!
//! Sessions of rooms arrive as a Poisson process; each picks its room by Zipf(s) popularity
//! over `rooms` room names (a popular room drawn again while it is running simply gets more
//! participants), a size from [`Dist`], and for each participant an arrival offset within
//! `spread` and a stay from [`Dist`]. The joins are sorted by their natural time and then
//! re-timed to a constant rate (`k / rate`), so the generator is open-loop at exactly the
//! target rate while keeping the rooms' interleaving. Bursts ("1 000 new rooms in one
//! second") are added on top with fresh room names. Everything is drawn from a seed, so a
//! run can be repeated, and the schedule is cut at the duration and at `max_joins`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Binomial, Distribution, Exp, Zipf};
use serde::Serialize;

/// Largest `MAX` of `zipf:MAX:S`: a session's size is capped at this many participants
/// anyway, and [`Dist::mean`] sums over `1..=MAX`, so a larger one would only make the run
/// wait for that sum before it starts (`zipf:1e12:1.5` never would).
pub const ZIPF_MAX: u32 = 100_000;

/// A distribution of room sizes (participants) or stays (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dist {
    /// Always `value`.
    Fixed { value: f64 },
    /// Uniform in `lo..=hi` (integers for sizes).
    Uniform { lo: f64, hi: f64 },
    /// Exponential with this mean.
    Exp { mean: f64 },
    /// Zipf(s) over `1..=max`: many small values, a heavy tail up to `max`.
    Zipf { max: f64, s: f64 },
}

impl Dist {
    /// Parses `fixed:V`, `uniform:LO:HI`, `exp:MEAN` or `zipf:MAX:S`.
    pub fn parse(s: &str) -> Result<Dist, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |i: usize| -> Result<f64, String> {
            let v: f64 = parts
                .get(i)
                .ok_or_else(|| format!("{s:?}: missing a number"))?
                .parse()
                .map_err(|_| format!("{s:?}: not a number"))?;
            if v.is_finite() && v >= 0.0 {
                Ok(v)
            } else {
                Err(format!("{s:?}: numbers must be finite and >= 0"))
            }
        };
        let d = match (parts[0], parts.len()) {
            ("fixed", 2) => Dist::Fixed { value: num(1)? },
            ("uniform", 3) => {
                let (lo, hi) = (num(1)?, num(2)?);
                if lo > hi {
                    return Err(format!("{s:?}: lo > hi"));
                }
                Dist::Uniform { lo, hi }
            }
            ("exp", 2) => {
                let mean = num(1)?;
                if mean <= 0.0 {
                    return Err(format!("{s:?}: mean must be > 0"));
                }
                Dist::Exp { mean }
            }
            ("zipf", 3) => {
                let (max, s_) = (num(1)?, num(2)?);
                if !(1.0..=ZIPF_MAX as f64).contains(&max) || s_ <= 0.0 {
                    return Err(format!(
                        "{s:?}: needs MAX in 1..={ZIPF_MAX} and S > 0 (sizes are capped at \
                         {ZIPF_MAX} participants anyway)"
                    ));
                }
                Dist::Zipf { max, s: s_ }
            }
            _ => {
                return Err(format!(
                    "{s:?}: expected fixed:V, uniform:LO:HI, exp:MEAN or zipf:MAX:S"
                ))
            }
        };
        Ok(d)
    }

    /// The mean (exact for every kind; a Zipf's `max` is at most [`ZIPF_MAX`] when parsed).
    pub fn mean(&self) -> f64 {
        match *self {
            Dist::Fixed { value } => value,
            Dist::Uniform { lo, hi } => (lo + hi) / 2.0,
            Dist::Exp { mean } => mean,
            Dist::Zipf { max, s } => {
                let n = max.floor() as u64;
                let z: f64 = (1..=n).map(|k| (k as f64).powf(-s)).sum();
                (1..=n).map(|k| (k as f64).powf(1.0 - s)).sum::<f64>() / z
            }
        }
    }

    /// One sample as a real number.
    pub fn sample(&self, rng: &mut StdRng) -> f64 {
        match *self {
            Dist::Fixed { value } => value,
            Dist::Uniform { lo, hi } if lo == hi => lo,
            Dist::Uniform { lo, hi } => rng.random_range(lo..=hi),
            Dist::Exp { mean } => Exp::new(1.0 / mean).map_or(mean, |e| e.sample(rng)),
            Dist::Zipf { max, s } => Zipf::new(max.floor(), s).map_or(1.0, |z| z.sample(rng)),
        }
    }

    /// One sample as a count of at least 1 (room sizes).
    pub fn sample_count(&self, rng: &mut StdRng) -> u32 {
        match *self {
            Dist::Uniform { lo, hi } => rng.random_range(lo.round() as u32..=hi.round() as u32),
            _ => self.sample(rng).round() as u32,
        }
        .max(1)
    }
}

/// `N` new rooms whose first participants join within one second from `at`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Burst {
    pub at: Duration,
    pub rooms: u32,
}

impl Burst {
    /// Parses `SECS:ROOMS`, e.g. `5:1000`.
    pub fn parse(s: &str) -> Result<Burst, String> {
        let (a, n) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?}: expected SECS:ROOMS"))?;
        let at: f64 = a.parse().map_err(|_| format!("{s:?}: bad SECS"))?;
        let rooms: u32 = n.parse().map_err(|_| format!("{s:?}: bad ROOMS"))?;
        if !(at.is_finite() && (0.0..=86_400.0).contains(&at)) || rooms == 0 || rooms > 1_000_000 {
            return Err(format!("{s:?}: SECS in 0..=86400, ROOMS in 1..=1000000"));
        }
        Ok(Burst {
            at: Duration::from_secs_f64(at),
            rooms,
        })
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadSpec {
    /// Target joins per second (base load, bursts come on top).
    pub rate: f64,
    pub duration: Duration,
    /// Hard cap on the number of joins in the schedule.
    pub max_joins: usize,
    /// Number of distinct base room names.
    pub rooms: u32,
    /// Zipf exponent of room popularity.
    pub zipf_s: f64,
    /// Participants per session.
    pub size: Dist,
    /// Seconds a participant stays.
    pub stay: Dist,
    /// Participants of a session arrive within this long after its first join.
    pub spread: Duration,
    pub bursts: Vec<Burst>,
    pub seed: u64,
}

/// One scheduled join.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Join {
    /// Offset from the start of the run.
    pub at: Duration,
    /// Index into [`Schedule::rooms`].
    pub room: u32,
    /// The session's true size (sent as `?size=` when hints are on).
    pub size: u32,
    /// How long the participant stays before leaving.
    pub stay: Duration,
}

/// The whole run's joins, sorted by time, plus the room names they index.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub rooms: Vec<String>,
    pub joins: Vec<Join>,
}

/// A base join in natural time, before the re-timing; ordered by that time, then by the
/// order drawn (so the heap that keeps the earliest drops the latest drawn of a tie).
#[derive(Debug, Clone, Copy)]
struct Natural {
    /// Seconds from the start, >= 0.
    at: f64,
    seq: u64,
    room: u32,
    size: u32,
    stay: f64,
}

impl PartialEq for Natural {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Natural {}

impl PartialOrd for Natural {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Natural {
    fn cmp(&self, other: &Self) -> Ordering {
        self.at.total_cmp(&other.at).then(self.seq.cmp(&other.seq))
    }
}

/// The name of base room `i`.
pub fn room_name(i: u32) -> String {
    format!("room-{i}")
}

impl WorkloadSpec {
    /// Builds the schedule. Bounded: at most `max_joins` joins, none at or after `duration`.
    pub fn schedule(&self) -> Schedule {
        let mut rng = StdRng::seed_from_u64(self.seed);
        let rooms_n = self.rooms.max(1);
        let mut rooms: Vec<String> = (0..rooms_n).map(room_name).collect();
        let secs = self.duration.as_secs_f64();
        let base_n = ((self.rate.max(0.0) * secs).floor() as usize).min(self.max_joins);

        // Base sessions in natural time, then re-timed. A session's participants arrive up to
        // `spread` after its first join, so the base_n earliest joins are only known once a
        // session starts after the base_n-th earliest join drawn so far: no later session can
        // add an earlier one. (Stopping on a count of joins drawn, latecomers far past the cut
        // included, left the end of a schedule whose `spread` is about the duration without
        // new rooms.) Only the base_n earliest joins are kept, in a max-heap on natural time,
        // and a session's latecomers are drawn only where they can still be kept, so memory
        // and work grow with base_n, not with `spread` x size. Bounded by natural time too.
        let mean_size = self.size.mean().max(1.0);
        let session_rate = (self.rate / mean_size).max(1e-9);
        let arrivals = Exp::new(session_rate).expect("rate > 0");
        let popularity = Zipf::new(rooms_n as f64, self.zipf_s.max(1e-9)).ok();
        let spread = self.spread.as_secs_f64();
        let mut kept: BinaryHeap<Natural> = BinaryHeap::with_capacity(base_n.saturating_add(1));
        let mut seq = 0u64;
        let mut t = 0.0f64;
        let horizon = secs * 4.0 + spread * 2.0 + 60.0;
        while base_n > 0 && t < horizon {
            t += arrivals.sample(&mut rng);
            // Later than the base_n-th earliest join kept: this session and every later one
            // would only add joins past the cut.
            let cut = match kept.peek() {
                Some(last) if kept.len() >= base_n => last.at,
                _ => f64::INFINITY,
            };
            if t >= cut {
                break;
            }
            let room = match &popularity {
                Some(z) => (z.sample(&mut rng) as u32).clamp(1, rooms_n) - 1,
                None => rng.random_range(0..rooms_n),
            };
            let size = self.size.sample_count(&mut rng).min(ZIPF_MAX);
            // Latecomers are uniform in `t..=t + spread`; those at or past the cut would be
            // dropped, so draw only how many land before it (binomially) and where (uniform
            // below it): the same joins kept, in distribution, without drawing the rest.
            let (late, within) = if cut - t >= spread {
                (size - 1, spread)
            } else {
                let p = (cut - t) / spread;
                let n = Binomial::new(u64::from(size - 1), p).map_or(0, |b| b.sample(&mut rng));
                (n as u32, cut - t)
            };
            for j in 0..=late {
                let off = if j == 0 {
                    0.0
                } else if within >= spread {
                    rng.random_range(0.0..=spread)
                } else {
                    rng.random_range(0.0..within)
                };
                seq += 1;
                kept.push(Natural {
                    at: t + off,
                    seq,
                    room,
                    size,
                    stay: self.stay.sample(&mut rng),
                });
                if kept.len() > base_n {
                    kept.pop();
                }
            }
        }
        // Ascending natural time; joins at the same time in the order drawn.
        let natural = kept.into_sorted_vec();
        let mut joins: Vec<Join> = natural
            .into_iter()
            .enumerate()
            .map(|(k, n)| Join {
                at: Duration::from_secs_f64(k as f64 / self.rate),
                room: n.room,
                size: n.size,
                stay: Duration::from_secs_f64(n.stay.clamp(0.0, 86_400.0)),
            })
            .collect();

        // Bursts: fresh rooms, first joins spread over one second, the rest within `spread`.
        // Bounded as the base load is: bursts from the run's end on are not built, and
        // building stops at `max_joins` burst joins, earliest burst first (the schedule keeps
        // at most that many in all).
        let mut order: Vec<(usize, &Burst)> = self
            .bursts
            .iter()
            .enumerate()
            .filter(|(_, b)| b.at < self.duration)
            .collect();
        order.sort_by_key(|(_, b)| b.at);
        let mut burst_joins = 0usize;
        'bursts: for (b, burst) in order {
            for i in 0..burst.rooms {
                if burst_joins >= self.max_joins {
                    break 'bursts;
                }
                let room = rooms.len() as u32;
                rooms.push(format!("burst-{b}-{i}"));
                let first = burst.at.as_secs_f64() + i as f64 / burst.rooms as f64;
                let size = self.size.sample_count(&mut rng).min(ZIPF_MAX);
                for j in 0..size {
                    let off = if j == 0 {
                        0.0
                    } else {
                        rng.random_range(0.0..=spread)
                    };
                    burst_joins += 1;
                    joins.push(Join {
                        at: Duration::from_secs_f64(first + off),
                        room,
                        size,
                        stay: Duration::from_secs_f64(
                            self.stay.sample(&mut rng).clamp(0.0, 86_400.0),
                        ),
                    });
                }
            }
        }
        joins.retain(|j| j.at < self.duration);
        joins.sort_by_key(|j| j.at);
        joins.truncate(self.max_joins);
        Schedule { rooms, joins }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkloadSpec {
        WorkloadSpec {
            rate: 500.0,
            duration: Duration::from_secs(4),
            max_joins: 1_000_000,
            rooms: 200,
            zipf_s: 1.1,
            size: Dist::Uniform { lo: 2.0, hi: 6.0 },
            stay: Dist::Exp { mean: 3.0 },
            spread: Duration::from_secs(1),
            bursts: vec![],
            seed: 7,
        }
    }

    #[test]
    fn constant_rate_and_bounded() {
        let s = spec().schedule();
        assert_eq!(s.joins.len(), 2_000);
        assert!(s.joins.windows(2).all(|w| w[0].at <= w[1].at));
        assert!(s.joins.iter().all(|j| j.at < Duration::from_secs(4)));
        let second = s
            .joins
            .iter()
            .filter(|j| j.at >= Duration::from_secs(1) && j.at < Duration::from_secs(2))
            .count();
        assert_eq!(second, 500);
        let mut capped = spec();
        capped.max_joins = 123;
        assert_eq!(capped.schedule().joins.len(), 123);
    }

    /// Rooms whose first join is in the last quarter of the schedule's joins.
    fn new_rooms_in_the_last_quarter(s: &Schedule) -> usize {
        let mut seen = std::collections::HashSet::new();
        let from = s.joins.len() * 3 / 4;
        s.joins
            .iter()
            .enumerate()
            .filter(|(k, j)| seen.insert(j.room) && *k >= from)
            .count()
    }

    #[test]
    fn new_rooms_keep_coming_to_the_end_when_participants_arrive_over_the_whole_run() {
        // 100 joins/s of sessions of 5 over a million rooms (so a room is almost never drawn
        // twice): 20 new rooms a second. With latecomers arriving up to 10 s (or 30 s) after
        // a session's first join, the last quarter of the 1 000 joins (the last 2.5 s) still
        // has its share of sessions starting: 50 once the latecomers are steady, more while
        // they still ramp up (about 70 at 30 s). A generator that stopped on the number of
        // joins drawn, latecomers far past the cut included, had 15 at 10 s and none at 30 s.
        for (spread, most) in [(10, 65), (30, 90)] {
            let sp = WorkloadSpec {
                rate: 100.0,
                duration: Duration::from_secs(10),
                rooms: 1_000_000,
                zipf_s: 0.1,
                size: Dist::Fixed { value: 5.0 },
                spread: Duration::from_secs(spread),
                ..spec()
            };
            let s = sp.schedule();
            assert_eq!(s.joins.len(), 1_000);
            let new = new_rooms_in_the_last_quarter(&s);
            assert!(
                (35..=most).contains(&new),
                "spread {spread} s: {new} new rooms"
            );
        }
    }

    #[test]
    fn popularity_is_skewed_and_repeatable() {
        let s = spec().schedule();
        let mut counts = vec![0u32; 200];
        for j in &s.joins {
            counts[j.room as usize] += 1;
        }
        // Zipf(1.1): room-0 is far more popular than a room in the tail.
        assert!(counts[0] > 10 * counts[150].max(1), "{:?}", &counts[..5]);
        assert_eq!(spec().schedule().joins, s.joins);
    }

    #[test]
    fn bursts_add_new_rooms_within_one_second() {
        let mut sp = spec();
        sp.bursts = vec![Burst::parse("2:300").unwrap()];
        sp.size = Dist::Fixed { value: 1.0 };
        let s = sp.schedule();
        let burst: Vec<&Join> = s
            .joins
            .iter()
            .filter(|j| s.rooms[j.room as usize].starts_with("burst-0-"))
            .collect();
        assert_eq!(burst.len(), 300);
        assert!(burst
            .iter()
            .all(|j| j.at >= Duration::from_secs(2) && j.at < Duration::from_secs(3)));
    }

    #[test]
    fn bursts_are_built_only_within_the_run_and_up_to_max_joins() {
        let mut sp = spec();
        sp.rate = 10.0;
        sp.max_joins = 500;
        sp.size = Dist::Fixed { value: 1000.0 };
        // Listed out of order: the earlier one is built first; the one at the end not at all.
        sp.bursts = vec![
            Burst::parse("3:1000000").unwrap(),
            Burst::parse("1:1000000").unwrap(),
            Burst::parse("4:1000000").unwrap(),
        ];
        let s = sp.schedule();
        assert_eq!(s.joins.len(), 500);
        // Building stopped after the first room of the earliest burst (1 000 participants).
        assert!(s.rooms.len() <= 200 + 2, "{} rooms built", s.rooms.len());
        assert!(s.rooms.iter().all(|r| !r.starts_with("burst-2-")));
        assert!(
            Burst::parse("1e20:5").is_err(),
            "a time a Duration cannot hold"
        );
        assert!(Burst::parse("86400:5").is_ok());
    }

    #[test]
    fn dists_parse_and_have_their_means() {
        assert_eq!(Dist::parse("fixed:4").unwrap().mean(), 4.0);
        assert_eq!(Dist::parse("uniform:2:6").unwrap().mean(), 4.0);
        assert!(Dist::parse("uniform:6:2").is_err());
        assert!(Dist::parse("exp:0").is_err());
        assert!(Dist::parse("zipf:30").is_err());
        assert!(Dist::parse("normal:1:2").is_err());
        let z = Dist::parse("zipf:30:1.2").unwrap();
        let mut rng = StdRng::seed_from_u64(1);
        let n = 20_000;
        let avg: f64 = (0..n).map(|_| z.sample_count(&mut rng) as f64).sum::<f64>() / n as f64;
        assert!(
            (avg - z.mean()).abs() < 0.1 * z.mean(),
            "{avg} vs {}",
            z.mean()
        );
        assert!(Burst::parse("5").is_err());
        assert!(Burst::parse("1:0").is_err());
    }

    #[test]
    fn a_huge_zipf_max_is_refused_not_summed() {
        // The mean sums over 1..=MAX: 1e12 terms would hang the run before it starts.
        let e = Dist::parse("zipf:1e12:1.5").unwrap_err();
        assert!(e.contains("MAX in 1..=100000"), "{e}");
        assert!(Dist::parse("zipf:100001:1.5").is_err());
        assert!(Dist::parse("zipf:0.5:1.5").is_err());
        let t = std::time::Instant::now();
        let m = Dist::parse("zipf:100000:1.5").unwrap().mean();
        assert!(m > 1.0 && m.is_finite(), "{m}");
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }
}
