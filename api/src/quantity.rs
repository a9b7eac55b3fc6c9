//! Resource quantities (`100m`, `100Mi`, `1.5`, `2e3`) as Kubernetes writes them: parsed to an exact number of
//! nano-units, added, compared, and printed back in the canonical form `Quantity.String()` gives, so that
//! `describe` can sum a node's requests as kubectl does.

use std::cmp::Ordering;

/// How a quantity was written, which decides how a sum of them is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `Ki`, `Mi`, `Gi`…
    BinarySI,
    /// `m`, `k`, `M`, `G`…, or no suffix.
    DecimalSI,
    /// `1e3`.
    DecimalExponent,
}

/// A quantity: `nanos` billionths of the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity {
    pub nanos: i128,
    pub format: Format,
}

const NANO: i128 = 1_000_000_000;

impl Default for Quantity {
    fn default() -> Self {
        Quantity { nanos: 0, format: Format::DecimalSI }
    }
}

impl PartialOrd for Quantity {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.nanos.cmp(&other.nanos))
    }
}

impl Quantity {
    /// Parses `<sign><digits>[.<digits>]<suffix>`; `None` if it is not a quantity.
    pub fn parse(s: &str) -> Option<Quantity> {
        let s = s.trim();
        let (neg, body) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let num_end = body.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(body.len());
        let (num, suffix) = body.split_at(num_end);
        if num.is_empty() || num == "." || num.matches('.').count() > 1 {
            return None;
        }
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        let mut nanos: i128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        nanos = nanos.checked_mul(NANO)?;
        let frac9: String = frac.chars().chain(std::iter::repeat('0')).take(9).collect();
        nanos = nanos.checked_add(frac9.parse::<i128>().ok()?)?;
        let (format, mul_num, mul_den): (Format, i128, i128) = match suffix {
            "" => (Format::DecimalSI, 1, 1),
            "n" => (Format::DecimalSI, 1, NANO),
            "u" => (Format::DecimalSI, 1, 1_000_000),
            "m" => (Format::DecimalSI, 1, 1000),
            "k" => (Format::DecimalSI, 1000, 1),
            "M" => (Format::DecimalSI, 1_000_000, 1),
            "G" => (Format::DecimalSI, NANO, 1),
            "T" => (Format::DecimalSI, 1_000_000_000_000, 1),
            "P" => (Format::DecimalSI, 1_000_000_000_000_000, 1),
            "E" => (Format::DecimalSI, 1_000_000_000_000_000_000, 1),
            "Ki" => (Format::BinarySI, 1 << 10, 1),
            "Mi" => (Format::BinarySI, 1 << 20, 1),
            "Gi" => (Format::BinarySI, 1 << 30, 1),
            "Ti" => (Format::BinarySI, 1 << 40, 1),
            "Pi" => (Format::BinarySI, 1 << 50, 1),
            "Ei" => (Format::BinarySI, 1 << 60, 1),
            e if e.starts_with(['e', 'E']) => {
                let exp: i32 = e[1..].parse().ok()?;
                let p = 10i128.checked_pow(exp.unsigned_abs())?;
                if exp >= 0 {
                    (Format::DecimalExponent, p, 1)
                } else {
                    (Format::DecimalExponent, 1, p)
                }
            }
            _ => return None,
        };
        nanos = nanos.checked_mul(mul_num)? / mul_den;
        Some(Quantity { nanos: if neg { nanos.checked_neg()? } else { nanos }, format })
    }

    pub fn zero() -> Quantity {
        Quantity::default()
    }

    pub fn is_zero(&self) -> bool {
        self.nanos == 0
    }

    /// The sum, printed in the format of the first operand (as `Quantity.Add` keeps it).
    pub fn plus(self, other: Quantity) -> Quantity {
        let format = if self.is_zero() && self == Quantity::default() { other.format } else { self.format };
        // Saturating: a sum of hostile quantities must not wrap (or panic in a debug build).
        Quantity { nanos: self.nanos.saturating_add(other.nanos), format }
    }

    /// Milli-units, rounded up as `MilliValue` does.
    pub fn milli(&self) -> i128 {
        let m = NANO / 1000;
        self.nanos.saturating_add(m - 1).div_euclid(m)
    }

    /// Whole units, rounded up as `Value` does.
    pub fn value(&self) -> i128 {
        self.nanos.saturating_add(NANO - 1).div_euclid(NANO)
    }
}

/// `Quantity.String()`: the canonical form. Binary quantities that are whole multiples of 1024 keep a binary
/// suffix; everything else is decimal with the largest exponent (a multiple of 3) that keeps the number whole.
impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.nanos == 0 {
            return f.write_str("0");
        }
        let sign = if self.nanos < 0 { "-" } else { "" };
        let n = self.nanos.abs();
        if self.format == Format::BinarySI && n % NANO == 0 && n / NANO >= 1024 {
            let mut v = n / NANO;
            let mut i = 0;
            while v % 1024 == 0 && i < 6 {
                v /= 1024;
                i += 1;
            }
            let suffix = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][i];
            return write!(f, "{sign}{v}{suffix}");
        }
        // Decimal: scale in steps of 1000 from nano.
        let suffixes = ["n", "u", "m", "", "k", "M", "G", "T", "P", "E"];
        let mut v = n;
        let mut i = 0;
        while i + 1 < suffixes.len() && v % 1000 == 0 {
            v /= 1000;
            i += 1;
        }
        if self.format == Format::DecimalExponent && i >= 3 {
            let exp = (i - 3) * 3;
            return if exp == 0 { write!(f, "{sign}{v}") } else { write!(f, "{sign}{v}e{exp}") };
        }
        write!(f, "{sign}{v}{}", suffixes[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_canonically() {
        let cases = [
            ("100m", "100m"),
            ("0.1", "100m"),
            ("1500m", "1500m"),
            ("2000m", "2"),
            ("100Mi", "100Mi"),
            ("1Gi", "1Gi"),
            ("1024Mi", "1Gi"),
            ("1536Mi", "1536Mi"),
            ("128974848", "128974848"),
            ("129e6", "129e6"),
            ("1000", "1k"),
            ("0", "0"),
            ("500Ki", "500Ki"),
        ];
        for (input, want) in cases {
            assert_eq!(Quantity::parse(input).unwrap().to_string(), want, "{input}");
        }
        assert!(Quantity::parse("lots").is_none());
        assert!(Quantity::parse("1.2.3").is_none());
    }

    #[test]
    fn sums_keep_the_first_format() {
        let q = |s| Quantity::parse(s).unwrap();
        assert_eq!(q("100m").plus(q("100m")).to_string(), "200m");
        assert_eq!(q("100Mi").plus(q("100Mi")).to_string(), "200Mi");
        assert_eq!(Quantity::zero().plus(q("64Mi")).to_string(), "64Mi");
        assert_eq!(q("250m").milli(), 250);
        assert_eq!(q("1Ki").value(), 1024);
        assert!(q("1") > q("999m"));
    }

    #[test]
    fn overflow_is_an_error_or_saturates_never_a_wrap() {
        let huge = format!("{}", i128::MAX);
        assert_eq!(Quantity::parse(&huge), None, "i128::MAX units do not fit in nano-units");
        assert_eq!(Quantity::parse("1e40"), None);
        assert_eq!(Quantity::parse("9Ei").map(|q| q.nanos), Some(9 * (1i128 << 60) * NANO));
        let max = Quantity { nanos: i128::MAX, format: Format::DecimalSI };
        assert_eq!(max.plus(max).nanos, i128::MAX);
        assert!(max.milli() > 0 && max.value() > 0);
    }
}
