//! implicit-etf (skeleton)
pub mod config;
pub mod error;
pub mod real;
pub use config::{AbsentClassPolicy, HeadConfig, MovingAverage, SolveMethod};
pub use error::{Error, Result};
pub use real::Real;
pub mod device;
