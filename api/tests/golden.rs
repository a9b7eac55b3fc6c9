//! Golden files for `weft get` tables: the objects in testdata/tables.yaml rendered at a fixed "now" must match
//! testdata/*.golden byte for byte. `UPDATE_GOLDEN=1 cargo test -p weft-api --test golden` rewrites them.

use std::path::PathBuf;

use k8s_openapi::jiff::Timestamp;
use weft_api::manifest::{self, AnyObject};
use weft_api::table::{self, Columns};

fn testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata").join(name)
}

fn check(name: &str, got: &str) {
    let path = testdata(name);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
    assert_eq!(got, want, "{name} differs; UPDATE_GOLDEN=1 rewrites it after review");
}

#[test]
fn tables_match_golden_files() {
    let docs = manifest::load(&[testdata("tables.yaml")]).unwrap();
    let now: Timestamp = "2026-01-02T00:00:00Z".parse().unwrap();
    let (mut svcs, mut eps, mut pods, mut nodes, mut nss) = (vec![], vec![], vec![], vec![], vec![]);
    for d in docs {
        assert!(d.unknown_fields.is_empty(), "{}: {:?} did not survive decoding", d.source, d.unknown_fields);
        match d.object {
            AnyObject::Service(s) => svcs.push(s),
            AnyObject::Endpoints(e) => eps.push(e),
            AnyObject::Pod(p) => pods.push(p),
            AnyObject::Node(n) => nodes.push(n),
            AnyObject::Namespace(n) => nss.push(n),
            other => panic!("unexpected {other:?}"),
        }
    }
    let default_svcs: Vec<_> =
        svcs.iter().filter(|s| s.metadata.namespace.as_deref() == Some("default")).cloned().collect();
    let plain = Columns::default();
    let wide = Columns { wide: true, namespace: false };
    let all = Columns { wide: false, namespace: true };
    check("get-svc.golden", &table::services(&default_svcs, plain, now));
    check("get-svc-wide.golden", &table::services(&default_svcs, wide, now));
    check("get-svc-all-namespaces.golden", &table::services(&svcs, all, now));
    check("get-ep.golden", &table::endpoints(&eps, plain, now));
    check("get-po.golden", &table::pods(&pods, plain, now));
    check("get-po-wide.golden", &table::pods(&pods, wide, now));
    check("get-no.golden", &table::nodes(&nodes, plain, now));
    check("get-ns.golden", &table::namespaces(&nss, plain, now));
}
