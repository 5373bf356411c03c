//! User logins: verifies the bearer JWT a user presents at the front door or `POST /v1/login`
//! (HS256 secret, or RS256/ES256 public key) and decides whether it admits them to a room.
//!
//! Claims: `sub` (the user), `exp`, `room` (a room id, or `"*"` for any room), optional
//! `nbf` (not valid before), `region` (a placement hint) and `size` (expected room size). A
//! wrong signature, a malformed, expired or not yet valid token, or none at all is `401`; a
//! valid token for another room is `403`.

use std::time::Duration;

use http::HeaderMap;
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::{JwtAlgorithm, JwtConfig};
use crate::room::{Normalization, RoomKey};

/// Longest token accepted, in bytes (a JWT is a header line; anything longer is abuse).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims of a user token.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct UserClaims {
    pub sub: String,
    pub exp: u64,
    /// A room id, or `"*"` for every room.
    pub room: String,
    /// A hint: not a string, it is left out (as an invalid one is, where it is used).
    #[serde(default, deserialize_with = "lenient")]
    pub region: Option<String>,
    /// A hint: not a whole number of participants (negative, fractional, a string), it is
    /// left out rather than the whole token refused.
    #[serde(default, deserialize_with = "lenient")]
    pub size: Option<u32>,
}

/// An optional claim that is left out (`None`) when it is not of its type: a hint the
/// token's issuer got wrong must not refuse the user.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// Why a user was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserAuthError {
    #[error("a user token is required (Authorization: Bearer ...)")]
    Missing,
    #[error("invalid user token: {0}")]
    Invalid(String),
    #[error("the user token is not valid for this room")]
    WrongRoom,
}

/// Verifies user tokens with one configured key.
#[derive(Clone)]
pub struct UserVerifier {
    key: DecodingKey,
    validation: Validation,
    query_param: String,
}

impl std::fmt::Debug for UserVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserVerifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

/// The bearer token of an `Authorization: Bearer <token>` header, if the request has one:
/// the user's token when the router reads user tokens (another scheme is not).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
}

impl UserVerifier {
    /// Builds the verifier; the error says what is wrong with the key.
    pub fn from_config(c: &JwtConfig) -> Result<UserVerifier, String> {
        let pem = || -> Result<Vec<u8>, String> {
            let path = c
                .public_key_file
                .as_ref()
                .ok_or("public_key_file is required for RS256 and ES256")?;
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let (alg, key) = match c.algorithm {
            JwtAlgorithm::HS256 => {
                if c.secret.len() < 32 {
                    return Err("secret must be at least 32 characters for HS256 (or set ROOMROUTER_JWT_SECRET)".into());
                }
                (
                    Algorithm::HS256,
                    DecodingKey::from_secret(c.secret.as_bytes()),
                )
            }
            JwtAlgorithm::RS256 => {
                let pem = pem()?;
                // jsonwebtoken only unwraps the PEM here and parses the key at each token:
                // a private key, or anything else in the file, would pass and then refuse
                // every user. Parsed once now, so that `check-config` says so.
                rsa_public_key(&pem)?;
                (
                    Algorithm::RS256,
                    DecodingKey::from_rsa_pem(&pem).map_err(|e| format!("public_key_file: {e}"))?,
                )
            }
            JwtAlgorithm::ES256 => {
                let key = DecodingKey::from_ec_pem(&pem()?)
                    .map_err(|e| format!("public_key_file: {e}"))?;
                // The verifier is built (and the point parsed, on P-256) only at a token.
                if jsonwebtoken::crypto::verify("AA", b"probe", &key, Algorithm::ES256).is_err() {
                    return Err("public_key_file: not a P-256 public key (ES256 needs one)".into());
                }
                (Algorithm::ES256, key)
            }
        };
        Ok(UserVerifier::new(alg, key, c.leeway, &c.query_param).expecting(&c.audience, &c.issuer))
    }

    /// Requires tokens to carry an `aud` among `audience` and an `iss` among `issuer`
    /// (each unless empty). A token without the claim is refused: an identity provider's
    /// tokens for another service, with no audience of ours, must not pass for ours.
    pub fn expecting(mut self, audience: &[String], issuer: &[String]) -> Self {
        let mut required = vec!["exp", "sub"];
        if !audience.is_empty() {
            self.validation.set_audience(audience);
            // (`new` turned the check off for tokens with no audience configured.)
            self.validation.validate_aud = true;
            required.push("aud");
        }
        if !issuer.is_empty() {
            self.validation.set_issuer(issuer);
            required.push("iss");
        }
        self.validation.set_required_spec_claims(&required);
        self
    }

    /// A verifier for one algorithm and key (the algorithm is pinned: no `alg` confusion).
    pub fn new(alg: Algorithm, key: DecodingKey, leeway: Duration, query_param: &str) -> Self {
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        // A token not valid before some time is refused until then (within the leeway);
        // `nbf` stays optional.
        validation.validate_nbf = true;
        validation.leeway = leeway.as_secs();
        validation.validate_aud = false;
        UserVerifier {
            key,
            validation,
            query_param: query_param.to_string(),
        }
    }

    /// The token a request carries: the bearer token, else the configured query parameter.
    /// An `Authorization` header of another scheme (`Basic` from a site-wide proxy in front
    /// of the router) is not the user's token and does not hide the query's.
    pub fn token_of<'a>(&self, headers: &'a HeaderMap, query: Option<&'a str>) -> Option<String> {
        if let Some(token) = bearer_token(headers) {
            return Some(token.to_string());
        }
        if self.query_param.is_empty() {
            return None;
        }
        url::form_urlencoded::parse(query?.as_bytes())
            .find(|(k, _)| k == self.query_param.as_str())
            .map(|(_, v)| v.into_owned())
    }

