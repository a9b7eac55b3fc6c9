//! Resource quantities (`100m`, `0.5`, `128Mi`, `1e3`, `2G`) as the scheduler compares them: in thousandths of the
//! unit (millicores for cpu, millibytes for memory), rounded up as Kubernetes' `MilliValue` does. Parsing is the
//! API crate's (the one `weft describe` uses).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// The quantity in thousandths, or None if it does not parse (exact decimal arithmetic, `weft_api::quantity`).
pub fn milli(q: &str) -> Option<i128> {
    weft_api::quantity::Quantity::parse(q).map(|q| q.milli())
}

/// `resources[name]` in thousandths; 0 when absent or unparseable.
pub fn get(resources: Option<&BTreeMap<String, Quantity>>, name: &str) -> i128 {
    resources.and_then(|r| r.get(name)).and_then(|q| milli(&q.0)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantities_parse_like_kubernetes() {
        let cases = [
            ("100m", 100),
            ("1", 1000),
            ("0.5", 500),
            ("2.5", 2500),
            ("100Mi", 100 * 1024 * 1024 * 1000),
            ("1Gi", 1024 * 1024 * 1024 * 1000),
            ("1k", 1_000_000),
            ("129M", 129_000_000_000),
            ("1e3", 1_000_000),
            ("128974848", 128_974_848_000),
            ("1n", 1),
        ];
        for (q, want) in cases {
            assert_eq!(super::milli(q), Some(want), "{q}");
        }
        assert_eq!(super::milli("ten"), None);
        assert_eq!(super::milli("1Xi"), None);
    }
}
