//! Trace files: a recorded workload, one event per line, turned into a [`Workload`].
//!
//! Format: `TIME ROOM join|leave [SIZE]`, fields separated by whitespace or commas; `TIME` in
//! seconds (decimals allowed), `ROOM` the room key, `SIZE` an optional size hint carried by
//! the room's first join (`size=N` or `N`). Blank lines and lines starting with `#` are
//! skipped. Events need not be sorted. Participants are anonymous: a leave ends the room's
//! earliest open join; a room whose last participant leaves ends its session (a later join
//! starts a new session of the same room). Joins still open at the end leave one second after
//! the last event. The caller may set the scale-out and failure times afterwards.

use std::collections::HashMap;
use std::io::BufRead;

use anyhow::{bail, Context};

use super::workload::{Session, Stay, Workload, SECOND};
use crate::placement::Millis;

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
    let join = match fields[2].to_ascii_lowercase().as_str() {
        "join" => true,
        "leave" => false,
        other => bail!("line {no}: expected join or leave, got {other:?}"),
    };
    let size = match fields.get(3) {
        None => None,
        Some(f) => Some(
            f.trim_start_matches("size=")
                .parse()
                .with_context(|| format!("line {no}: bad size {f:?}"))?,
        ),
    };
    Ok(Some(Event {
        t: (secs * SECOND as f64).round() as Millis,
        room: fields[1].to_string(),
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
                leave: e.t.max(join + 1),
            });
            if joins.is_empty() {
                open.remove(&e.room);
            }
        }
    }
    let last = events.last().map_or(0, |e| e.t);
    let end = last + SECOND;
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
        end: end + SECOND,
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
}