    /// Verifies signature and expiry only.
    pub fn verify(&self, token: &str) -> Result<UserClaims, UserAuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(UserAuthError::Invalid("token too long".into()));
        }
        decode::<UserClaims>(token, &self.key, &self.validation)
            .map(|d| d.claims)
            .map_err(|e| UserAuthError::Invalid(e.to_string()))
    }

    /// Verifies `token` and checks that it admits the user to `room`. The token's room goes
    /// through the same normalization as every other room id, so "Room" in a token admits to
    /// "room" exactly when the router treats them as one room.
    pub fn admit(
        &self,
        token: Option<&str>,
        room: &RoomKey,
        norm: Normalization,
    ) -> Result<UserClaims, UserAuthError> {
        let claims = self.verify(token.ok_or(UserAuthError::Missing)?)?;
        if admits(&claims, room, norm) {
            Ok(claims)
        } else {
            Err(UserAuthError::WrongRoom)
        }
    }
}

/// Whether verified `claims` admit their user to `room`: a room claim of `"*"`, or one that
/// normalizes to `room`.
pub fn admits(claims: &UserClaims, room: &RoomKey, norm: Normalization) -> bool {
    claims.room == "*"
        || RoomKey::parse(&claims.room, norm).is_ok_and(|k| k.as_str() == room.as_str())
}

