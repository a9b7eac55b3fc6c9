//! `judge_rounds SIDE...`: `weft_lab::rounds`' round validation for scripts/bench.sh, so the shell steps reject
//! rounds by the same rule as the Rust benchmarks. Reads one line per round from stdin, "rate errors" for each
//! side in order (a rate of `nan` for a tool that failed), and prints one line per round: `ok`, or `rejected:`
//! and why.
//!
//! `printf '9.1 0 16.0 0\n3.0 0 16.2 0\n' | cargo run -q --release -p weft-tests --example judge_rounds -- overlay underlay`

use std::io::BufRead;

use anyhow::{bail, Context, Result};
use weft_lab::rounds::{valid_rounds, Sample};

/// One round's line: "rate errors" per side.
fn parse_round(line: &str, sides: usize) -> Result<Vec<Sample>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if words.len() != 2 * sides {
        bail!("expected {} numbers (rate errors per side), got {line:?}", 2 * sides);
    }
    words
        .chunks(2)
        .map(|p| {
            let rate: f64 = p[0].parse().with_context(|| format!("rate {:?}", p[0]))?;
            let errors: u64 = p[1].parse().with_context(|| format!("errors {:?}", p[1]))?;
            Ok(Sample::new(rate, errors))
        })
        .collect()
}

fn main() -> Result<()> {
    let names: Vec<String> = std::env::args().skip(1).collect();
    if names.is_empty() {
        bail!("usage: judge_rounds SIDE... < rounds (one line per round: rate errors per side)");
    }
    let mut series: Vec<Vec<Sample>> = vec![Vec::new(); names.len()];
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        for (s, sample) in series.iter_mut().zip(parse_round(&line, names.len())?) {
            s.push(sample);
        }
    }
    let sides: Vec<(&str, &[Sample])> =
        names.iter().map(String::as_str).zip(series.iter().map(Vec::as_slice)).collect();
    for v in valid_rounds(&sides) {
        match v {
            Ok(()) => println!("ok"),
            Err(why) => println!("rejected: {why}"),
        }
    }
    Ok(())
}
