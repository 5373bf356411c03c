//! Admin and node bearer tokens, compared in constant time.
//!
//! Admins present one of `auth.admin_tokens`. A node presents its own token when
//! `auth.node_tokens` lists it, else the cluster-wide `auth.node_token`. Browsers may send an
//! admin token as the password of HTTP Basic auth (for the dashboard).

use std::collections::HashMap;

use base64::Engine;
use http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::config::AuthConfig;

/// What a request proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    None,
    Admin,
    /// A node token valid for the node id it was checked against.
    Node,
    /// A token was presented but matched nothing.
    Invalid,
    /// One of the router's tokens, but not one for this: a node's token on an admin
    /// endpoint, another node's token, an admin token where only the node may act (`403`:
    /// the caller is known, the act is not theirs).
    Elsewhere,
}

/// The configured tokens.
#[derive(Clone)]
pub struct Tokens {
    admin: Vec<Vec<u8>>,
    cluster_node: Option<Vec<u8>>,
    per_node: HashMap<String, Vec<u8>>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("admin", &self.admin.len())
            .field("cluster_node", &self.cluster_node.is_some())
            .field("per_node", &self.per_node.len())
            .finish()
    }
}

fn eq(a: &[u8], b: &[u8]) -> bool {
    // ct_eq on slices of different lengths returns false without comparing contents.
    a.ct_eq(b).into()
}

/// The bearer token of a request (or the password of Basic auth), if any.
pub fn presented(headers: &HeaderMap) -> Option<Vec<u8>> {
    let v = headers
        .get(http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .trim();
    let (scheme, rest) = v.split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().as_bytes().to_vec());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let colon = raw.iter().position(|b| *b == b':')?;
        return Some(raw[colon + 1..].to_vec());
    }
    None
}

/// Whether the request's credentials came as HTTP Basic: what a browser that logged in to
/// the dashboard sends by itself, with every request to the router, cross-site ones too.
pub fn is_basic(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .is_some_and(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
}

impl Tokens {
    pub fn from_config(a: &AuthConfig) -> Tokens {
        Tokens {
            admin: a
                .admin_tokens
                .iter()
                .map(|t| t.as_bytes().to_vec())
                .collect(),
            cluster_node: (!a.node_token.is_empty()).then(|| a.node_token.as_bytes().to_vec()),
            per_node: a
                .node_tokens
                .iter()
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn is_admin(&self, t: &[u8]) -> bool {
        // Check every token so timing does not reveal which one matched.
        self.admin.iter().fold(false, |acc, a| acc | eq(a, t))
    }

    fn is_node(&self, node_id: &str, t: &[u8]) -> bool {
        match self.per_node.get(node_id) {
            Some(own) => eq(own, t),
            None => self.cluster_node.as_deref().is_some_and(|c| eq(c, t)),
        }
    }

    /// Checks a request for admin rights.
    pub fn admin(&self, headers: &HeaderMap) -> Credential {
        match presented(headers) {
            None => Credential::None,
            Some(t) if self.is_admin(&t) => Credential::Admin,
            Some(t) if self.is_any_node(&t) => Credential::Elsewhere,
            Some(_) => Credential::Invalid,
        }
    }

    fn is_any_node(&self, t: &[u8]) -> bool {
        // Every token is compared, so timing does not reveal which one matched.
        self.cluster_node
            .iter()
            .chain(self.per_node.values())
            .fold(false, |acc, n| acc | eq(n, t))
    }

    /// Checks a request for any node's token (the cluster-wide one or a per-node one): for
    /// what a node may do without naming itself, such as placement lookups.
    pub fn any_node(&self, headers: &HeaderMap) -> Credential {
        match presented(headers) {
            None => Credential::None,
            Some(t) if self.is_any_node(&t) => Credential::Node,
            Some(_) => Credential::Invalid,
        }
    }

    /// Whether a request carries one of the router's own credentials (an admin or a node
    /// token, as Bearer or as Basic's password): one a proxied request must not take to a
    /// node. A browser that logged in to the dashboard with Basic sends it to every path.
    pub fn carries_any(&self, headers: &HeaderMap) -> bool {
        presented(headers).is_some_and(|t| self.is_admin(&t) | self.is_any_node(&t))
    }

    /// Checks a request for the right to act as `node_id` (admins may too when `admin_ok`).
    pub fn node(&self, headers: &HeaderMap, node_id: &str, admin_ok: bool) -> Credential {
        match presented(headers) {
            None => Credential::None,
            Some(t) if self.is_node(node_id, &t) => Credential::Node,
            Some(t) if admin_ok && self.is_admin(&t) => Credential::Admin,
            Some(t) if self.is_admin(&t) | self.is_any_node(&t) => Credential::Elsewhere,
            Some(_) => Credential::Invalid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    fn tokens() -> Tokens {
        let mut per = BTreeMap::new();
        per.insert("special".to_string(), "special-node-token-123".to_string());
        Tokens::from_config(&AuthConfig {
            admin_tokens: vec!["admin-token-0123456789".into()],
            node_token: "cluster-node-token-123".into(),
            node_tokens: per,
            users: Default::default(),
            jwt: Default::default(),
        })
    }

    #[test]
    fn admin_tokens_by_bearer_or_basic() {
        let t = tokens();
        assert_eq!(
            t.admin(&headers("Bearer admin-token-0123456789")),
            Credential::Admin
        );
        let basic =
            base64::engine::general_purpose::STANDARD.encode("admin:admin-token-0123456789");
        assert_eq!(
            t.admin(&headers(&format!("Basic {basic}"))),
            Credential::Admin
        );
        assert_eq!(
            t.admin(&headers("Bearer admin-token-012345678")),
            Credential::Invalid
        );
        assert_eq!(
            t.admin(&headers("Bearer cluster-node-token-123")),
            Credential::Elsewhere
        );
        assert_eq!(t.admin(&HeaderMap::new()), Credential::None);
    }

    #[test]
    fn any_nodes_token_is_a_node_credential() {
        let t = tokens();
        for tok in ["cluster-node-token-123", "special-node-token-123"] {
            assert_eq!(
                t.any_node(&headers(&format!("Bearer {tok}"))),
                Credential::Node
            );
        }
        assert_eq!(
            t.any_node(&headers("Bearer admin-token-0123456789")),
            Credential::Invalid
        );
        assert_eq!(
            t.any_node(&headers("Bearer cluster-node-token-12")),
            Credential::Invalid
        );
        assert_eq!(t.any_node(&HeaderMap::new()), Credential::None);
    }

    #[test]
    fn a_node_listed_with_its_own_token_cannot_use_the_cluster_token() {
        let t = tokens();
        assert_eq!(
            t.node(&headers("Bearer cluster-node-token-123"), "any", false),
            Credential::Node
        );
        assert_eq!(
            t.node(&headers("Bearer cluster-node-token-123"), "special", false),
            Credential::Elsewhere
        );
        assert_eq!(
            t.node(&headers("Bearer special-node-token-123"), "any", false),
            Credential::Elsewhere
        );
        assert_eq!(
            t.node(&headers("Bearer cluster-node-token-12"), "any", false),
            Credential::Invalid
        );
        assert_eq!(
            t.node(&headers("Bearer special-node-token-123"), "special", false),
            Credential::Node
        );
        assert_eq!(
            t.node(&headers("Bearer admin-token-0123456789"), "any", false),
            Credential::Elsewhere
        );
        assert_eq!(
            t.node(&headers("Bearer admin-token-0123456789"), "any", true),
            Credential::Admin
        );
    }
}
