//! Room keys: the one way to turn user input into the key a room is stored under.
//!
//! Every path that names a room (front door, login, placement API, node reports) goes through
//! [`RoomKey::parse`] or [`RoomKey::from_encoded`], so no two paths can disagree about which
//! room a string means and split it across nodes ("Room" and "room" on different shards is
//! the classic Jitsi bug). A `RoomKey` also carries its stable placement hash, computed once.

use std::borrow::Cow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use crate::placement::hash::room_hash;

/// Longest room id accepted, in bytes of UTF-8 after decoding and normalization.
pub const MAX_ROOM_BYTES: usize = 256;

/// How room ids are normalized before they become keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// Keys are taken byte for byte.
    None,
    /// Unicode lowercase: "Room" and "room" are the same room.
    #[default]
    Lowercase,
    /// Unicode NFKC, then lowercase: also folds full-width and compatibility forms.
    NfkcLowercase,
}

/// Why a string is not a valid room id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("room id is empty")]
    Empty,
    #[error("room id is longer than {MAX_ROOM_BYTES} bytes")]
    TooLong,
    #[error("room id is not valid UTF-8 after percent-decoding")]
    NotUtf8,
    #[error("room id contains a control character")]
    ControlChar,
    #[error("room id contains '/'")]
    Slash,
    #[error("room id \"*\" is reserved: a user token's room claim for every room")]
    Wildcard,
    #[error("room id \".\" or \"..\" is a path segment: a node's room URL ending in it would resolve to another path")]
    DotSegment,
}

/// A validated, normalized room id with its stable placement hash.
#[derive(Clone)]
pub struct RoomKey {
    name: Arc<str>,
    hash: u64,
}

impl RoomKey {
    /// Validates and normalizes a literal room id (as found in a JSON body).
    pub fn parse(raw: &str, norm: Normalization) -> Result<Self, RoomError> {
        check(raw)?;
        let normalized: Cow<'_, str> = match norm {
            Normalization::None => Cow::Borrowed(raw),
            Normalization::Lowercase => lowercase(raw),
            Normalization::NfkcLowercase => {
                // Lowercased before NFKC too: the two do not commute (U+03F9 `Ϲ` is NFKC `Σ`,
                // lowercase `σ`; its lowercase U+03F2 `ϲ` is NFKC `ς`), and each spelling of
                // a room in either case must come out as one key.
                let nfkc: String = lowercase(raw).nfkc().collect();
                Cow::Owned(lowercase(&nfkc).into_owned())
            }
        };
        // Normalization can lengthen a string or produce '/' (NFKC of U+FF0F); check again.
        if let Cow::Owned(s) = &normalized {
            check(s)?;
        }
        Ok(Self::from_valid(&normalized))
    }

    /// Percent-decodes a room id taken from a URL (path segment, query value), then parses it.
    pub fn from_encoded(raw: &str, norm: Normalization) -> Result<Self, RoomError> {
        if raw.len() > MAX_ROOM_BYTES * 3 {
            return Err(RoomError::TooLong);
        }
        let decoded = percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| RoomError::NotUtf8)?;
        Self::parse(&decoded, norm)
    }

    fn from_valid(name: &str) -> Self {
        RoomKey {
            hash: room_hash(name.as_bytes()),
            name: Arc::from(name),
        }
    }

    /// The normalized id.
    pub fn as_str(&self) -> &str {
        &self.name
    }

    /// The stable hash placement ranks nodes with (XXH3-64 of the UTF-8 bytes).
    pub fn stable_hash(&self) -> u64 {
        self.hash
    }
}

fn check(s: &str) -> Result<(), RoomError> {
    if s.is_empty() {
        return Err(RoomError::Empty);
    }
    if s.len() > MAX_ROOM_BYTES {
        return Err(RoomError::TooLong);
    }
    if s == "*" {
        return Err(RoomError::Wildcard);
    }
    if s == "." || s == ".." {
        return Err(RoomError::DotSegment);
    }
    for c in s.chars() {
        if c == '/' {
            return Err(RoomError::Slash);
        }
        if c.is_control() {
            return Err(RoomError::ControlChar);
        }
    }
    Ok(())
}

