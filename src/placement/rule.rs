//! Choice rules: how the final node is picked among the eligible candidates.
//!
//! Every rule is deterministic (same room, nodes and loads give the same node on every router)
//! and runs in one pass over the candidates without allocating. Every rule ranks candidates by
//! weighted rendezvous hashing; they differ in how load enters the final pick. The default is
//! [`ChoiceRule::LeastLoaded`]: the placement simulator (`roomrouter simulate`) finds it best or
//! within 2% of the best on all 36 standard checks (four workloads, three hint modes, three
//! figures; mean of seeds 1-8) once expected-size reservations are counted and shared between
//! the routers (they stop the herding plain least-loaded suffers from). See BENCHMARKS.md,
//! section 3.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// Which candidate a new room goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChoiceRule {
    /// The less loaded of the two best-ranked candidates (ties: the better ranked).
    TopTwo,
    /// The best-ranked candidate (plain weighted rendezvous hashing).
    Rendezvous,
    /// The least loaded candidate once the room's expected load is counted on it (ties:
    /// the better ranked). Default: with reservations counted in the load it balances best
    /// in simulation.
    #[default]
    LeastLoaded,
}

impl ChoiceRule {
    /// All rules, for the simulator and tests.
    pub const ALL: [ChoiceRule; 3] = [
        ChoiceRule::TopTwo,
        ChoiceRule::Rendezvous,
        ChoiceRule::LeastLoaded,
    ];

    /// The config name of the rule.
    pub fn name(self) -> &'static str {
        match self {
            ChoiceRule::TopTwo => "top_two",
            ChoiceRule::Rendezvous => "rendezvous",
            ChoiceRule::LeastLoaded => "least_loaded",
        }
    }
}

/// One ranked candidate: its index in the node slice, its rendezvous score (the crate's
/// logarithmic-method value, see `placement::raw_score`: higher is better) and its
/// utilization with the room's expected load added (`Hints::expected_load`), which is what
/// "less loaded" means to every rule.
#[derive(Debug, Clone, Copy)]
pub struct Ranked {
    pub index: usize,
    /// `ln(h)/w`, in (-inf, 0]: ranks and bounds the pruning.
    pub raw: f64,
    pub tiebreak: u64,
    pub util: f64,
}

impl Ranked {
    /// Rank order: higher score first, then the node hash as a deterministic tie-break.
    fn outranks(&self, other: &Ranked) -> bool {
        match self.raw.partial_cmp(&other.raw) {
            Some(Ordering::Greater) => true,
            Some(Ordering::Less) => false,
            _ => self.tiebreak > other.tiebreak,
        }
    }
}

/// Whether a candidate can still matter to the rule, known before scoring it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Bar {
    /// It matters: score it.
    Take,
    /// It cannot matter (e.g. more loaded than the least loaded so far).
    Skip,
    /// It matters only if its raw score `ln(h)/w` beats this one.
    Score(f64),
}

/// Keeps what a rule needs while candidates stream past: the best two by rank and the least
/// loaded one. O(1) per candidate, no allocation.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tracker {
    best: Option<Ranked>,
    second: Option<Ranked>,
    least: Option<Ranked>,
}

impl Tracker {
    #[inline]
    pub fn offer(&mut self, c: Ranked) {
        match self.best {
            None => self.best = Some(c),
            Some(b) if c.outranks(&b) => {
                self.second = self.best;
                self.best = Some(c);
            }
            Some(_) => match self.second {
                Some(s) if !c.outranks(&s) => {}
                _ => self.second = Some(c),
            },
        }
        match self.least {
            Some(l) if c.util > l.util || (c.util == l.util && !c.outranks(&l)) => {}
            _ => self.least = Some(c),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.best.is_none()
    }

    /// What a candidate with utilization `util` must beat to matter to `rule`.
    #[inline]
    pub fn bar(&self, rule: ChoiceRule, util: f64) -> Bar {
        match rule {
            ChoiceRule::TopTwo => self.second.map_or(Bar::Take, |s| Bar::Score(s.raw)),
            ChoiceRule::Rendezvous => self.best.map_or(Bar::Take, |b| Bar::Score(b.raw)),
            ChoiceRule::LeastLoaded => match self.least {
                None => Bar::Take,
                Some(l) if util < l.util => Bar::Take,
                Some(l) if util > l.util => Bar::Skip,
                Some(l) => Bar::Score(l.raw),
            },
        }
    }

    /// The two best-ranked candidates seen.
    pub fn top_two(&self) -> (Option<Ranked>, Option<Ranked>) {
        (self.best, self.second)
    }

    /// The candidate the rule picks.
    pub fn pick(&self, rule: ChoiceRule) -> Option<Ranked> {
        match rule {
            ChoiceRule::Rendezvous => self.best,
            ChoiceRule::LeastLoaded => self.least,
            ChoiceRule::TopTwo => match (self.best, self.second) {
                (Some(b), Some(s)) if s.util < b.util => Some(s),
                (b, _) => b,
            },
        }
    }
}
