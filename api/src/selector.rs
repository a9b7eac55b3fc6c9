//! kubectl's label selector strings (`-l app=web,tier!=db,env in (a,b),!legacy`) and the LabelSelectors of
//! workloads, parsed into one requirement list that matches label maps. Pure.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid label selector {selector:?}: {problem}")]
    Selector { selector: String, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One requirement of an equality- or set-based label selector.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    fn key(&self) -> &str {
        match self {
            Requirement::Eq(k, _)
            | Requirement::NotEq(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |vs: &Vec<String>| {
            let mut vs = vs.clone();
            vs.sort();
            vs.join(",")
        };
        match self {
            Requirement::Eq(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEq(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, vs) => write!(f, "{k} in ({})", set(vs)),
            Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", set(vs)),
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::NotExists(k) => write!(f, "!{k}"),
        }
    }
}

/// A label selector: from `-l` (`app=web,tier!=db,env in (a,b),!legacy`), or from a workload's LabelSelector
/// (matchLabels and matchExpressions) or a ReplicationController's map. Empty selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0, 0, Vec::new());
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// The key and the rest of `part` if it is `key <word> rest` (e.g. `env in (a,b)`).
fn split_word<'a>(part: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    let mut it = part.splitn(2, char::is_whitespace);
    let key = it.next()?;
    let rest = it.next()?.trim_start();
    let rest = rest.strip_prefix(word)?;
    (rest.starts_with(|c: char| c.is_whitespace() || c == '(')).then_some((key, rest))
}

impl Selector {
    pub fn parse(s: &str) -> Result<Selector> {
        let err = |problem: String| Error::Selector { selector: s.to_string(), problem };
        let mut reqs = Vec::new();
        for part in split_top(s).into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("{part:?}: expected (values)")))?;
                Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
            };
            let req = if let Some((k, rest)) = split_word(part, "notin") {
                Requirement::NotIn(k.into(), set(rest)?)
            } else if let Some((k, rest)) = split_word(part, "in") {
                let values = set(rest)?;
                if values.is_empty() {
                    return Err(err(format!("{part:?}: for 'in', 'notin' operators, values set can't be empty")));
                }
                Requirement::In(k.into(), values)
            } else if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEq(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Requirement::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else {
                Requirement::Exists(part.into())
            };
            let key = req.key();
            if !crate::service::is_label_key(key) {
                return Err(err(format!("{key:?} is not a valid label key")));
            }
            let values: Vec<&String> = match &req {
                Requirement::Eq(_, v) | Requirement::NotEq(_, v) => vec![v],
                Requirement::In(_, vs) | Requirement::NotIn(_, vs) => vs.iter().collect(),
                _ => vec![],
            };
            if let Some(v) = values.into_iter().find(|v| !crate::service::is_label_value(v)) {
                return Err(err(format!("{v:?} is not a valid label value")));
            }
            reqs.push(req);
        }
        Ok(Selector(reqs))
    }

    /// `metav1.LabelSelectorAsSelector`: matchLabels as equalities, then matchExpressions, ordered by key.
    pub fn from_label_selector(ls: &LabelSelector) -> Result<Selector> {
        let mut reqs: Vec<Requirement> =
            ls.match_labels.iter().flatten().map(|(k, v)| Requirement::Eq(k.clone(), v.clone())).collect();
        for (i, e) in ls.match_expressions.iter().flatten().enumerate() {
            let err = |problem: String| Error::Selector { selector: format!("matchExpressions[{i}]"), problem };
            let values = e.values.clone().unwrap_or_default();
            let req = match e.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(err("for 'in', 'notin' operators, values set can't be empty".into()))
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(err("values set must be empty for exists and does not exist".into()))
                }
                "In" => Requirement::In(e.key.clone(), values),
                "NotIn" => Requirement::NotIn(e.key.clone(), values),
                "Exists" => Requirement::Exists(e.key.clone()),
                "DoesNotExist" => Requirement::NotExists(e.key.clone()),
                op => return Err(err(format!("{op:?} is not a valid label selector operator"))),
            };
            reqs.push(req);
        }
        reqs.sort_by(|a, b| a.key().cmp(b.key()));
        Ok(Selector(reqs))
    }

    /// `labels.SelectorFromSet`: every pair must match (a ReplicationController's or a Service's selector).
    pub fn from_map(map: &BTreeMap<String, String>) -> Selector {
        Selector(map.iter().map(|(k, v)| Requirement::Eq(k.clone(), v.clone())).collect())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let get = |k: &str| labels.and_then(|l| l.get(k)).map(String::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => get(k) == Some(v.as_str()),
            Requirement::NotEq(k, v) => get(k) != Some(v.as_str()),
            Requirement::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::NotIn(k, vs) => !get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// `selector.String()`: the requirements joined by commas; empty for a selector that selects everything.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(|r| r.to_string()).collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors() {
        let l = labels(&[("app", "web"), ("tier", "fe"), ("env", "prod")]);
        let cases = [
            ("app=web", true),
            ("app==web,tier=fe", true),
            ("app=db", false),
            ("app!=db", true),
            ("missing!=x", true),
            ("tier in (fe, be)", true),
            ("tier in (be)", false),
            ("tier notin (fe)", false),
            ("missing notin (fe)", true),
            ("env in (prod,staging),!legacy", true),
            ("env in(prod)", true),
            ("app", true),
            ("!app", false),
            ("!legacy", true),
            ("index=1,app", false),
            ("", true),
        ];
        for (sel, want) in cases {
            assert_eq!(Selector::parse(sel).unwrap().matches(Some(&l)), want, "{sel}");
        }
        assert!(Selector::parse("bad key=x").is_err());
        assert!(Selector::parse("env in (a").is_err());
        assert!(Selector::parse("env in ()").is_err());
        assert!(Selector::parse("app=not valid").is_err());
        // A key that merely contains the word is an equality, not a set.
        assert_eq!(Selector::parse("login=in").unwrap().to_string(), "login=in");
    }
}
