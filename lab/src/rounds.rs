//! Which benchmark rounds count. Every benchmark program measures in rounds, sides alternating; a round in
//! which a load generator saw errors (wrk socket errors or non-2xx answers, dnsperf lost queries, an iperf3
//! error) or whose rate collapsed (below a third of that side's median) measured a broken setup — a full
//! conntrack table, a dead server — not the code. Such a round is dropped from every ratio, for all sides
//! measured in it, and the benchmark says which rounds were dropped and why.

use std::fmt;

/// A rate below this fraction of its side's median is a collapse, not noise (shared 2-core machines swing
/// by ±30 %, a full conntrack table by 100×).
pub const COLLAPSE_FRACTION: f64 = 1.0 / 3.0;

/// The fraction of queries a saturated UDP server may drop in a valid round (see [`Sample::from_loss`]).
pub const LOSS_TOLERANCE: f64 = 0.005;

/// One side's result in one round: its rate (connections/s, queries/s, Gbit/s) and the errors its load
/// generator reported.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub rate: f64,
    pub errors: u64,
}

impl Sample {
    pub fn new(rate: f64, errors: u64) -> Sample {
        Sample { rate, errors }
    }

    /// A UDP load generator's round (dnsperf): `lost` of `sent` queries unanswered. A saturated UDP server drops
    /// a few queries by design (Knot lost 0.05–0.08 % in BENCHMARKS §9), so losses up to [`LOSS_TOLERANCE`]
    /// are load, not errors; beyond it every lost query counts as an error. Nothing sent is one error.
    pub fn from_loss(rate: f64, lost: u64, sent: u64) -> Sample {
        let errors = if sent == 0 {
            1
        } else if (lost as f64) <= sent as f64 * LOSS_TOLERANCE {
            0
        } else {
            lost
        };
        Sample { rate, errors }
    }

    /// A measurement that could not be taken at all (the tool failed): counted as one error.
    pub fn failed() -> Sample {
        Sample { rate: f64::NAN, errors: 1 }
    }
}

/// Why a sample counts or not.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Valid,
    Errors(u64),
    Collapsed { rate: f64, median: f64 },
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        *self == Verdict::Valid
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Valid => write!(f, "valid"),
            Verdict::Errors(n) => write!(f, "{n} load-generator errors"),
            Verdict::Collapsed { rate, median } => {
                write!(f, "rate collapsed to {rate:.1} (median of its rounds {median:.1})")
            }
        }
    }
}

/// Judges one side's samples, one per round. The collapse threshold is taken from the median of the
/// error-free samples, so the broken rounds do not drag the reference down with them.
pub fn judge(series: &[Sample]) -> Vec<Verdict> {
    let clean: Vec<f64> = series.iter().filter(|s| s.errors == 0 && s.rate.is_finite()).map(|s| s.rate).collect();
    let reference = median(&clean);
    series
        .iter()
        .map(|s| {
            if s.errors > 0 {
                Verdict::Errors(s.errors)
            } else if !s.rate.is_finite() || s.rate <= 0.0 || s.rate < reference * COLLAPSE_FRACTION {
                Verdict::Collapsed { rate: s.rate, median: reference }
            } else {
                Verdict::Valid
            }
        })
        .collect()
}

/// Rounds measured over several named sides at once (sample `r` of every side is round `r`): `Ok(())` for a
/// round that counts, else why not, naming the side(s). A round counts only when every side's sample does,
/// so ratios are always taken between samples of the same round.
pub fn valid_rounds(sides: &[(&str, &[Sample])]) -> Vec<Result<(), String>> {
    let rounds = sides.iter().map(|(_, s)| s.len()).max().unwrap_or(0);
    let verdicts: Vec<Vec<Verdict>> = sides.iter().map(|(_, s)| judge(s)).collect();
    (0..rounds)
        .map(|r| {
            let why: Vec<String> = sides
                .iter()
                .zip(&verdicts)
                .filter_map(|((name, _), v)| match v.get(r) {
                    Some(v) if v.is_valid() => None,
                    Some(v) => Some(format!("{name}: {v}")),
                    None => Some(format!("{name}: not measured")),
                })
                .collect();
            if why.is_empty() {
                Ok(())
            } else {
                Err(why.join("; "))
            }
        })
        .collect()
}

/// Per-round ratios a / b over the rounds that count, and the rejected rounds (index, why).
pub fn ratios(a: (&str, &[Sample]), b: (&str, &[Sample])) -> (Vec<f64>, Vec<(usize, String)>) {
    let mut out = Vec::new();
    let mut rejected = Vec::new();
    for (r, v) in valid_rounds(&[a, b]).into_iter().enumerate() {
        match v {
            Ok(()) => out.push(a.1[r].rate / b.1[r].rate),
            Err(why) => rejected.push((r, why)),
        }
    }
    (out, rejected)
}

/// The rates of one side in the rounds that count (`valid` from [`valid_rounds`]).
pub fn valid_rates(series: &[Sample], valid: &[Result<(), String>]) -> Vec<f64> {
    series.iter().zip(valid).filter(|(_, v)| v.is_ok()).map(|(s, _)| s.rate).collect()
}

/// The order in which `sides` sides run in round `round`: as listed in even rounds, reversed in odd ones,
/// so every pair of sides swaps who goes first from one round to the next.
pub fn order(round: usize, sides: usize) -> Vec<usize> {
    if round.is_multiple_of(2) {
        (0..sides).collect()
    } else {
        (0..sides).rev().collect()
    }
}

