//! Who may do what: admin and node bearer tokens, and the signed tickets users carry to
//! their node. Secrets are compared in constant time and never logged.

pub mod ticket;
pub mod tokens;

pub use ticket::{TicketClaims, TicketIssuer};
pub use tokens::{Credential, Tokens};