/// `s` lowercased, borrowed when lowercasing changes nothing (most room ids). The test is
/// whether any character changes under `to_lowercase`, not `is_uppercase`: titlecase letters
/// (`ǅ` U+01C5, Greek `ᾼ` U+1FBC, ...) are not uppercase but do lowercase, and a key left
/// with one would be a second key for its room (`Aǅ` lowercased to `aǆ`, `aǅ` kept).
///
/// Greek final sigma `ς` is folded to `σ`, as Unicode case folding does: `to_lowercase`
/// turns `Σ` into `ς` at the end of a word and into `σ` elsewhere, so `ΑΣ` became `ας`
/// while `ασ`, the same name in another case, stayed `ασ`: two keys for one room.
fn lowercase(s: &str) -> Cow<'_, str> {
    if s.chars().any(changes_when_lowercased) {
        let lower = s.to_lowercase();
        Cow::Owned(if lower.contains(FINAL_SIGMA) {
            lower.replace(FINAL_SIGMA, "σ")
        } else {
            lower
        })
    } else {
        Cow::Borrowed(s)
    }
}

/// U+03C2, which case folding makes `σ` (U+03C3).
const FINAL_SIGMA: char = 'ς';

#[inline]
fn changes_when_lowercased(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_uppercase()
    } else {
        c == FINAL_SIGMA || c.to_lowercase().ne(std::iter::once(c))
    }
}

impl PartialEq for RoomKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && self.name == other.name
    }
}
impl Eq for RoomKey {}

/// A concurrent map keyed by room: every pin, cache, reservation and history lookup on the
/// hot path is one. Hashed with foldhash (seeded at random per process, so room ids a
/// client picks cannot be aimed at one bucket) instead of the default SipHash: the switch
/// took about 440 instructions off a proxied request (callgrind, BENCHMARKS.md).
pub type RoomMap<V> = dashmap::DashMap<RoomKey, V, foldhash::fast::RandomState>;

impl Hash for RoomKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state)
    }
}

impl PartialOrd for RoomKey {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for RoomKey {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.name.cmp(&other.name)
    }
}