/// One line for a report: "all 3 rounds valid" or "2 of 3 rounds valid; rejected: round 3 (HAProxy: …)".
pub fn summary(valid: &[Result<(), String>]) -> String {
    let ok = valid.iter().filter(|v| v.is_ok()).count();
    if ok == valid.len() {
        return format!("all {ok} rounds valid");
    }
    let why: Vec<String> = valid
        .iter()
        .enumerate()
        .filter_map(|(r, v)| v.as_ref().err().map(|e| format!("round {} ({e})", r + 1)))
        .collect();
    format!("{ok} of {} rounds valid; rejected: {}", valid.len(), why.join(", "))
}

/// The median (NaN for no values).
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(rate: f64, errors: u64) -> Sample {
        Sample::new(rate, errors)
    }

    #[test]
    fn judge_rejects_errors_and_collapsed_rates_but_keeps_noise() {
        // (samples, expected validity per round)
        let cases: Vec<(Vec<Sample>, Vec<bool>)> = vec![
            (vec![s(6000.0, 0), s(5800.0, 0), s(6100.0, 0)], vec![true, true, true]),
            // The issue-9 failure: conntrack table full, HAProxy at ~10 conn/s in round 3.
            (vec![s(6000.0, 0), s(5900.0, 0), s(10.0, 0)], vec![true, true, false]),
            // wrk socket errors reject a round even at a normal rate.
            (vec![s(6000.0, 0), s(6000.0, 12), s(6000.0, 0)], vec![true, false, true]),
            // A 40 % dip on a shared machine is noise, not a collapse.
            (vec![s(6000.0, 0), s(3600.0, 0), s(6000.0, 0)], vec![true, true, true]),
            // Just under a third of the median is a collapse.
            (vec![s(3000.0, 0), s(3000.0, 0), s(999.0, 0)], vec![true, true, false]),
            // The errored rounds do not lower the reference: 2 errored rounds at 10, one clean at 10 vs 6000.
            (vec![s(10.0, 5), s(6000.0, 0), s(10.0, 0), s(10.0, 3)], vec![false, true, false, false]),
            // A tool that failed outright, and a zero rate.
            (vec![Sample::failed(), s(0.0, 0), s(5.0, 0)], vec![false, false, true]),
            (vec![], vec![]),
        ];
        for (samples, want) in cases {
            let got: Vec<bool> = judge(&samples).iter().map(Verdict::is_valid).collect();
            assert_eq!(got, want, "{samples:?}");
        }
    }

    #[test]
    fn udp_losses_count_as_errors_only_beyond_the_tolerance() {
        // (lost, sent, errors)
        for (lost, sent, want) in [
            (0, 1_000_000, 0),
            (610, 1_000_000, 0),
            (5_000, 1_000_000, 0),
            (5_001, 1_000_000, 5_001),
            (1, 0, 1),
            (0, 0, 1),
        ] {
            assert_eq!(Sample::from_loss(90_000.0, lost, sent).errors, want, "lost {lost} of {sent}");
        }
    }

    #[test]
    fn a_round_counts_only_when_every_side_in_it_is_valid() {
        let weft = [s(6000.0, 0), s(6100.0, 0), s(6050.0, 0)];
        let haproxy = [s(6200.0, 0), s(5900.0, 0), s(10.0, 0)];
        let direct = [s(11000.0, 4), s(10900.0, 0), s(11100.0, 0)];
        let v = valid_rounds(&[("weft", &weft), ("HAProxy", &haproxy), ("direct", &direct)]);
        assert_eq!(v.len(), 3);
        assert_eq!(v[0], Err("direct: 4 load-generator errors".to_string()));
        assert_eq!(v[1], Ok(()));
        let why = v[2].clone().unwrap_err();
        assert!(why.starts_with("HAProxy: rate collapsed to 10.0"), "{why}");
        assert_eq!(valid_rates(&weft, &v), vec![6100.0]);
        // A side with fewer samples than rounds: the missing round does not count.
        let short = [s(1.0, 0)];
        let v = valid_rounds(&[("a", &[s(1.0, 0), s(1.0, 0)]), ("b", &short)]);
        assert_eq!(v, vec![Ok(()), Err("b: not measured".to_string())]);
    }

    #[test]
    fn ratios_are_taken_within_valid_rounds_only() {
        let weft = [s(6000.0, 0), s(5000.0, 0), s(6000.0, 0)];
        let haproxy = [s(6000.0, 0), s(5000.0, 0), s(12.0, 0)];
        let (r, rejected) = ratios(("weft", &weft), ("HAProxy", &haproxy));
        assert_eq!(r, vec![1.0, 1.0]);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].0, 2);
    }

    #[test]
    fn order_swaps_which_side_runs_first_every_round() {
        assert_eq!(order(0, 2), vec![0, 1]);
        assert_eq!(order(1, 2), vec![1, 0]);
        assert_eq!(order(2, 3), vec![0, 1, 2]);
        assert_eq!(order(3, 3), vec![2, 1, 0]);
        assert_eq!(order(0, 0), Vec::<usize>::new());
    }

    #[test]
    fn summary_names_the_rejected_rounds_and_why() {
        assert_eq!(summary(&[Ok(()), Ok(())]), "all 2 rounds valid");
        assert_eq!(
            summary(&[Ok(()), Err("HAProxy: 3 load-generator errors".into()), Ok(())]),
            "2 of 3 rounds valid; rejected: round 2 (HAProxy: 3 load-generator errors)"
        );
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
    }
}
