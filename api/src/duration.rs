//! Go-style durations, the one parser every flag that takes a duration uses (`500ms`, `40s`, `5m`, `1h30m`,
//! `5m0s`, `1.5s`, and `0` without a unit, as Go's `time.ParseDuration` reads them). jiff's friendly format does
//! the parsing (it reads a superset of Go's); a bare number other than 0 and negative durations are refused.

use std::time::Duration;

use k8s_openapi::jiff::SignedDuration;

/// Parses `s`; the error is a sentence for a flag's message.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("{s:?} is not a duration like 500ms, 40s, 5m or 1h30m");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    // jiff would take a bare number as an ISO 8601 error anyway, but say what is missing.
    if s.parse::<f64>().is_ok() {
        return Err(format!("{s:?} needs a unit (ms, s, m, h)"));
    }
    let d: SignedDuration = s.parse().map_err(|_| bad())?;
    Duration::try_from(d).map_err(|_| format!("{s:?} must not be negative"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_go() {
        let cases = [
            ("500ms", 0.5),
            ("40s", 40.0),
            ("90s", 90.0),
            ("5m", 300.0),
            ("1m30s", 90.0),
            ("1h30m", 5400.0),
            ("5m0s", 300.0),
            ("1.5s", 1.5),
            ("0", 0.0),
            ("0s", 0.0),
        ];
        for (s, want) in cases {
            assert_eq!(parse(s).map(|d| d.as_secs_f64()), Ok(want), "{s}");
        }
        for bad in ["", "5", "2", "5x", "m", "soon", "-5s"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
