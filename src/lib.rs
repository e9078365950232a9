//! implicit-etf (skeleton)
pub mod config;
pub mod error;
pub mod metrics;
pub mod real;
pub use config::{AbsentClassPolicy, HeadConfig, MovingAverage, SolveMethod};
pub use error::{Error, Result};
pub use metrics::{nc_metrics, MetricsAccumulator, NcMetrics, SecondPass};
pub use real::Real;
