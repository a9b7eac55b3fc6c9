//! The iptables-restore/save machinery every mode that writes netfilter rules shares: running the tools (a
//! `Runner`), reading our footprint back from `iptables-save`, and the one quoting function for text handed to
//! a kernel tool (comments; later nft, ipset, IPVS and eBPF names). Runs only the programs it is asked to run.

use std::collections::BTreeSet;
use std::io::Write as _;
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
    let (mut chains, mut hooks) = (BTreeSet::new(), Vec::new());
    let mut table = None;
    for line in text.lines() {
        if let Some(t) = line.strip_prefix('*') {
            table = match t.trim() {
                "nat" => Some(Table::Nat),
                "filter" => Some(Table::Filter),
                _ => None,
            };
            continue;
        }
        let Some(t) = table else { continue };
        if let Some(decl) = line.strip_prefix(':') {
            if let Some(name) = decl.split_whitespace().next().filter(|n| owns(n)) {
                chains.insert((t, name.to_string()));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let Some((chain, rest)) = rule.split_once(' ') else { continue };
            let Some(target) = jump_target(rest) else { continue };
            if !chain.starts_with("WEFT-") && owns(&target) {
                hooks.push((t, chain.to_string(), rest.to_string(), target));
            }
        }
    }
    (chains, hooks)
}

/// Runs the iptables tools. The real one is `CommandRunner`; tests run it inside a namespace.
pub trait Runner: Send {
    /// Runs `program args`, feeding `stdin`; returns stdout, or an error carrying stderr.
    fn run(&mut self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>>;
}

/// `iptables-save` output of every table, as text.
pub fn save(runner: &mut dyn Runner) -> Result<String> {
    Ok(String::from_utf8_lossy(&runner.run("iptables-save", &[], None)?).into_owned())
}

/// One `iptables-restore --noflush` of `input` (waiting up to 5 s for the xtables lock).
pub fn restore(runner: &mut dyn Runner, input: &[u8]) -> Result<()> {
    runner.run("iptables-restore", &["-w", "5", "--noflush"], Some(input)).map(|_| ())
}

/// Parses `input` as `iptables-restore --test` does, committing nothing: whether the tool would take it.
pub fn test_restore(runner: &mut dyn Runner, input: &[u8]) -> Result<()> {
    runner.run("iptables-restore", &["-w", "5", "--noflush", "--test"], Some(input)).map(|_| ())
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

impl Runner for CommandRunner {
    fn run(&mut self, program: &str, args: &[&str], stdin: Option<&[u8]>) -> Result<Vec<u8>> {
        let mut cmd = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
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
            return Err(Error::Failed {
                program: program.to_string(),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        if let Some(Ok(Err(e))) = write_result {
            return Err(spawn_err(e));
        }
        Ok(out.stdout)
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
    fn a_comment_mentioning_a_jump_is_not_a_jump() {
        let save = "*nat\n:WEFT-SERVICES - [0:0]\n-A PREROUTING -m comment --comment \"x -j WEFT-EVIL\" -j WEFT-SERVICES\nCOMMIT\n";
        let (_, hooks) = scan_save(save, |n| n.starts_with("WEFT-"));
        assert_eq!(hooks.len(), 1);
        assert_eq!(hooks[0].3, "WEFT-SERVICES");
    }
}
