//! Trace files: a recorded workload, one event per line, turned into a [`Workload`].
//!
//! Format: `TIME ROOM join|leave [SIZE]`, fields separated by whitespace or commas; `TIME` in
//! seconds (decimals allowed), `ROOM` the room id (checked and normalized as the router does
//! by default, `rooms.normalization = "lowercase"`: `Room` and `room` are one room, and an
//! id the router would refuse is an error naming the line), `SIZE` an optional size hint
//! carried by the room's first join (`size=N` or `N`; not on a leave). Blank lines and lines starting with `#` are
//! skipped. Events need not be sorted. Participants are anonymous: a leave ends the room's
//! earliest open join; a room whose last participant leaves ends its session (a later join
//! starts a new session of the same room). Joins still open at the end leave one second after
//! the last event. The caller may set the scale-out and failure times afterwards.
//!
//! Times are rebased to the trace's first event: a trace stamped with Unix epoch seconds (what
//! operators export from their logs) runs from 0 like one that starts at 0. A trace may span
//! at most [`MAX_SPAN`] from its first event to its last; a longer one is refused with the
//! line that lies beyond it (the simulator samples every second of the span).

use std::collections::HashMap;
use std::io::BufRead;

use anyhow::{bail, Context};

use super::workload::{Session, Stay, Workload, HOUR, SECOND};
use crate::placement::Millis;
use crate::room::{Normalization, RoomKey};

/// The longest span a trace may cover, first event to last: 31 days.
pub const MAX_SPAN: Millis = 31 * 24 * HOUR;

/// The largest time a line may carry, in ms: up to 2^53 every millisecond is exact in an
/// `f64`, so no two times round together (about 285 000 years after the epoch).
const MAX_TIME_MS: f64 = (1u64 << 53) as f64;

struct Event {
    t: Millis,
    room: String,
    join: bool,
    size: Option<u32>,
    line: usize,
}

fn parse_line(line: &str, no: usize) -> anyhow::Result<Option<Event>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return Ok(None);
    }
    let fields: Vec<&str> = line
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|f| !f.is_empty())
        .collect();
    if !(3..=4).contains(&fields.len()) {
        bail!("line {no}: expected `time room join|leave [size]`, got {line:?}");
    }
    let secs: f64 = fields[0]
        .parse()
        .with_context(|| format!("line {no}: bad time {:?}", fields[0]))?;
    if !secs.is_finite() || secs < 0.0 {
        bail!("line {no}: time must be >= 0 seconds");
    }
    let ms = (secs * SECOND as f64).round();
    if ms > MAX_TIME_MS {
        bail!(
            "line {no}: time {:?} is too large (at most {} seconds)",
            fields[0],
            MAX_TIME_MS / SECOND as f64
        );
    }
    let join = match fields[2].to_ascii_lowercase().as_str() {
        "join" => true,
        "leave" => false,
        other => bail!("line {no}: expected join or leave, got {other:?}"),
    };
    let room = RoomKey::parse(fields[1], Normalization::default())
        .map_err(|e| anyhow::anyhow!("line {no}: room {:?}: {e}", fields[1]))?;
    let size = match fields.get(3) {
        None => None,
        Some(f) if !join => bail!("line {no}: a leave carries no size (got {f:?})"),
        Some(f) => {
            let size = f
                .trim_start_matches("size=")
                .parse()
                .with_context(|| format!("line {no}: bad size {f:?}"))?;
            // As the router: a size hint of 0 is refused, not taken as no hint.
            if size == 0 {
                bail!("line {no}: bad size {f:?}: size must be a positive integer");
            }
            Some(size)
        }
    };
    Ok(Some(Event {
        // In range: checked above.
        t: ms as Millis,
        room: room.as_str().to_string(),
        join,
        size,
        line: no,
    }))
}

