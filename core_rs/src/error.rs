//! Errors for bad input: what is wrong, how many values, and the first position.

use thiserror::Error;

/// A batch or a query the index refuses. Nothing was changed.
#[derive(Debug, Error, PartialEq)]
pub enum InputError {
    /// Arrays of one call that should have one value per device differ in length.
    #[error("{name} has {got} values but device_id has {expected}")]
    Length { name: &'static str, got: usize, expected: usize },
    /// Some values of an array are out of their range.
    #[error("{name}: {count} value(s) {reason} (first at position {first}: {value})")]
    Values { name: &'static str, count: usize, reason: &'static str, first: usize, value: String },
    /// A scalar argument is out of its range.
    #[error("{name} {reason}, got {value}")]
    Scalar { name: &'static str, reason: &'static str, value: f64 },
    /// An option of the index is out of its range.
    #[error("{name} {reason}")]
    Option { name: &'static str, reason: String },
}

/// Checks every value of `values` with `ok`; reports the count of failures and the first.
pub fn check_all<T: Copy + std::fmt::Display>(
    name: &'static str,
    values: &[T],
    reason: &'static str,
    ok: impl Fn(T) -> bool,
) -> Result<(), InputError> {
    let mut first = None;
    let mut count = 0;
    for (i, &v) in values.iter().enumerate() {
        if !ok(v) {
            count += 1;
            first.get_or_insert((i, v));
        }
    }
    match first {
        None => Ok(()),
        Some((first, value)) => {
            Err(InputError::Values { name, count, reason, first, value: value.to_string() })
        }
    }
}
