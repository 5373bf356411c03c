//! Who may do what: admin and node bearer tokens, user JWTs (`users`), and the signed tickets
//! users carry to their node. Secrets are compared in constant time and never logged.

pub mod ticket;
pub mod tokens;
pub mod users;

pub use ticket::{TicketClaims, TicketIssuer};
pub use tokens::{Credential, Tokens};
pub use users::{UserAuthError, UserClaims, UserVerifier};
