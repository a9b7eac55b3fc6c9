//! Bounded property tests (issue 10) of what reads untrusted bytes: the manifest parser and the etcd decoders
//! (`store::check_value`). Inputs are the committed corpus (`tests/corpus/`) mutated at random — bytes dropped,
//! replaced, truncated, quotes, backslashes, newlines, NULs, non-ASCII and 64 KiB runs inserted. Properties:
//! nothing panics, and whatever is accepted is what a valid write would have stored. 256 cases, and each test
//! stops taking new cases after 5 s so `make test` stays quick on a loaded machine.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use proptest::prelude::*;
use weft_api::manifest;
use weft_api::service::ServiceRanges;
use weft_api::store::{check_value, parse_key, Object, ObjectKey};

const BUDGET: Duration = Duration::from_secs(5);

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .expect("the committed corpus")
        .map(|e| {
            let p = e.expect("corpus entry").path();
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), std::fs::read(&p).expect("a seed"))
        })
        .collect();
    seeds.sort();
    assert!(seeds.len() >= 5, "corpus at {}", dir.display());
    seeds
}

const INSERTS: &[&[u8]] = &[
    b"\"",
    b"\\",
    b"\n",
    b"\0",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    "é☕".as_bytes(),
    b"-1",
    b"1e999",
    b"null",
    b"\"\":",
];

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Replace(usize, u8),
    Insert(usize, usize),
    Long(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1usize..16).prop_map(|(at, n)| Mutation::Delete(at, n)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Replace(at, b)),
        (any::<usize>(), 0..INSERTS.len()).prop_map(|(at, i)| Mutation::Insert(at, i)),
        any::<usize>().prop_map(Mutation::Long),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut b: Vec<u8>, ms: &[Mutation]) -> Vec<u8> {
    for m in ms {
        let len = b.len().max(1);
        match *m {
            Mutation::Delete(at, n) => {
                let at = at % len;
                let end = (at + n).min(b.len());
                if at < end {
                    b.drain(at..end);
                }
            }
            Mutation::Replace(at, x) if !b.is_empty() => b[at % len] = x,
            Mutation::Replace(..) => {}
            Mutation::Insert(at, i) => {
                let at = at % (b.len() + 1);
                b.splice(at..at, INSERTS[i].iter().copied());
            }
            Mutation::Long(at) => {
                let at = at % (b.len() + 1);
                b.splice(at..at, std::iter::repeat_n(b'a', 64 * 1024));
            }
            Mutation::Truncate(at) => b.truncate(at % len),
        }
    }
    b
}

/// Accepted means valid: the checks a reader relies on hold for whatever `check_value` returns.
fn accepted_is_valid<K: Object>(key: &str, value: &[u8]) -> Result<(), TestCaseError> {
    if let Ok(obj) = check_value::<K>(key.as_bytes(), value, 7) {
        prop_assert!(obj.validate().is_ok(), "accepted but invalid: {key}");
        let want = parse_key::<K>(key).expect("accepted, so the key parses");
        prop_assert_eq!(ObjectKey::of(&obj), want);
        prop_assert_eq!(obj.metadata().resource_version.as_deref(), Some("7"));
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() }
}

#[test]
fn the_corpus_itself_decodes_as_expected() {
    let seeds = corpus();
    let get = |name: &str| seeds.iter().find(|(n, _)| n == name).map(|(_, b)| b.clone()).expect(name);
    check_value::<Service>(b"/registry/services/default/web", &get("service.json"), 1).expect("valid service");
    check_value::<Endpoints>(b"/registry/endpoints/default/web", &get("endpoints.json"), 1).expect("valid endpoints");
    check_value::<Pod>(b"/registry/pods/default/web-abcde", &get("pod.json"), 1).expect("valid pod");
    check_value::<Node>(b"/registry/nodes/node-1", &get("node.json"), 1).expect("valid node");
    let hostile = check_value::<Service>(b"/registry/services/default/evil", &get("hostile.json"), 1);
    assert!(hostile.unwrap_err().to_string().contains("spec.ports[0].name"));
    let docs = manifest::parse("manifest.yaml", &String::from_utf8_lossy(&get("manifest.yaml"))).expect("parses");
    assert_eq!(docs.len(), 3);
    manifest::validate(&docs, &ServiceRanges::default()).expect("valid manifest");
}

#[test]
fn etcd_decoders_never_panic_and_accept_only_valid_objects() {
    let seeds = corpus();
    let started = Instant::now();
    proptest!(config(), |(seed in 0..seeds.len(), ms in proptest::collection::vec(mutation(), 0..6))| {
        if started.elapsed() > BUDGET {
            return Ok(());
        }
        let value = mutate(seeds[seed].1.clone(), &ms);
        accepted_is_valid::<Service>("/registry/services/default/web", &value)?;
        accepted_is_valid::<Endpoints>("/registry/endpoints/default/web", &value)?;
        accepted_is_valid::<Pod>("/registry/pods/default/web-abcde", &value)?;
        accepted_is_valid::<Node>("/registry/nodes/node-1", &value)?;
        // The key is untrusted too.
        let key = String::from_utf8_lossy(&mutate(b"/registry/services/default/web".to_vec(), &ms)).into_owned();
        accepted_is_valid::<Service>(&key, &seeds[0].1)?;
    });
}

#[test]
fn the_manifest_parser_never_panics_and_what_validates_has_dns_names() {
    let seeds = corpus();
    let started = Instant::now();
    proptest!(config(), |(seed in 0..seeds.len(), ms in proptest::collection::vec(mutation(), 0..6))| {
        if started.elapsed() > BUDGET {
            return Ok(());
        }
        let text = String::from_utf8_lossy(&mutate(seeds[seed].1.clone(), &ms)).into_owned();
        let Ok(docs) = manifest::parse("fuzz.yaml", &text) else { return Ok(()) };
        if manifest::validate(&docs, &ServiceRanges::default()).is_err() {
            return Ok(());
        }
        for d in &docs {
            if let manifest::AnyObject::Service(s) = &d.object {
                for p in s.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                    let name = p.name.as_deref().unwrap_or("");
                    prop_assert!(name.is_empty() || weft_api::service::is_dns1123_label(name), "{name:?}");
                }
            }
        }
    });
}
