//! The ticket: a short-lived HS256 JWT that tells a node "the router sent this user to you
//! for this room". Any node verifies it with a stock JWT library and the shared
//! `tickets.secret`, so users cannot skip the router and land on the wrong node.

use std::time::Duration;

use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::Rng;
use serde::{Deserialize, Serialize};

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

/// Signs (and, for nodes and tests, verifies) tickets.
#[derive(Clone)]
pub struct TicketIssuer {
    enc: EncodingKey,
    dec: DecodingKey,
    ttl: Duration,
}

impl std::fmt::Debug for TicketIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketIssuer")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid ticket: {0}")]
pub struct TicketError(String);

impl TicketIssuer {
    pub fn new(secret: &str, ttl: Duration) -> TicketIssuer {
        TicketIssuer {
            enc: EncodingKey::from_secret(secret.as_bytes()),
            dec: DecodingKey::from_secret(secret.as_bytes()),
            ttl,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Issues a ticket for `user` to join `room` on `node`; `now_secs` is Unix time.
    pub fn issue(&self, room: &str, node: &str, user: &str, now_secs: u64) -> String {
        let claims = TicketClaims {
            room: room.to_string(),
            node: node.to_string(),
            sub: user.to_string(),
            iat: now_secs,
            exp: now_secs + self.ttl.as_secs().max(1),
            jti: hex::encode(rand::rng().random::<[u8; 16]>()),
        };
        // HS256 signing of a serializable struct cannot fail.
        encode(&Header::new(Algorithm::HS256), &claims, &self.enc).unwrap_or_default()
    }

    /// Verifies signature and expiry (60 s leeway) and returns the claims.
    pub fn verify(&self, token: &str) -> Result<TicketClaims, TicketError> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_required_spec_claims(&["exp", "sub"]);
        v.leeway = 60;
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
    }

    #[test]
    fn wrong_secret_and_expired_tickets_fail() {
        let t = TicketIssuer::new(&"s".repeat(32), Duration::from_secs(60));
        let other = TicketIssuer::new(&"x".repeat(32), Duration::from_secs(60));
        assert!(other.verify(&t.issue("r", "n", "u", now())).is_err());
        assert!(t.verify(&t.issue("r", "n", "u", now() - 3600)).is_err());
    }
}
