//! The floating-point types the CPU backend is generic over.

/// A real scalar the CPU backend computes in: `f32` or `f64` (sealed).
///
/// `f64` is the reference precision. Whatever `T` is, the `K x K` factorisations of the ETF
/// solve and of its implicit backward run in `f64` (see `docs/solve.md#conditioning-and-why-f64`):
/// `T` sets the storage of features, logits and gradients and the precision of the
/// `N`-sized products.
pub trait Real:
    faer::traits::RealField
    + Copy
    + Send
    + Sync
    + PartialOrd
    + std::fmt::Debug
    + std::fmt::Display
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + sealed::Sealed
    + 'static
{
    /// Machine epsilon of the type.
    const EPSILON: f64;
    /// The largest feature or `dL/dlogits` magnitude a head with this storage accepts: below
    /// it no quantity of a step overflows (`1e30` for `f32`, `1e300` for `f64`; see
    /// [`MAX_MAGNITUDE`](crate::core::validate::MAX_MAGNITUDE)).
    const MAX_MAGNITUDE: f64;
    /// Widens to `f64` (exact).
    fn to_f64(self) -> f64;
    /// Rounds an `f64` to this type.
    fn from_f64(x: f64) -> Self;
    /// `true` unless NaN or infinite.
    fn is_finite_val(self) -> bool;
}

impl Real for f32 {
    const EPSILON: f64 = f32::EPSILON as f64;
    const MAX_MAGNITUDE: f64 = 1e30;
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline]
    fn is_finite_val(self) -> bool {
        self.is_finite()
    }
}

impl Real for f64 {
    const EPSILON: f64 = f64::EPSILON;
    const MAX_MAGNITUDE: f64 = 1e300;
    #[inline]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline]
    fn is_finite_val(self) -> bool {
        self.is_finite()
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for f64 {}
}
