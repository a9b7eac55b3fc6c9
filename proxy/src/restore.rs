//! The iptables-restore/save machinery every mode that writes netfilter rules shares: running the tools (a
//! `Runner`), reading our footprint back from `iptables-save`, and the one quoting function for text handed to
//! a kernel tool (comments; later nft, ipset, IPVS and eBPF names). Runs only the programs it is asked to run.

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, BufWriter, Read, Write};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("spawning `{program}` failed")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{program}` failed ({status}): {stderr}")]
    Failed { program: String, status: String, stderr: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Table {
    Filter,
    Nat,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

pub type ChainKey = (Table, String);

/// The longest comment the `comment` match takes (XT_MAX_COMMENT_LEN is 256 with the NUL).
pub const MAX_COMMENT: usize = 255;
/// The longest chain name iptables takes (XT_EXTENSION_MAXNAMELEN is 29 with the NUL).
pub const MAX_CHAIN: usize = 28;
/// The longest ipset set name (IPSET_MAXNAMELEN is 32 with the NUL).
pub const MAX_SET: usize = 31;

/// Characters that need no quotes in an argument (what `iptables-save` prints bare, plus `/ : .`).
fn is_bare(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '/' | ':' | '.')
}

/// Quotes `text` as one argument of an `iptables-restore` line (nft and ipset scripts use the same double-quote
/// convention), at most `max` bytes of content. Bare when it is plain (starts with a letter or digit, only
/// `[A-Za-z0-9_./:-]`), else double-quoted with `"`, `\` and `'` backslash-escaped. A line break, NUL, other
/// control character or non-ASCII character cannot be carried through those parsers safely: each becomes `?`.
/// Truncation happens before escaping, so an escape is never cut in half.
pub fn quote(text: &str, max: usize) -> String {
    // Fast paths for what every comment the proxy writes looks like (about ten per service per full sync).
    if text.len() <= max && text.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        if text.chars().all(is_bare) {
            return text.to_string();
        }
        if text.bytes().all(|b| b == b' ' || (b.is_ascii_graphic() && !matches!(b, b'"' | b'\\' | b'\''))) {
            let mut out = String::with_capacity(text.len() + 2);
            out.push('"');
            out.push_str(text);
            out.push('"');
            return out;
        }
    }
    let clean: String =
        text.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).take(max).collect();
    if clean.starts_with(|c: char| c.is_ascii_alphanumeric()) && clean.chars().all(is_bare) {
        return clean;
    }
    let mut out = String::with_capacity(clean.len() + 2);
    out.push('"');
    for c in clean.chars() {
        if matches!(c, '"' | '\\' | '\'') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `-m comment --comment <text>`, quoted.
pub fn comment(text: &str) -> String {
    format!("-m comment --comment {}", quote(text, MAX_COMMENT))
}

/// A name we may hand to iptables as a chain or ipset name: 1 to `max` bytes of `[A-Za-z0-9_.-]`, not starting
/// with `-` or `!` (an option or an inversion to the parser). Our names are built from hashes and addresses, so
/// this holds by construction; it is checked anyway before a name reaches a tool.
pub fn is_kernel_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && !name.starts_with(['-', '!'])
}

