//! The backend-neutral core: configuration, the state a head carries, what a solve reports,
//! shared constants and tolerances, and input validation. Neither head's code lives here;
//! both build on it.

pub mod config;
pub(crate) mod constants;
pub mod real;
pub mod report;
pub mod state;
pub mod validate;
