//! Label selectors, the one implementation every component uses: the `LabelSelector` of ReplicaSets, Deployments
//! and DaemonSets (matchLabels plus set-based matchExpressions with In, NotIn, Exists, DoesNotExist), the equality
//! maps of ReplicationControllers and Services, and kubectl's `-l` strings (`app=web,tier!=db,env in (a,b),!legacy`).
//! Pure; the controllers, the validation and the CLI match objects with it.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("matchExpressions[{index}].operator: {operator:?} is not one of In, NotIn, Exists, DoesNotExist")]
    Operator { index: usize, operator: String },
    #[error("matchExpressions[{index}].values: must be non-empty for {operator}")]
    MissingValues { index: usize, operator: &'static str },
    #[error("matchExpressions[{index}].values: must be empty for {operator}")]
    UnexpectedValues { index: usize, operator: &'static str },
    #[error("invalid label selector {selector:?}: {problem}")]
    Parse { selector: String, problem: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operator {
    /// `key=value` (also `==`), and every matchLabels pair.
    Equals,
    /// `key!=value`: also true when the key is absent.
    NotEquals,
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::Equals => "Equals",
            Operator::NotEquals => "NotEquals",
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

/// One requirement; values are sorted and deduplicated (one value for Equals and NotEquals).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

impl Requirement {
    fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        let value = labels.and_then(|l| l.get(&self.key));
        match self.operator {
            Operator::Equals | Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotEquals | Operator::NotIn => !value.is_some_and(|v| self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

/// A parsed selector. Kubernetes' rules: a missing selector selects nothing, an empty one everything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    Nothing,
    /// Every requirement must hold (none: everything matches).
    All(Vec<Requirement>),
}

/// The selector that matches every object (what an empty `-l` means).
impl Default for Selector {
    fn default() -> Self {
        Selector::everything()
    }
}

fn equals(key: &str, value: &str) -> Requirement {
    Requirement { key: key.to_string(), operator: Operator::Equals, values: vec![value.to_string()] }
}

/// Splits on commas that are not inside parentheses.
fn split_top(s: &str) -> Vec<&str> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
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
    pub fn everything() -> Selector {
        Selector::All(Vec::new())
    }

    /// kubectl's `-l` syntax (`labels.Parse`): comma-separated `k=v`, `k==v`, `k!=v`, `k in (a,b)`,
    /// `k notin (a,b)`, `k`, `!k`; keys and values are checked as the API checks labels. Empty selects everything.
    pub fn parse(s: &str) -> Result<Selector> {
        let err = |problem: String| Error::Parse { selector: s.to_string(), problem };
        let mut reqs = Vec::new();
        for part in split_top(s).into_iter().map(str::trim).filter(|p| !p.is_empty()) {
            let set = |rest: &str| -> Result<Vec<String>> {
                let inner = rest
                    .trim()
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(|| err(format!("{part:?}: expected (values)")))?;
                let mut values: Vec<String> =
                    inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect();
                values.sort();
                values.dedup();
                Ok(values)
            };
            let (key, operator, values) = if let Some((k, rest)) = split_word(part, "notin") {
                (k, Operator::NotIn, set(rest)?)
            } else if let Some((k, rest)) = split_word(part, "in") {
                (k, Operator::In, set(rest)?)
            } else if let Some((k, v)) = part.split_once("!=") {
                (k.trim(), Operator::NotEquals, vec![v.trim().to_string()])
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k.trim(), Operator::Equals, vec![v.trim().to_string()])
            } else if let Some(k) = part.strip_prefix('!') {
                (k.trim(), Operator::DoesNotExist, vec![])
            } else {
                (part, Operator::Exists, vec![])
            };
            if matches!(operator, Operator::In | Operator::NotIn) && values.is_empty() {
                return Err(err(format!("{part:?}: for 'in', 'notin' operators, values set can't be empty")));
            }
            if !crate::service::is_label_key(key) {
                return Err(err(format!("{key:?} is not a valid label key")));
            }
            if let Some(v) = values.iter().find(|v| !crate::service::is_label_value(v)) {
                return Err(err(format!("{v:?} is not a valid label value")));
            }
            reqs.push(Requirement { key: key.to_string(), operator, values });
        }
        Ok(Selector::All(reqs))
    }

    /// `metav1.LabelSelectorAsSelector`: None selects nothing; `{}` selects everything; matchLabels become
    /// equalities, then the matchExpressions, ordered by key (stable, so kubectl prints them in that order).
    pub fn from_label_selector(sel: Option<&LabelSelector>) -> Result<Selector> {
        let Some(sel) = sel else { return Ok(Selector::Nothing) };
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(equals(k, v));
        }
        for (index, e) in sel.match_expressions.iter().flatten().enumerate() {
            reqs.push(requirement(index, e)?);
        }
        reqs.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Selector::All(reqs))
    }

    /// An equality selector (ReplicationController, Service): every pair must be present. An empty map selects
    /// everything, as `labels.SelectorFromSet` does; callers that treat an empty map as "no selector" check first.
    pub fn from_map(map: &BTreeMap<String, String>) -> Selector {
        Selector::All(map.iter().map(|(k, v)| equals(k, v)).collect())
    }

    pub fn matches(&self, labels: Option<&BTreeMap<String, String>>) -> bool {
        match self {
            Selector::Nothing => false,
            Selector::All(reqs) => reqs.iter().all(|r| r.matches(labels)),
        }
    }

    /// True for the selector that matches every object.
    pub fn is_everything(&self) -> bool {
        matches!(self, Selector::All(r) if r.is_empty())
    }
}

fn requirement(index: usize, e: &LabelSelectorRequirement) -> Result<Requirement> {
    let operator = match e.operator.as_str() {
        "In" => Operator::In,
        "NotIn" => Operator::NotIn,
        "Exists" => Operator::Exists,
        "DoesNotExist" => Operator::DoesNotExist,
        other => return Err(Error::Operator { index, operator: other.to_string() }),
    };
    let mut values = e.values.clone().unwrap_or_default();
    values.sort();
    values.dedup();
    match operator {
        Operator::In | Operator::NotIn if values.is_empty() => {
            Err(Error::MissingValues { index, operator: operator.as_str() })
        }
        Operator::Exists | Operator::DoesNotExist if !values.is_empty() => {
            Err(Error::UnexpectedValues { index, operator: operator.as_str() })
        }
        _ => Ok(Requirement { key: e.key.clone(), operator, values }),
    }
}

/// `selector.String()` as kubectl prints it: `app=web,tier in (backend,frontend),!legacy`; empty for everything,
/// `<none>` for nothing.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reqs = match self {
            Selector::Nothing => return f.write_str("<none>"),
            Selector::All(r) => r,
        };
        let parts: Vec<String> = reqs
            .iter()
            .map(|r| match r.operator {
                Operator::Equals => format!("{}={}", r.key, r.values.join(",")),
                Operator::NotEquals => format!("{}!={}", r.key, r.values.join(",")),
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// True when every pair of `subset` is in `labels` (ReplicaSet's fullyLabeledReplicas, nodeSelector).
pub fn contains_all(labels: Option<&BTreeMap<String, String>>, subset: Option<&BTreeMap<String, String>>) -> bool {
    subset.into_iter().flatten().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn sel(json: serde_json::Value) -> LabelSelector {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn label_selectors_match_like_kubernetes() {
        use serde_json::json;
        let fe = labels(&[("app", "guestbook"), ("tier", "frontend")]);
        let be = labels(&[("app", "guestbook"), ("tier", "backend")]);
        let bare = labels(&[("app", "guestbook")]);
        let seed = json!({"matchLabels": {"tier": "frontend"},
                          "matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend"]}]});
        // (selector, labels, matches)
        let cases = [
            (seed.clone(), &fe, true),
            (seed.clone(), &be, false),
            (seed, &bare, false),
            (json!({}), &bare, true),
            (json!({"matchLabels": {"app": "guestbook"}}), &be, true),
            (
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["frontend", "backend"]}]}),
                &be,
                true,
            ),
            (json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["frontend"]}]}), &be, true),
            (json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["frontend"]}]}), &fe, false),
            (json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["frontend"]}]}), &bare, true),
            (json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}), &bare, false),
            (json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}), &fe, true),
            (json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}), &bare, true),
            (json!({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}), &fe, false),
        ];
        for (s, l, want) in cases {
            let parsed = Selector::from_label_selector(Some(&sel(s.clone()))).unwrap();
            assert_eq!(parsed.matches(Some(l)), want, "{s} vs {l:?}");
        }
        assert!(!Selector::from_label_selector(None).unwrap().matches(Some(&fe)), "a missing selector selects nothing");
        assert!(Selector::from_label_selector(Some(&sel(json!({})))).unwrap().matches(None));
    }

    #[test]
    fn invalid_expressions_name_the_field() {
        use serde_json::json;
        let cases = [
            (json!({"matchExpressions": [{"key": "a", "operator": "Equals", "values": ["x"]}]}), "operator"),
            (json!({"matchExpressions": [{"key": "a", "operator": "In"}]}), "must be non-empty for In"),
            (
                json!({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]}),
                "must be empty for Exists",
            ),
        ];
        for (s, want) in cases {
            let e = Selector::from_label_selector(Some(&sel(s))).unwrap_err().to_string();
            assert!(e.starts_with("matchExpressions[0]") && e.contains(want), "{e}");
        }
    }

    #[test]
    fn equality_maps_and_rendering() {
        let rc = Selector::from_map(&labels(&[("app", "nginx")]));
        assert!(rc.matches(Some(&labels(&[("app", "nginx"), ("x", "y")]))));
        assert!(!rc.matches(Some(&labels(&[("app", "web")]))));
        assert!(!rc.matches(None));
        assert_eq!(rc.to_string(), "app=nginx");
        let s = Selector::from_label_selector(Some(&sel(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["fe", "be"]},
                                 {"key": "legacy", "operator": "DoesNotExist"}]}))))
        .unwrap();
        assert_eq!(s.to_string(), "app=web,!legacy,tier in (be,fe)");
        assert!(contains_all(Some(&labels(&[("a", "1"), ("b", "2")])), Some(&labels(&[("a", "1")]))));
        assert!(!contains_all(Some(&labels(&[("a", "1")])), Some(&labels(&[("a", "2")]))));
        assert!(contains_all(None, None));
    }

    #[test]
    fn kubectl_selector_strings_parse_match_and_print() {
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