/// Splits a rule into arguments as `iptables-restore` does: whitespace separates, double quotes group, and
/// inside quotes a backslash takes the next character literally. What `quote` writes reads back as one argument.
pub fn split_args(line: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut any) = (false, false, false);
    for c in line.chars() {
        if quoted {
            if escaped {
                cur.push(c);
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                quoted = false;
            } else {
                cur.push(c);
            }
            continue;
        }
        match c {
            '"' => {
                quoted = true;
                any = true;
            }
            ' ' | '\t' | '\n' => {
                if any || !cur.is_empty() {
                    args.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            _ => cur.push(c),
        }
    }
    if any || !cur.is_empty() {
        args.push(cur);
    }
    args
}

/// The target of a rule's `-j`, read with the restore parser's quoting rules (so a comment that mentions
/// `-j X` is not taken for the jump).
pub fn jump_target(rule: &str) -> Option<String> {
    let args = split_args(rule);
    args.windows(2).find(|w| w[0] == "-j").map(|w| w[1].clone())
}

/// A rule of a built-in chain jumping to one of ours: (table, built-in chain, rule after `-A <chain> `, target).
pub type SavedHook = (Table, String, String, String);

/// One pass over `iptables-save` output (nat and filter): the chains `owns` claims, and every rule of a
/// built-in chain that jumps to one of them as (table, built-in chain, the rule after `-A <chain> `, target).
/// Shared by the modes, which differ only in what they own.
pub fn scan_save(text: &str, owns: impl Fn(&str) -> bool) -> (BTreeSet<ChainKey>, Vec<SavedHook>) {
    let mut scan = SaveScan::new(owns);
    text.lines().for_each(|l| scan.line(l));
    scan.finish()
}

/// `scan_save` of the running `iptables-save`, line by line as the tool prints it: at 10,000 services its
/// output is tens of megabytes, of which only our chain names and hooks are kept.
pub fn scan_saved(
    runner: &mut dyn Runner,
    owns: impl Fn(&str) -> bool,
) -> Result<(BTreeSet<ChainKey>, Vec<SavedHook>)> {
    let mut scan = SaveScan::new(owns);
    runner.run_reading("iptables-save", &[], &mut |l| scan.line(l))?;
    Ok(scan.finish())
}

/// The state of a `scan_save` pass between lines.
struct SaveScan<F> {
    owns: F,
    table: Option<Table>,
    chains: BTreeSet<ChainKey>,
    hooks: Vec<SavedHook>,
}

impl<F: Fn(&str) -> bool> SaveScan<F> {
    fn new(owns: F) -> Self {
        SaveScan { owns, table: None, chains: BTreeSet::new(), hooks: Vec::new() }
    }

    fn line(&mut self, line: &str) {
        if let Some(t) = line.strip_prefix('*') {
            self.table = match t.trim() {
                "nat" => Some(Table::Nat),
                "filter" => Some(Table::Filter),
                _ => None,
            };
            return;
        }
        let Some(t) = self.table else { return };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next().filter(|n| (self.owns)(n)) {
                self.chains.insert((t, name.to_string()));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let Some((chain, rest)) = rule.split_once(' ') else { return };
            // Only a built-in chain's rules can be our hooks: our own chains' rules (most of the output) are
            // not split into arguments.
            if chain.starts_with("WEFT-") {
                return;
            }
            let Some(target) = jump_target(rest) else { return };
            if (self.owns)(&target) {
                self.hooks.push((t, chain.to_string(), rest.to_string(), target));
            }
        }
    }

    fn finish(self) -> (BTreeSet<ChainKey>, Vec<SavedHook>) {
        (self.chains, self.hooks)
    }
}

/// Writes a tool's input as the tool reads it.
pub type Input<'a> = dyn FnMut(&mut dyn Write) -> std::io::Result<()> + 'a;

/// Runs the iptables tools. The real one is `CommandRunner`; tests run it inside a namespace.
pub trait Runner: Send {
    /// Runs `program args`, feeding `stdin`; returns stdout, or an error carrying stderr.
    fn run(&mut self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>>;

    /// Runs `program args` with its stdin written by `input` while the tool reads it, so a large input is never
    /// held whole; returns stdout. The default (test runners) collects the input and calls `run`.
    fn run_writing(&mut self, program: &str, args: &[&str], input: &mut Input<'_>) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        input(&mut buf).map_err(|source| Error::Spawn { program: program.to_string(), source })?;
        self.run(program, args, Some(&buf))
    }

    /// Runs `program args` and hands each line of its stdout (without the line break) to `line` as it is
    /// read. The default (test runners) splits what `run` returns.
    fn run_reading(&mut self, program: &str, args: &[&str], line: &mut dyn FnMut(&str)) -> Result<()> {
        let out = self.run(program, args, None)?;
        String::from_utf8_lossy(&out).lines().for_each(line);
        Ok(())
    }
}

/// `iptables-save` output of every table, as text.
pub fn save(runner: &mut dyn Runner) -> Result<String> {
    Ok(String::from_utf8_lossy(&runner.run("iptables-save", &[], None)?).into_owned())
}

/// One `iptables-restore --noflush` of `input` (waiting up to 5 s for the xtables lock).
pub fn restore(runner: &mut dyn Runner, input: &[u8]) -> Result<()> {
    runner.run("iptables-restore", &["-w", "5", "--noflush"], Some(input)).map(|_| ())
}

/// One `iptables-restore --noflush` whose input `input` writes as the tool reads it.
pub fn restore_with(runner: &mut dyn Runner, input: &mut Input<'_>) -> Result<()> {
    runner.run_writing("iptables-restore", &["-w", "5", "--noflush"], input).map(|_| ())
}

/// Parses `input` as `iptables-restore --test` does, committing nothing: whether the tool would take it.
pub fn test_restore(runner: &mut dyn Runner, input: &[u8]) -> Result<()> {
    runner.run("iptables-restore", &["-w", "5", "--noflush", "--test"], Some(input)).map(|_| ())
}

/// `test_restore` of what `input` writes as the tool reads it.
pub fn test_restore_with(runner: &mut dyn Runner, input: &mut Input<'_>) -> Result<()> {
    runner.run_writing("iptables-restore", &["-w", "5", "--noflush", "--test"], input).map(|_| ())
}

/// Runs programs directly, or behind a prefix such as `ip netns exec <ns>`.
#[derive(Debug, Clone, Default)]
pub struct CommandRunner {
    prefix: Vec<String>,
}

impl CommandRunner {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn with_prefix<S: Into<String>>(prefix: impl IntoIterator<Item = S>) -> Self {
        CommandRunner { prefix: prefix.into_iter().map(Into::into).collect() }
    }
}

impl CommandRunner {
    fn command(&self, program: &str, args: &[&str], stdin: bool) -> Command {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args).stdin(if stdin { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        cmd
    }
}

/// Everything a pipe delivers (drained on its own thread so the tool never blocks on it).
fn drain(pipe: Option<impl Read>) -> Vec<u8> {
    let mut out = Vec::new();
    if let Some(mut p) = pipe {
        // A read error ends the output; the exit status says whether the tool succeeded.
        let _ = p.read_to_end(&mut out);
    }
    out
}

fn failed(program: &str, status: std::process::ExitStatus, stderr: &[u8]) -> Error {
    Error::Failed {
        program: program.to_string(),
        status: status.to_string(),
        stderr: String::from_utf8_lossy(stderr).trim().to_string(),
    }
}

impl Runner for CommandRunner {
    fn run(&mut self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut cmd = self.command(program, args, stdin.is_some());
        let spawn_err = |source| Error::Spawn { program: program.to_string(), source };
        let mut child = cmd.spawn().map_err(spawn_err)?;
        // Feed stdin from a thread so a tool that writes a lot before reading everything cannot deadlock us.
        let writer = match (stdin, child.stdin.take()) {
            (Some(data), Some(mut pipe)) => {
                let data = data.to_vec();
                Some(std::thread::spawn(move || pipe.write_all(&data)))
            }
            _ => None,
        };
        let out = child.wait_with_output().map_err(spawn_err)?;
        let write_result = writer.map(|w| w.join());
        if !out.status.success() {
            return Err(failed(program, out.status, &out.stderr));
        }
        if let Some(Ok(Err(e))) = write_result {
            return Err(spawn_err(e));
        }
        Ok(out.stdout)
    }

    fn run_writing(&mut self, program: &str, args: &[&str], input: &mut Input<'_>) -> Result<Vec<u8>> {
        let spawn_err = |source| Error::Spawn { program: program.to_string(), source };
        let mut child = self.command(program, args, true).spawn().map_err(spawn_err)?;
        let (stdout, stderr, stdin) = (child.stdout.take(), child.stderr.take(), child.stdin.take());
        // Its output is read on other threads while this one writes, so neither side can fill a pipe and wait.
        let (out, err, written) = std::thread::scope(|s| {
            let out = s.spawn(|| drain(stdout));
            let err = s.spawn(|| drain(stderr));
            let written = stdin.map_or(Ok(()), |pipe| {
                let mut w = BufWriter::with_capacity(1 << 16, pipe);
                input(&mut w).and_then(|()| w.flush())
                // Dropping the pipe here is the tool's end of input.
            });
            (out.join().unwrap_or_default(), err.join().unwrap_or_default(), written)
        });
        let status = child.wait().map_err(spawn_err)?;
        // A tool that stops reading (a bad line) breaks our pipe: its own error says why.
        if !status.success() {
            return Err(failed(program, status, &err));
        }
        written.map_err(spawn_err)?;
        Ok(out)
    }

    fn run_reading(&mut self, program: &str, args: &[&str], line: &mut dyn FnMut(&str)) -> Result<()> {
        let spawn_err = |source| Error::Spawn { program: program.to_string(), source };
        let mut child = self.command(program, args, false).spawn().map_err(spawn_err)?;
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let (err, read) = std::thread::scope(|s| {
            let err = s.spawn(|| drain(stderr));
            let read = stdout.map_or(Ok(()), |pipe| {
                let mut r = BufReader::with_capacity(1 << 16, pipe);
                let mut buf = Vec::new();
                loop {
                    buf.clear();
                    if r.read_until(b'\n', &mut buf)? == 0 {
                        return Ok(());
                    }
                    let text = String::from_utf8_lossy(&buf);
                    line(text.strip_suffix('\n').unwrap_or(&text));
                }
            });
            (err.join().unwrap_or_default(), read)
        });
        let status = child.wait().map_err(spawn_err)?;
        if !status.success() {
            return Err(failed(program, status, &err));
        }
        read.map_err(spawn_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_table() {
        let long = "x".repeat(70_000);
        let cases: &[(&str, usize, &str)] = &[
            ("default/web:http", MAX_COMMENT, "default/web:http"),
            ("default/web:http cluster IP", MAX_COMMENT, "\"default/web:http cluster IP\""),
            ("", MAX_COMMENT, "\"\""),
            ("-j", MAX_COMMENT, "\"-j\""),
            ("!", MAX_COMMENT, "\"!\""),
            ("a\"b", MAX_COMMENT, "\"a\\\"b\""),
            ("a\\b", MAX_COMMENT, "\"a\\\\b\""),
            ("it's", MAX_COMMENT, "\"it\\'s\""),
            ("a\" -j ACCEPT\n-A INPUT -j DROP #", MAX_COMMENT, "\"a\\\" -j ACCEPT?-A INPUT -j DROP #\""),
            ("line\r\nbreak\ttab", MAX_COMMENT, "\"line??break?tab\""),
            ("nul\0byte", MAX_COMMENT, "\"nul?byte\""),
            ("café ☕", MAX_COMMENT, "\"caf? ?\""),
            ("abcdef", 3, "abc"),
            ("\"\"\"\"", 2, "\"\\\"\\\"\""),
        ];
        for (input, max, want) in cases {
            assert_eq!(quote(input, *max), *want, "quote({input:?}, {max})");
        }
        let q = quote(&long, MAX_COMMENT);
        assert_eq!(q.len(), MAX_COMMENT);
    }

    #[test]
    fn quoted_text_reads_back_as_one_argument() {
        for input in ["a b", "a\"b", "x\\", "\\\"", "a\" -j ACCEPT\n-A INPUT -j DROP #", "'q'", "", "plain", "é\0\n"] {
            let rule = format!("-d 10.0.0.1/32 -m comment --comment {} -j WEFT-SVC-X", quote(input, MAX_COMMENT));
            assert!(!rule.contains('\n') && !rule.contains('\0'), "{rule:?}");
            let args = split_args(&rule);
            assert_eq!(args.len(), 8, "{rule:?} -> {args:?}");
            let sanitized: String =
                input.chars().map(|c| if c == ' ' || c.is_ascii_graphic() { c } else { '?' }).collect();
            assert_eq!(args[5], sanitized, "{rule:?}");
            assert_eq!(jump_target(&rule).as_deref(), Some("WEFT-SVC-X"));
        }
    }

    #[test]
    fn kernel_names() {
        assert!(is_kernel_name("WEFT-SVC-XPGD46QRK7WJZT7O", MAX_CHAIN));
        assert!(is_kernel_name("WEFT-D-10.96.0.0-16", MAX_CHAIN));
        for bad in ["", "-X", "!x", "a b", "a\"b", "a\nb", "é", &"x".repeat(MAX_CHAIN + 1)] {
            assert!(!is_kernel_name(bad, MAX_CHAIN), "{bad:?}");
        }
    }

    #[test]
    fn command_runner_streams_the_input_in_and_the_output_out_line_by_line() {
        let mut r = CommandRunner::new();
        // More than a pipe holds, written in pieces: `cat` echoes it while we are still writing.
        let line = "x".repeat(999);
        let mut input = |w: &mut dyn Write| (0..1000).try_for_each(|_| writeln!(w, "{line}"));
        let out = r.run_writing("cat", &[], &mut input).unwrap();
        assert_eq!(out.len(), 1_000_000);
        let mut lines = Vec::new();
        r.run_reading("printf", &["a\\nb b\\n\\nc"], &mut |l| lines.push(l.to_string())).unwrap();
        assert_eq!(lines, ["a", "b b", "", "c"]);
    }

    #[test]
    fn a_tool_that_fails_reports_its_own_error_even_when_it_stopped_reading_our_input() {
        let mut r = CommandRunner::new();
        let mut input = |w: &mut dyn Write| (0..10_000).try_for_each(|_| w.write_all(&[b'x'; 1000]));
        let err = r.run_writing("sh", &["-c", "echo 'line 1: bad rule' >&2; exit 2"], &mut input).unwrap_err();
        assert!(matches!(&err, Error::Failed { stderr, .. } if stderr == "line 1: bad rule"), "{err:?}");
        let err = r.run_reading("sh", &["-c", "echo out; echo nope >&2; exit 1"], &mut |_| {}).unwrap_err();
        assert!(matches!(&err, Error::Failed { stderr, .. } if stderr == "nope"), "{err:?}");
    }

    #[test]
    fn a_comment_mentioning_a_jump_is_not_a_jump() {
        let save = "*nat\n:WEFT-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"x -j WEFT-EVIL\" -j WEFT-SERVICES\nCOMMIT\n";
        let (_, hooks) = scan_save(save, |n| n.starts_with("WEFT-"));
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].3, "WEFT-SERVICES");
    }
}
