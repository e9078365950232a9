//! implicit-etf (in progress)
pub mod config;
pub mod cpu;
pub mod error;
pub mod etf;
pub mod label;
pub mod metrics;
pub mod real;
pub use config::{AbsentClassPolicy, HeadConfig, MovingAverage, SolveMethod};
pub use cpu::head::{CpuHead, HeadOutput, HeadState};
pub use error::{Error, Result};
pub use etf::{cross_entropy, solve_etf, EtfGrads, EtfSolution};
pub use label::Label;
pub use metrics::{nc_metrics, MetricsAccumulator, NcMetrics, SecondPass};
pub use real::Real;