/// Reads a trace into a workload named `name`.
pub fn read_trace(input: impl BufRead, name: &str) -> anyhow::Result<Workload> {
    let mut events = Vec::new();
    for (i, line) in input.lines().enumerate() {
        let line = line.with_context(|| format!("line {}: unreadable", i + 1))?;
        if let Some(e) = parse_line(&line, i + 1)? {
            events.push(e);
        }
    }
    events.sort_by_key(|e| e.t);
    // Rebase to the first event; refuse a trace longer than MAX_SPAN, naming the first line
    // (in time order) beyond it.
    let first = events.first().map_or(0, |e| e.t);
    if let Some(e) = events.iter().find(|e| e.t - first > MAX_SPAN) {
        let head = &events[0];
        bail!(
            "line {}: {:.3} s after the trace's first event (line {}): a trace may span at most \
             {} days; split it",
            e.line,
            (e.t - first) as f64 / SECOND as f64,
            head.line,
            MAX_SPAN / (24 * HOUR)
        );
    }
    for e in &mut events {
        e.t -= first;
    }
    let mut sessions: Vec<Session> = Vec::new();
    // Room key -> (its open session, join times of the participants still in it).
    let mut open: HashMap<String, (usize, Vec<Millis>)> = HashMap::new();
    for e in &events {
        if e.join {
            let entry = open.entry(e.room.clone()).or_insert_with(|| {
                sessions.push(Session {
                    room: e.room.clone(),
                    hint: e.size,
                    stays: Vec::new(),
                });
                (sessions.len() - 1, Vec::new())
            });
            entry.1.push(e.t);
        } else {
            let Some((s, joins)) = open.get_mut(&e.room) else {
                bail!(
                    "line {}: leave of room {:?} with nobody in it",
                    e.line,
                    e.room
                );
            };
            let join = joins.remove(0);
            sessions[*s].stays.push(Stay {
                join,
                leave: e.t.max(join.saturating_add(1)),
            });
            if joins.is_empty() {
                open.remove(&e.room);
            }
        }
    }
    // At most MAX_SPAN after the rebase: these cannot overflow, saturating all the same.
    let last = events.last().map_or(0, |e| e.t);
    let end = last.saturating_add(SECOND);
    for (s, joins) in open.into_values() {
        sessions[s]
            .stays
            .extend(joins.into_iter().map(|join| Stay { join, leave: end }));
    }
    Ok(Workload {
        name: name.to_string(),
        sessions,
        bursts: vec![],
        measure_until: end,
        scale_out_at: None,
        fail_at: None,
        end: end.saturating_add(SECOND),
        learned: vec![],
    })
}

