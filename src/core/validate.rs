//! Input validation, the one place both heads and the metrics check what they are given:
//! sizes (`K >= 2`, `d >= K`), buffer lengths, labels (`u32`, `i32`, `i64`, `u64`, `usize`, in
//! `0..K`) and finiteness. Every check returns a typed [`Error`](crate::Error) and runs before
//! any state changes.

/// An integer class label. Validation converts it to a class index in `0..K`.
pub trait Label: Copy + Send + Sync + 'static {
    /// The label as a signed integer, for error messages.
    fn as_i64(self) -> i64;
    /// The class index, if the label lies in `0..classes`.
    #[inline]
    fn class(self, classes: usize) -> Option<usize> {
        let v = self.as_i64();
        (v >= 0 && (v as u64) < classes as u64).then_some(v as usize)
    }
}

macro_rules! impl_label {
    ($($t:ty),*) => {$(
        impl Label for $t {
            #[inline]
            fn as_i64(self) -> i64 {
                // Saturate values that do not fit (only u64/usize above i64::MAX): they are
                // out of range either way.
                i64::try_from(self).unwrap_or(i64::MAX)
            }
        }
    )*};
}
impl_label!(u32, i32, i64, u64, usize);

/// [`validate_labels`] into a reused vector (cleared first; on error its contents are
/// unspecified).
pub(crate) fn validate_labels_into<L: Label>(
    labels: &[L],
    classes: usize,
    out: &mut Vec<usize>,
) -> crate::Result<()> {
    out.clear();
    for (index, &l) in labels.iter().enumerate() {
        out.push(l.class(classes).ok_or(crate::Error::LabelOutOfRange {
            index,
            label: l.as_i64(),
            classes,
        })?);
    }
    Ok(())
}

/// Validates labels against `classes`; returns them as indices.
pub(crate) fn validate_labels<L: Label>(labels: &[L], classes: usize) -> crate::Result<Vec<usize>> {
    labels
        .iter()
        .enumerate()
        .map(|(index, &l)| {
            l.class(classes).ok_or(crate::Error::LabelOutOfRange {
                index,
                label: l.as_i64(),
                classes,
            })
        })
        .collect()
}

/// The largest feature or `dL/dlogits` magnitude the `f32` heads (`CpuHead<f32>`,
/// `DeviceHead`) accept, `1e30`: below it no `f32` quantity of a step (class sums of up to
/// `3e8` rows, logits, gradients) can overflow, so a finite input never gives a non-finite
/// output. Larger values are reported like NaN and infinities, as
/// [`Error::NonFinite`](crate::Error::NonFinite). `CpuHead<f64>` accepts up to `1e300`
/// ([`Real::MAX_MAGNITUDE`](crate::Real::MAX_MAGNITUDE)).
pub const MAX_MAGNITUDE: f64 = 1e30;

/// The first entry of `xs` that is non-finite or above `T::MAX_MAGNITUDE` in magnitude, as an
/// error.
pub(crate) fn check_magnitude<T: crate::Real>(what: &'static str, xs: &[T]) -> crate::Result<()> {
    match xs
        .iter()
        .position(|v| !(v.to_f64().abs() <= T::MAX_MAGNITUDE))
    {
        Some(index) => Err(crate::Error::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// Returns the first non-finite entry of `xs` as an error.
pub(crate) fn check_finite<T: crate::Real>(what: &'static str, xs: &[T]) -> crate::Result<()> {
    match xs.iter().position(|v| !v.is_finite_val()) {
        Some(index) => Err(crate::Error::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// Checks a buffer length.
pub(crate) fn check_len(what: &'static str, expected: usize, got: usize) -> crate::Result<()> {
    if expected != got {
        return Err(crate::Error::ShapeMismatch {
            what,
            expected,
            got,
        });
    }
    Ok(())
}

/// `K >= 2` and `d >= K`.
pub(crate) fn check_sizes(dim: usize, classes: usize) -> crate::Result<()> {
    if classes < 2 {
        return Err(crate::Error::TooFewClasses { classes });
    }
    if dim < classes {
        return Err(crate::Error::DimensionBelowClasses { dim, classes });
    }
    Ok(())
}

/// `v` as the `int` a kernel takes; sizes beyond `i32::MAX` are refused.
#[cfg_attr(not(device), allow(dead_code))]
pub(crate) fn fits_i32(v: usize, what: &'static str) -> crate::Result<i32> {
    i32::try_from(v).map_err(|_| crate::Error::InvalidParameter {
        name: what,
        reason: format!("{v} exceeds the i32 range of the kernels"),
    })
}

/// `v` as a `u32` launch dimension; larger values are refused.
#[cfg_attr(not(device), allow(dead_code))]
pub(crate) fn fits_u32(v: usize, what: &'static str) -> crate::Result<u32> {
    u32::try_from(v).map_err(|_| crate::Error::InvalidParameter {
        name: what,
        reason: format!("{v} exceeds the u32 range of a launch dimension"),
    })
}

/// `rows * cols` for a buffer named `what`; [`Error::SizeOverflow`](crate::Error::SizeOverflow)
/// when it does not fit a `usize`.
pub(crate) fn size2(what: &'static str, rows: usize, cols: usize) -> crate::Result<usize> {
    rows.checked_mul(cols)
        .ok_or(crate::Error::SizeOverflow { what })
}

/// The number of rows of a non-empty row-major batch of `len` values with `cols` columns:
/// [`Error::EmptyBatch`](crate::Error::EmptyBatch) when empty, [`Error::ShapeMismatch`](crate::Error::ShapeMismatch)
/// when `len` is not a multiple of `cols`.
pub(crate) fn rows_of(what: &'static str, len: usize, cols: usize) -> crate::Result<usize> {
    if len == 0 {
        return Err(crate::Error::EmptyBatch);
    }
    if cols == 0 || len % cols != 0 {
        return Err(crate::Error::ShapeMismatch {
            what,
            expected: (len / cols.max(1) + 1) * cols,
            got: len,
        });
    }
    Ok(len / cols)
}
