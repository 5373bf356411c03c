//! Expected room size: where it comes from and how much of it is still outstanding.
//!
//! Rooms are placed empty and grow afterwards. A new room reserves its expected size on its
//! node until that many participants have arrived or the reservation expires; the outstanding
//! part counts in the node's utilization. This module is the pure arithmetic; the stateful
//! book of live reservations is `cluster::reservations`.

use serde::Serialize;

use super::Millis;

/// Where an expected size came from, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// A `size` hint in the request.
    Hint,
    /// The peak of the room's recent sessions, learned from node reports.
    History,
    /// The configured `new_room_reserve`.
    Default,
}

impl SizeSource {
    /// The name the API and the logs use (`hint`, `history`, `default`).
    pub fn as_str(self) -> &'static str {
        match self {
            SizeSource::Hint => "hint",
            SizeSource::History => "history",
            SizeSource::Default => "default",
        }
    }

    /// How long a reservation of this source lasts: `known_ms` for a hinted or learned size,
    /// `guess_ms` for the default guess. A guess is only there to cover the seconds before
    /// node reports show where new rooms went; held for minutes it is phantom load on every
    /// room smaller than the guess.
    pub fn ttl_ms(self, known_ms: u64, guess_ms: u64) -> u64 {
        match self {
            SizeSource::Hint | SizeSource::History => known_ms,
            SizeSource::Default => guess_ms,
        }
    }
}

/// Picks the expected size of a new room: hint, else history, else the default.
pub fn expected_size(hint: Option<u32>, history: Option<u32>, default: u32) -> (u32, SizeSource) {
    match (hint, history) {
        (Some(h), _) => (h, SizeSource::Hint),
        (None, Some(h)) if h > 0 => (h, SizeSource::History),
        _ => (default, SizeSource::Default),
    }
}

/// One room's reservation on its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    /// Expected participants.
    pub size: u32,
    /// Participants known to have arrived: the larger of the joins this router sent and the
    /// participants the node reported.
    pub arrived: u32,
    /// When the reservation lapses whatever has arrived.
    pub expires_at: Millis,
}

impl Reservation {
    pub fn new(size: u32, now: Millis, ttl_ms: u64) -> Self {
        Reservation {
            size,
            arrived: 0,
            expires_at: now.saturating_add(ttl_ms),
        }
    }

    /// Participants still expected.
    pub fn outstanding(&self) -> u32 {
        self.size.saturating_sub(self.arrived)
    }

    /// True once every expected participant arrived or the time is up.
    pub fn is_done(&self, now: Millis) -> bool {
        self.outstanding() == 0 || now >= self.expires_at
    }

    /// Records that at least `arrived` participants are in the room; returns how much the
    /// outstanding amount dropped.
    pub fn observe(&mut self, arrived: u32) -> u32 {
        let before = self.outstanding();
        self.arrived = self.arrived.max(arrived);
        before - self.outstanding()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hint_beats_history_beats_default() {
        assert_eq!(expected_size(Some(4), Some(30), 10), (4, SizeSource::Hint));
        assert_eq!(expected_size(None, Some(30), 10), (30, SizeSource::History));
        assert_eq!(expected_size(None, None, 10), (10, SizeSource::Default));
        assert_eq!(expected_size(None, Some(0), 10), (10, SizeSource::Default));
    }

    #[test]
    fn names_match_the_serialized_form() {
        for s in [SizeSource::Hint, SizeSource::History, SizeSource::Default] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }

    #[test]
    fn a_guess_lapses_sooner_than_a_known_size() {
        assert_eq!(SizeSource::Hint.ttl_ms(300_000, 60_000), 300_000);
        assert_eq!(SizeSource::History.ttl_ms(300_000, 60_000), 300_000);
        assert_eq!(SizeSource::Default.ttl_ms(300_000, 60_000), 60_000);
    }

    #[test]
    fn arrivals_consume_the_reservation_once() {
        let mut r = Reservation::new(5, 1_000, 60_000);
        assert_eq!(r.observe(2), 2);
        assert_eq!(r.observe(1), 0, "a lower report does not un-arrive anyone");
        assert_eq!(r.observe(9), 3);
        assert_eq!(r.outstanding(), 0);
        assert!(r.is_done(1_001));
    }

    #[test]
    fn reservations_expire() {
        let r = Reservation::new(5, 1_000, 60_000);
        assert!(!r.is_done(60_999));
        assert!(r.is_done(61_000));
    }
}
