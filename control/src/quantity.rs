//! Resource quantities (`100m`, `0.5`, `128Mi`, `1e3`, `2G`) as the scheduler compares them: in thousandths of the
//! unit (millicores for cpu, millibytes for memory), rounded up as Kubernetes' `MilliValue` does.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The quantity in thousandths, or None if it does not parse.
pub fn milli(q: &str) -> Option<i128> {
    let q = q.trim();
    let split = q.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-')).unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let n: f64 = num.parse().ok()?;
    let factor: f64 = match suffix {
        "" => 1.0,
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        s if s.starts_with(['e', 'E']) => 10f64.powi(s[1..].parse::<i32>().ok()?),
        _ => return None,
    };
    let v = n * factor * 1000.0;
    // Float noise is not a fraction to round up: 0.1 * 1000 is 100.00000000000001.
    let r = v.round();
    Some(if (v - r).abs() <= 1e-9 * v.abs().max(1.0) { r } else { v.ceil() } as i128)
}

/// `resources[name]` in thousandths; 0 when absent or unparseable.
pub fn get(resources: Option<&BTreeMap<String, Quantity>>, name: &str) -> i128 {
    resources.and_then(|r| r.get(name)).and_then(|q| milli(&q.0)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantities_parse_like_kubernetes() {
        let cases = [
            ("100m", 100),
            ("1", 1000),
            ("0.5", 500),
            ("2.5", 2500),
            ("100Mi", 100 * 1024 * 1024 * 1000),
            ("1Gi", 1024 * 1024 * 1024 * 1000),
            ("1k", 1_000_000),
            ("129M", 129_000_000_000),
            ("1e3", 1_000_000),
            ("128974848", 128_974_848_000),
            ("1n", 1),
        ];
        for (q, want) in cases {
            assert_eq!(super::milli(q), Some(want), "{q}");
        }
        assert_eq!(super::milli("ten"), None);
        assert_eq!(super::milli("1Xi"), None);
    }
}
