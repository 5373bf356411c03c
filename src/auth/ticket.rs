//! The ticket: a short-lived HS256 JWT that tells a node "the router sent this user to you
//! for this room". Any node verifies it with a stock JWT library and the shared
//! `tickets.secret`, so users cannot skip the router and land on the wrong node.

use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Every ticket's JOSE header, `{"typ":"JWT","alg":"HS256"}`, base64url-encoded.
const HEADER_B64: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9";

/// Ticket claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketClaims {
    pub room: String,
    pub node: String,
    /// The user.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    /// Unique id, so a node can refuse replays.
    pub jti: String,
}

/// The claims as signed: the same fields, borrowed (signing copies no string).
#[derive(Serialize)]
struct ClaimsRef<'a> {
    room: &'a str,
    node: &'a str,
    sub: &'a str,
    iat: u64,
    exp: u64,
    jti: &'a str,
}

/// The clock skew nodes forgive past a ticket's `exp` unless told otherwise
/// (`tickets.leeway`): the usual default of JWT libraries.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);

fn ttl_secs(ttl: Duration) -> u64 {
    ttl.as_secs().max(1)
}

/// A leeway in the whole seconds JWT times count in, rounded up.
fn leeway_secs(leeway: Duration) -> u64 {
    leeway.as_secs() + u64::from(leeway.subsec_nanos() > 0)
}

/// How long after it was issued a ticket with lifetime `ttl` may still be accepted by a node
/// verifying with `leeway`: its whole-second life, the leeway, and one second more because
/// `iat` is the issue time rounded down. A room must keep its pin this long after its last
/// join, or a user still holding a valid ticket may arrive at a node the room has left (a
/// split).
pub fn accepted_for(ttl: Duration, leeway: Duration) -> Duration {
    Duration::from_secs(ttl_secs(ttl) + leeway_secs(leeway) + 1)
}

/// Signs (and, for nodes and tests, verifies) tickets.
///
/// Signing is on every join's path, so it is done here rather than by `jsonwebtoken`'s
/// `encode`, which re-keys the HMAC, serializes the constant header and copies every claim
/// on each call: the keyed HMAC state is computed once and cloned per ticket, the header is
/// a constant, and the claims are serialized from borrowed strings straight into the
/// token. The result is a standard HS256 JWT; [`TicketIssuer::verify`] (and any node) checks
/// it with a stock JWT library.
#[derive(Clone)]
pub struct TicketIssuer {
    mac: Hmac<Sha256>,
    dec: DecodingKey,
    ttl: Duration,
    /// What [`TicketIssuer::verify`] forgives past `exp`, in seconds.
    leeway_secs: u64,
}

impl std::fmt::Debug for TicketIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketIssuer")
            .field("ttl", &self.ttl)
            .field("leeway_secs", &self.leeway_secs)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid ticket: {0}")]
pub struct TicketError(String);

impl TicketIssuer {
    /// Issues tickets living `ttl`; verifies them with [`DEFAULT_LEEWAY`].
    pub fn new(secret: &str, ttl: Duration) -> TicketIssuer {
        TicketIssuer {
            // HMAC takes a key of any length.
            mac: Hmac::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length"),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            ttl,
            leeway_secs: leeway_secs(DEFAULT_LEEWAY),
        }
    }

    /// Verifies with `leeway` past `exp` (rounded up to whole seconds) instead.
    pub fn with_leeway(mut self, leeway: Duration) -> TicketIssuer {
        self.leeway_secs = leeway_secs(leeway);
        self
    }

    /// A ticket's life in whole seconds, as its `exp` counts it: at least 1 (a sub-second
    /// `tickets.ttl` would otherwise issue tickets already expired).
    pub fn ttl_secs(&self) -> u64 {
        ttl_secs(self.ttl)
    }