/// Reads a trace held in a string.
pub fn parse_trace(text: &str, name: &str) -> anyhow::Result<Workload> {
    read_trace(text.as_bytes(), name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_becomes_sessions_with_matched_stays() {
        let w = parse_trace(
            "# time room event\n0 math join size=3\n1.5,math,join\n2 art join\n\
             10 math leave\n12 math leave\n20 math join\n",
            "t",
        )
        .unwrap();
        assert_eq!(w.sessions.len(), 3, "math twice (it emptied), art once");
        let math = &w.sessions[0];
        assert_eq!(math.hint, Some(3));
        assert_eq!(
            math.stays,
            vec![
                Stay {
                    join: 0,
                    leave: 10_000
                },
                Stay {
                    join: 1_500,
                    leave: 12_000
                }
            ]
        );
        assert_eq!(w.end, 22_000);
        assert!(w
            .sessions
            .iter()
            .all(|s| s.stays.len() == 1 || s.room == "math"));
    }

    #[test]
    fn a_leave_from_an_empty_room_is_an_error_naming_the_line() {
        let err = parse_trace("0 a join\n1 a leave\n2 a leave\n", "t").unwrap_err();
        assert!(err.to_string().contains("line 3"), "{err}");
        assert!(parse_trace("0 a jump\n", "t").is_err());
        assert!(parse_trace("x a join\n", "t").is_err());
    }

    #[test]
    fn room_ids_are_the_routers_and_sizes_come_with_joins_only() {
        // "Standup" and "standup" are one room to the router, so one session here.
        let w = parse_trace("0 Standup join\n1 standup join\n2 STANDUP leave\n", "t").unwrap();
        assert_eq!(w.sessions.len(), 1);
        assert_eq!(w.sessions[0].room, "standup");
        assert_eq!(w.sessions[0].stays.len(), 2);
        let long = "x".repeat(257);
        for (bad, says) in [
            (format!("0 {long} join\n"), "line 1"),
            ("0 a join\n1 a\u{7} join\n".to_string(), "line 2"),
            (
                "0 a join 5\n1 a leave 5\n".to_string(),
                "a leave carries no size",
            ),
        ] {
            let err = parse_trace(&bad, "t").unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn a_size_of_0_is_an_error_naming_the_line_as_the_router_refuses_it() {
        for zero in ["size=0", "0"] {
            let text = format!("0 a join size=3\n1 b join {zero}\n2 a leave\n");
            let err = parse_trace(&text, "t").unwrap_err().to_string();
            assert!(
                err.contains("line 2") && err.contains("positive integer"),
                "{zero}: {err}"
            );
        }
        let w = parse_trace("0 a join size=1\n", "t").unwrap();
        assert_eq!(w.sessions[0].hint, Some(1));
    }

    #[test]
    fn a_time_too_large_for_milliseconds_is_an_error_naming_the_line() {
        // 1e300 s saturated to u64::MAX ms, and the end (one second after it) overflowed.
        for time in ["1e300", "1e16", "9007199254741"] {
            let err = parse_trace(&format!("0 a join\n{time} a leave\n"), "t").unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains("line 2") && msg.contains("too large"), "{msg}");
        }
        // The largest time that is still exact is fine (a trace of one instant).
        let w = parse_trace("9007199254740 a join\n", "t").unwrap();
        assert_eq!(w.sessions[0].stays[0].join, 0);
    }

    #[test]
    fn epoch_stamped_times_are_rebased_to_the_first_event() {
        let epoch = parse_trace(
            "1700000060 b join size=2\n1700000000 a join\n1700000000.5 a join\n\
             1700000030 a leave\n1700000090 b leave\n",
            "t",
        )
        .unwrap();
        let zero = parse_trace(
            "60 b join size=2\n0 a join\n0.5 a join\n30 a leave\n90 b leave\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            epoch.sessions[0].stays[0],
            Stay {
                join: 0,
                leave: 30_000
            }
        );
        assert_eq!((epoch.measure_until, epoch.end), (91_000, 92_000));
        assert_eq!(epoch, zero);
        // The run samples the trace's 92 seconds, not the 54 years before it.
        let cfg = crate::sim::SimConfig::new(2, 3.0, 1, 2_000, 1);
        let p = crate::sim::Policy::DEFAULT;
        let r = crate::sim::simulate(&epoch, p, &cfg);
        // Shares are of the trace's own 91 s, not diluted by an idle prefix.
        assert!(r.busy_share > 0.6 && r.max_over_mean.is_some(), "{r:?}");
        assert_eq!(r, crate::sim::simulate(&zero, p, &cfg));
    }

    #[test]
    fn a_trace_spanning_more_than_31_days_is_refused_naming_the_line() {
        let day = 24 * 3600;
        let ok = format!("1700000000 a join\n{} a leave\n", 1_700_000_000 + 31 * day);
        assert_eq!(parse_trace(&ok, "t").unwrap().end, MAX_SPAN + 2 * SECOND);
        let long = format!(
            "# header\n1700000000 a join\n{} a leave\n{} b join\n",
            1_700_000_000 + 31 * day + 1,
            1_700_000_000 + 40 * day
        );
        let msg = parse_trace(&long, "t").unwrap_err().to_string();
        assert!(
            msg.contains("line 3") && msg.contains("line 2") && msg.contains("31 days"),
            "{msg}"
        );
    }
}