/// Whether `pem` holds an RSA public key (`PUBLIC KEY` or `RSA PUBLIC KEY`).
fn rsa_public_key(pem: &[u8]) -> Result<(), String> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    let text = std::str::from_utf8(pem).map_err(|_| "public_key_file: not PEM text")?;
    rsa::RsaPublicKey::from_public_key_pem(text.trim())
        .map(drop)
        .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(text.trim()).map(drop))
        .map_err(|_| {
            "public_key_file: not an RSA public key (PEM `PUBLIC KEY` or `RSA PUBLIC KEY`; RS256 needs one)"
                .to_string()
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde::Serialize;

    #[derive(Serialize)]
    struct C<'a> {
        sub: &'a str,
        exp: u64,
        room: &'a str,
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn verifier() -> UserVerifier {
        UserVerifier::from_config(&JwtConfig {
            secret: SECRET.into(),
            leeway: Duration::from_secs(5),
            ..JwtConfig::default()
        })
        .unwrap()
    }

    fn token(room: &str, exp: u64, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &C {
                sub: "alice",
                exp,
                room,
            },
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn key(s: &str) -> RoomKey {
        RoomKey::parse(s, Normalization::Lowercase).unwrap()
    }

    #[test]
    fn the_room_claim_is_normalized_like_every_room() {
        let v = verifier();
        let t = token("Daily-Standup", now() + 60, SECRET);
        let c = v
            .admit(Some(&t), &key("daily-standup"), Normalization::Lowercase)
            .unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(
            v.admit(Some(&t), &key("other"), Normalization::Lowercase),
            Err(UserAuthError::WrongRoom)
        );
    }

    #[test]
    fn leeway_admits_slightly_expired_tokens_only() {
        let v = verifier();
        let r = key("r");
        let t = token("r", now() - 2, SECRET);
        assert!(v.admit(Some(&t), &r, Normalization::Lowercase).is_ok());
        let t = token("r", now() - 30, SECRET);
        assert!(matches!(
            v.admit(Some(&t), &r, Normalization::Lowercase),
            Err(UserAuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_token_is_refused_before_its_nbf_beyond_the_leeway() {
        let v = verifier();
        let r = key("r");
        let at = |nbf: u64| {
            let claims =
                serde_json::json!({"sub": "a", "exp": now() + 600, "room": "r", "nbf": nbf});
            let t = encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap();
            v.admit(Some(&t), &r, Normalization::Lowercase)
        };
        assert!(at(now() - 60).is_ok());
        assert!(at(now() + 2).is_ok(), "within the 5 s leeway");
        assert!(matches!(at(now() + 120), Err(UserAuthError::Invalid(_))));
    }

    #[test]
    fn other_algorithms_are_refused_even_with_the_right_secret() {
        let v = verifier();
        let t = encode(
            &Header::new(Algorithm::HS384),
            &C {
                sub: "a",
                exp: now() + 60,
                room: "*",
            },
            &EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap();
        assert!(v.verify(&t).is_err());
        assert!(v.verify(&"x".repeat(MAX_TOKEN_BYTES + 1)).is_err());
    }

    #[test]
    fn an_audience_or_issuer_set_is_required_of_every_token() {
        let token = |claims: serde_json::Value| {
            encode(
                &Header::default(),
                &claims,
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        let exp = now() + 60;
        let ours = token(
            serde_json::json!({"sub": "ann", "room": "*", "exp": exp, "aud": "roomrouter", "iss": "https://idp"}),
        );
        let other_service = token(
            serde_json::json!({"sub": "ann", "room": "*", "exp": exp, "aud": "billing", "iss": "https://idp"}),
        );
        let no_audience =
            token(serde_json::json!({"sub": "ann", "room": "*", "exp": exp, "iss": "https://idp"}));
        let other_issuer = token(
            serde_json::json!({"sub": "ann", "room": "*", "exp": exp, "aud": ["x", "roomrouter"], "iss": "https://evil"}),
        );
        // Unset (the default): neither is checked.
        let plain = verifier();
        for t in [&ours, &other_service, &no_audience, &other_issuer] {
            assert!(plain.verify(t).is_ok());
        }
        let strict = UserVerifier::from_config(&JwtConfig {
            secret: SECRET.into(),
            audience: vec!["roomrouter".into(), "meet".into()],
            issuer: vec!["https://idp".into()],
            ..JwtConfig::default()
        })
        .unwrap();
        assert!(strict.verify(&ours).is_ok());
        for t in [&other_service, &no_audience, &other_issuer] {
            assert!(strict.verify(t).is_err());
        }
        // `exp` and `sub` are still required.
        let no_sub = token(
            serde_json::json!({"room": "*", "exp": exp, "aud": "meet", "iss": "https://idp"}),
        );
        assert!(strict.verify(&no_sub).is_err());
    }

    #[test]
    fn short_secrets_and_missing_keys_are_config_errors() {
        assert!(UserVerifier::from_config(&JwtConfig::default()).is_err());
        let c = JwtConfig {
            algorithm: JwtAlgorithm::RS256,
            ..JwtConfig::default()
        };
        assert!(UserVerifier::from_config(&c)
            .unwrap_err()
            .contains("public_key_file"));
    }

    #[test]
    fn tokens_come_from_the_header_or_the_query() {
        let v = verifier();
        let mut h = HeaderMap::new();
        assert_eq!(
            v.token_of(&h, Some("access_token=abc&x=1")).as_deref(),
            Some("abc")
        );
        h.insert(http::header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(
            v.token_of(&h, Some("access_token=abc")).as_deref(),
            Some("xyz")
        );
        h.insert(http::header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(v.token_of(&h, None), None);
        // Another scheme's header (a site-wide proxy's Basic auth) leaves the query's token.
        assert_eq!(
            v.token_of(&h, Some("access_token=abc")).as_deref(),
            Some("abc")
        );
    }
}