    /// Issues a ticket for `user` to join `room` on `node`; `now_secs` is Unix time.
    pub fn issue(&self, room: &str, node: &str, user: &str, now_secs: u64) -> String {
        let mut jti = [0u8; 32];
        hex::encode_to_slice(rand::rng().random::<[u8; 16]>(), &mut jti)
            .expect("16 bytes are 32 hex digits");
        let claims = ClaimsRef {
            room,
            node,
            sub: user,
            iat: now_secs,
            exp: now_secs + self.ttl_secs(),
            jti: std::str::from_utf8(&jti).expect("hex digits are ASCII"),
        };
        // Serializing borrowed strings and integers cannot fail.
        let payload = serde_json::to_vec(&claims).unwrap_or_default();
        let mut token = String::with_capacity(HEADER_B64.len() + payload.len() * 4 / 3 + 50);
        token.push_str(HEADER_B64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
        let mut mac = self.mac.clone();
        mac.update(token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(mac.finalize().into_bytes(), &mut token);
        token
    }

    /// The leeway [`TicketIssuer::verify`] forgives past `exp`, in whole seconds: a ticket
    /// whose `exp` is further in the past than this is refused.
    pub fn leeway_secs(&self) -> u64 {
        self.leeway_secs
    }

    /// Verifies signature and expiry (with the issuer's leeway) and returns the claims.
    pub fn verify(&self, token: &str) -> Result<TicketClaims, TicketError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        v.leeway = self.leeway_secs;
        decode::<TicketClaims>(token, &self.dec, &v)
            .map(|d| d.claims)
            .map_err(|e| TicketError(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn a_sub_second_ttl_lives_one_second_in_the_ticket_and_in_what_login_says() {
        let t = TicketIssuer::new(&"s".repeat(32), Duration::from_millis(500));
        let c = t
            .verify(&t.issue("room-1", "node-a", "alice", now()))
            .unwrap();
        assert_eq!(c.exp - c.iat, 1);
        assert_eq!(t.ttl_secs(), 1);
    }

    #[test]
    fn tickets_round_trip_and_carry_the_claims() {
        let t = TicketIssuer::new(&"s".repeat(32), Duration::from_secs(60));
        let tok = t.issue("room-1", "node-a", "alice", now());
        let c = t.verify(&tok).unwrap();
        assert_eq!(
            (c.room.as_str(), c.node.as_str(), c.sub.as_str()),
            ("room-1", "node-a", "alice")
        );
        assert_eq!(c.exp - c.iat, 60);
        assert_eq!(c.jti.len(), 32);
        assert_ne!(
            c.jti,
            t.verify(&t.issue("room-1", "node-a", "alice", now()))
                .unwrap()
                .jti
        );
    }

    #[test]
    fn tickets_are_standard_hs256_jwts() {
        let secret = "k".repeat(40);
        let tok = TicketIssuer::new(&secret, Duration::from_secs(60)).issue(
            "room \"1\" é",
            "node-a",
            "alice",
            now(),
        );
        let header = jsonwebtoken::decode_header(&tok).unwrap();
        assert_eq!(header.alg, Algorithm::HS256);
        assert_eq!(header.typ.as_deref(), Some("JWT"));
        // Checked by jsonwebtoken alone, as a node would.
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        let c = decode::<TicketClaims>(&tok, &DecodingKey::from_secret(secret.as_bytes()), &v)
            .unwrap()
            .claims;
        assert_eq!(c.room, "room \"1\" é");
        // One changed byte of the claims breaks the signature.
        let mut parts: Vec<String> = tok.split('.').map(str::to_string).collect();
        let mut claims = URL_SAFE_NO_PAD.decode(&parts[1]).unwrap();
        let at = claims.iter().position(|&b| b == b'a').unwrap();
        claims[at] = b'b';
        parts[1] = URL_SAFE_NO_PAD.encode(&claims);
        assert!(TicketIssuer::new(&secret, Duration::from_secs(60))
            .verify(&parts.join("."))
            .is_err());
    }

    #[test]
    fn wrong_secret_and_expired_tickets_fail() {
        let t = TicketIssuer::new(&"s".repeat(32), Duration::from_secs(60));
        let other = TicketIssuer::new(&"x".repeat(32), Duration::from_secs(60));
        assert!(other.verify(&t.issue("r", "n", "u", now())).is_err());
        assert!(t.verify(&t.issue("r", "n", "u", now() - 3600)).is_err());
    }

    #[test]
    fn a_ticket_is_accepted_for_its_life_plus_the_leeway_and_no_longer() {
        let ttl = Duration::from_secs(10);
        let strict = TicketIssuer::new(&"s".repeat(32), ttl).with_leeway(Duration::ZERO);
        let stock = TicketIssuer::new(&"s".repeat(32), ttl);
        // Issued 40 s ago: expired 30 s ago, inside the stock 60 s leeway only.
        let old = strict.issue("r", "n", "u", now() - 40);
        assert!(strict.verify(&old).is_err());
        assert!(stock.verify(&old).is_ok());
        // The window the router keeps an ended room's pin for covers both.
        assert_eq!(accepted_for(ttl, Duration::ZERO), Duration::from_secs(11));
        assert_eq!(accepted_for(ttl, DEFAULT_LEEWAY), Duration::from_secs(71));
        // A part second of leeway is forgiven as a whole one, as JWT times count.
        assert_eq!(
            accepted_for(Duration::from_millis(300), Duration::from_millis(1)),
            Duration::from_secs(3)
        );
    }
}
