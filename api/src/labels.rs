//! Label selectors as the API types carry them: a `LabelSelector` (matchLabels plus set-based matchExpressions with
//! In, NotIn, Exists, DoesNotExist) as ReplicaSets, Deployments and DaemonSets use it, and the equality maps of
//! ReplicationControllers and Services. Pure; the controllers and the CLI match objects with it.

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
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl Operator {
    pub fn as_str(self) -> &'static str {
        match self {
            Operator::In => "In",
            Operator::NotIn => "NotIn",
            Operator::Exists => "Exists",
            Operator::DoesNotExist => "DoesNotExist",
        }
    }
}

/// One requirement; values are sorted and deduplicated.
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
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            Operator::NotIn => !value.is_some_and(|v| self.values.contains(v)),
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

impl Selector {
    pub fn everything() -> Selector {
        Selector::All(Vec::new())
    }

    /// `metav1.LabelSelectorAsSelector`: None selects nothing; `{}` selects everything; matchLabels become `In`
    /// requirements with one value.
    pub fn from_label_selector(sel: Option<&LabelSelector>) -> Result<Selector> {
        let Some(sel) = sel else { return Ok(Selector::Nothing) };
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(Requirement { key: k.clone(), operator: Operator::In, values: vec![v.clone()] });
        }
        for (index, e) in sel.match_expressions.iter().flatten().enumerate() {
            reqs.push(requirement(index, e)?);
        }
        reqs.sort();
        reqs.dedup();
        Ok(Selector::All(reqs))
    }

    /// An equality selector (ReplicationController, Service): every pair must be present. An empty map selects
    /// everything, as `labels.SelectorFromSet` does; callers that treat an empty map as "no selector" check first.
    pub fn from_map(map: &BTreeMap<String, String>) -> Selector {
        Selector::All(
            map.iter()
                .map(|(k, v)| Requirement { key: k.clone(), operator: Operator::In, values: vec![v.clone()] })
                .collect(),
        )
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

/// kubectl's rendering: `app=web,tier in (backend,frontend),!legacy`; `<none>` for nothing.
impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reqs = match self {
            Selector::Nothing => return f.write_str("<none>"),
            Selector::All(r) => r,
        };
        let parts: Vec<String> = reqs
            .iter()
            .map(|r| match r.operator {
                Operator::In if r.values.len() == 1 => format!("{}={}", r.key, r.values[0]),
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
}