impl fmt::Debug for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoomKey({:?})", &*self.name)
    }
}
impl fmt::Display for RoomKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl Serialize for RoomKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowercase_folds_case_so_one_room_is_one_key() {
        let a = RoomKey::parse("Team-Standup", Normalization::Lowercase).unwrap();
        let b = RoomKey::parse("team-standup", Normalization::Lowercase).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.stable_hash(), b.stable_hash());
    }

    /// Titlecase letters: not `is_uppercase`, yet changed by `to_lowercase`.
    const TITLECASE: &[char] = &[
        '\u{01C5}', '\u{01C8}', '\u{01CB}', '\u{01F2}', '\u{1F88}', '\u{1F8F}', '\u{1F98}',
        '\u{1F9F}', '\u{1FA8}', '\u{1FAF}', '\u{1FBC}', '\u{1FCC}', '\u{1FFC}',
    ];

    #[test]
    fn titlecase_letters_fold_like_every_other_case() {
        for mode in [Normalization::Lowercase, Normalization::NfkcLowercase] {
            for &c in TITLECASE {
                assert!(!c.is_uppercase(), "{c:?} is the case the fast path missed");
                let key = |s: &str| RoomKey::parse(s, mode).unwrap();
                let lower: String = c.to_lowercase().collect();
                // "Aǅ", "aǅ" and "aǆ" are one room.
                let want = key(&format!("a{lower}"));
                assert_eq!(key(&format!("A{c}")), want, "{mode:?} A{c}");
                assert_eq!(key(&format!("a{c}")), want, "{mode:?} a{c}");
                assert_eq!(key(&format!("{c}")), key(&lower), "{mode:?} {c}");
            }
        }
    }

    /// Over every character of planes 0 and 1 (where every case mapping and every
    /// compatibility form that lowercases is), alone and after an ASCII letter of either
    /// case: a key parsed again is the same key, and the string's lowercase spelling names
    /// the same room. A failure here is two keys for one room.
    #[test]
    fn normalization_is_idempotent_and_case_blind_for_every_char() {
        for mode in [Normalization::Lowercase, Normalization::NfkcLowercase] {
            for c in (0..=0x1FFFFu32).filter_map(char::from_u32) {
                for s in [format!("{c}"), format!("a{c}"), format!("A{c}")] {
                    let Ok(k) = RoomKey::parse(&s, mode) else {
                        continue;
                    };
                    let again = RoomKey::parse(k.as_str(), mode).unwrap();
                    assert_eq!(again, k, "{mode:?}: {s:?} -> {k:?} -> {again:?}");
                    let lower = RoomKey::parse(&s.to_lowercase(), mode);
                    assert_eq!(lower.as_ref(), Ok(&k), "{mode:?}: {s:?} vs its lowercase");
                }
            }
        }
    }

    #[test]
    fn the_two_lowercase_sigmas_are_one_room() {
        for mode in [Normalization::Lowercase, Normalization::NfkcLowercase] {
            let key = |s: &str| RoomKey::parse(s, mode).unwrap();
            // `to_lowercase` gives `ας` for `ΑΣ` (a final sigma), and leaves `ασ` alone.
            assert_eq!(key("ΑΣ"), key("ασ"), "{mode:?}");
            assert_eq!(key("ας"), key("ασ"), "{mode:?}");
            assert_eq!(key("ΟΔΥΣΣΕΥΣ"), key("οδυσσευς"), "{mode:?}");
            assert_eq!(key("ασ").as_str(), "ασ", "{mode:?}");
        }
    }

    #[test]
    fn none_keeps_case() {
        let a = RoomKey::parse("Room", Normalization::None).unwrap();
        assert_eq!(a.as_str(), "Room");
    }

    #[test]
    fn nfkc_folds_full_width_forms() {
        let a = RoomKey::parse("ＲＯＯＭ", Normalization::NfkcLowercase).unwrap();
        assert_eq!(a.as_str(), "room");
        // Without NFKC the full-width form stays distinct.
        let b = RoomKey::parse("ＲＯＯＭ", Normalization::Lowercase).unwrap();
        assert_ne!(b.as_str(), "room");
    }

    #[test]
    fn nfkc_cannot_smuggle_a_slash() {
        assert_eq!(
            RoomKey::parse("a\u{FF0F}b", Normalization::NfkcLowercase),
            Err(RoomError::Slash)
        );
    }

    #[test]
    fn the_wildcard_of_a_token_is_no_room() {
        for norm in [
            Normalization::None,
            Normalization::Lowercase,
            Normalization::NfkcLowercase,
        ] {
            assert_eq!(RoomKey::parse("*", norm), Err(RoomError::Wildcard));
            assert_eq!(RoomKey::from_encoded("%2A", norm), Err(RoomError::Wildcard));
            assert!(RoomKey::parse("**", norm).is_ok());
            assert!(RoomKey::parse("a*", norm).is_ok());
        }
        // Nor does NFKC make one (U+FF0A FULLWIDTH ASTERISK).
        assert_eq!(
            RoomKey::parse("\u{FF0A}", Normalization::NfkcLowercase),
            Err(RoomError::Wildcard)
        );
    }

    #[test]
    fn a_dot_segment_is_no_room() {
        for norm in [
            Normalization::None,
            Normalization::Lowercase,
            Normalization::NfkcLowercase,
        ] {
            for dots in [".", ".."] {
                assert_eq!(RoomKey::parse(dots, norm), Err(RoomError::DotSegment));
            }
            assert_eq!(
                RoomKey::from_encoded("%2E%2e", norm),
                Err(RoomError::DotSegment)
            );
            for ok in ["...", ".a", "a.", "a..b"] {
                assert!(RoomKey::parse(ok, norm).is_ok(), "{ok}");
            }
        }
        // Nor does NFKC make one (U+FF0E FULLWIDTH FULL STOP).
        assert_eq!(
            RoomKey::parse("\u{FF0E}\u{FF0E}", Normalization::NfkcLowercase),
            Err(RoomError::DotSegment)
        );
    }

    #[test]
    fn percent_decoding_happens_before_validation() {
        let a = RoomKey::from_encoded("daily%20sync", Normalization::None).unwrap();
        assert_eq!(a.as_str(), "daily sync");
        assert_eq!(
            RoomKey::from_encoded("a%2Fb", Normalization::None),
            Err(RoomError::Slash)
        );
        assert_eq!(
            RoomKey::from_encoded("a%0Ab", Normalization::None),
            Err(RoomError::ControlChar)
        );
        assert_eq!(
            RoomKey::from_encoded("%FF", Normalization::None),
            Err(RoomError::NotUtf8)
        );
    }

    #[test]
    fn length_limits() {
        assert_eq!(
            RoomKey::parse("", Normalization::None),
            Err(RoomError::Empty)
        );
        let max = "x".repeat(MAX_ROOM_BYTES);
        assert!(RoomKey::parse(&max, Normalization::None).is_ok());
        let over = "x".repeat(MAX_ROOM_BYTES + 1);
        assert_eq!(
            RoomKey::parse(&over, Normalization::None),
            Err(RoomError::TooLong)
        );
    }
}
