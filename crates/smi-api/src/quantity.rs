//! Exact parsing of Kubernetes Quantities (split.smi-spec.io/v1alpha1 backend weights) into
//! thousandths, and the canonical text they are written back as.
//!
//! Grammar (k8s.io/apimachinery `resource.Quantity`): `<sign><digits>[.<digits>]<suffix>` where
//! suffix is a binary SI suffix (Ki Mi Gi Ti Pi Ei), a decimal SI suffix (n u m "" k M G T P E)
//! or a decimal exponent (`e3`, `E-2`). Kubernetes itself rounds sub-milli values up; a weight
//! that cannot be expressed in thousandths is rejected here instead, because silently changing
//! a traffic share is worse than refusing it.

use crate::hub::Weight;

/// Parses a Quantity into thousandths. Errors are human readable and say what was wrong.
pub fn parse_weight(text: &str) -> Result<Weight, String> {
    let invalid = |why: &str| format!("invalid quantity {text:?}: {why}");
    let s = text.trim();
    if s.is_empty() {
        return Err(invalid("empty"));
    }
    let (negative, s) = match s.as_bytes()[0] {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, s),
    };
    let number_len = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_len);
    let (int_part, frac_part) = match number.split_once('.') {
        Some((i, f)) => (i, f),
        None => (number, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty()) || frac_part.contains('.') {
        return Err(invalid("expected a number such as 1, 0.5 or 500m"));
    }

    // value = mantissa * 10^exp10 * 1024^exp1024
    let mut mantissa: u128 = 0;
    for digit in int_part.bytes().chain(frac_part.bytes()) {
        mantissa = mantissa
            .checked_mul(10)
            .and_then(|m| m.checked_add(u128::from(digit - b'0')))
            .ok_or_else(|| invalid("too large"))?;
    }
    let mut exp10: i64 = -(frac_part.len() as i64);
    let mut exp1024: u32 = 0;
    match suffix {
        "" => {}
        "n" => exp10 -= 9,
        "u" => exp10 -= 6,
        "m" => exp10 -= 3,
        "k" => exp10 += 3,
        "M" => exp10 += 6,
        "G" => exp10 += 9,
        "T" => exp10 += 12,
        "P" => exp10 += 15,
        "E" => exp10 += 18,
        "Ki" => exp1024 = 1,
        "Mi" => exp1024 = 2,
        "Gi" => exp1024 = 3,
        "Ti" => exp1024 = 4,
        "Pi" => exp1024 = 5,
        "Ei" => exp1024 = 6,
        other if other.starts_with(['e', 'E']) => {
            let exponent: i64 = other[1..]
                .parse()
                .map_err(|_| invalid(&format!("unknown suffix {other:?}")))?;
            if !(-64..=64).contains(&exponent) {
                return Err(invalid("exponent out of range"));
            }
            exp10 += exponent;
        }
        other => {
            return Err(invalid(&format!(
                "unknown suffix {other:?} (expected one of n u m k M G T P E Ki Mi Gi Ti Pi Ei or an exponent)"
            )));
        }
    }
    if negative && mantissa != 0 {
        return Err(format!("weight must not be negative, got {text:?}"));
    }

    let too_large = || invalid("too large for a weight");
    let mut value = mantissa
        .checked_mul(1024u128.checked_pow(exp1024).ok_or_else(too_large)?)
        .ok_or_else(too_large)?;
    // Into thousandths.
    let shift = exp10 + 3;
    if shift >= 0 {
        let factor = 10u128.checked_pow(shift as u32).ok_or_else(too_large)?;
        value = value.checked_mul(factor).ok_or_else(too_large)?;
    } else {
        let divisor = 10u128.checked_pow((-shift) as u32);
        match divisor {
            Some(d) if value % d == 0 => value /= d,
            _ if value == 0 => {}
            _ => {
                return Err(invalid(
                    "finer than thousandths (1m); weights are kept exact",
                ));
            }
        }
    }
    let millis = u64::try_from(value).map_err(|_| too_large())?;
    Ok(Weight { millis })
}

/// Canonical Quantity text for a weight: whole units as `N`, anything else as `Nm`.
pub fn format_weight(weight: Weight) -> String {
    if weight.millis.is_multiple_of(1000) {
        format!("{}", weight.millis / 1000)
    } else {
        format!("{}m", weight.millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn millis(s: &str) -> u64 {
        parse_weight(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .millis
    }

    #[test]
    fn parses_spec_examples_exactly() {
        assert_eq!(millis("10m"), 10);
        assert_eq!(millis("1"), 1000);
        assert_eq!(millis("500m"), 500);
        assert_eq!(millis("0.5"), 500);
        assert_eq!(millis("+2"), 2000);
        assert_eq!(millis("1k"), 1_000_000);
        assert_eq!(millis("1Ki"), 1_024_000);
        assert_eq!(millis("1e3"), 1_000_000);
        assert_eq!(millis("25E-1"), 2500);
        assert_eq!(millis("1000000u"), 1000);
        assert_eq!(millis("0"), 0);
        assert_eq!(millis("-0"), 0);
        assert_eq!(millis("0n"), 0);
        assert_eq!(millis(".5"), 500);
    }

    #[test]
    fn rejects_negative_invalid_and_inexact() {
        for bad in [
            "-1", "-10m", "abc", "", "1.2.3", "10x", "1mi", ".", "1e", "1e999", "1n", "0.0001",
        ] {
            assert!(parse_weight(bad).is_err(), "{bad:?} should be rejected");
        }
        assert!(parse_weight("-1").unwrap_err().contains("negative"));
        assert!(parse_weight("99999999999999999999999999999999999999999").is_err());
        assert!(
            parse_weight("9E").is_err(),
            "9E = 9e18 units overflows u64 millis"
        );
    }

    #[test]
    fn format_round_trips() {
        for s in ["1", "10m", "500m", "1500m", "0", "100"] {
            assert_eq!(format_weight(parse_weight(s).unwrap()), s);
        }
    }
}
