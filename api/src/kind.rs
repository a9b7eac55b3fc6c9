//! The registry of kinds weft stores, in one table: each kind's names (kind, resource, singular, kubectl's short
//! names), scope and group/version (taken from k8s-openapi's types), the enum of typed objects of any kind, and the
//! two dispatch macros (`with_kind!`: a kind to its type; `with_object!`: an object to its typed value). The CLI
//! (which hangs its printers on these kinds), the manifest reader and the controllers name kinds through it. Pure.

use std::fmt;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, ReplicationController, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use k8s_openapi::{Metadata, Resource};

use crate::store::{Object, ObjectKey};

/// What the registry knows of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: Kind,
    /// The kind as manifests name it: `Deployment`.
    pub name: &'static str,
    /// `apps`; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// `apps/v1`, `v1`.
    pub api_version: &'static str,
    /// The plural in URLs and kubectl's resource names: `deployments`.
    pub resource: &'static str,
    /// kubectl's singular: `deployment`.
    pub singular: &'static str,
    /// kubectl's short names: `deploy`.
    pub short_names: &'static [&'static str],
    pub namespaced: bool,
}

impl KindInfo {
    /// `resource[.group]`, as kubectl names resources in messages (`deployments.apps`, `services`).
    pub fn qualified_resource(&self) -> String {
        qualified(self.resource, self.group)
    }

    /// `singular[.group]`, kubectl's word in `deployment.apps/web scaled` and `service "x" deleted`.
    pub fn qualified_singular(&self) -> String {
        qualified(self.singular, self.group)
    }

    /// True when `word` (case-insensitive, optionally `.group`-qualified) is one of this kind's resource names.
    pub fn is_named(&self, word: &str) -> bool {
        let word = word.to_lowercase();
        let (base, group) = match word.split_once('.') {
            Some((b, g)) => (b, Some(g)),
            None => (word.as_str(), None),
        };
        // `deployments.apps` and `deployments.apps/v1`-style suffixes name the group; `services.v1` the version.
        let group_ok = group.is_none_or(|g| {
            let g = g.split('/').next().unwrap_or(g);
            g == self.group || (self.group.is_empty() && g == self.version)
        });
        group_ok
            && (base == self.resource
                || base == self.singular
                || base == self.name.to_lowercase()
                || self.short_names.contains(&base))
    }
}

fn qualified(word: &str, group: &str) -> String {
    if group.is_empty() {
        word.to_string()
    } else {
        format!("{word}.{group}")
    }
}

/// Defines `Kind`, `AnyObject` and the table from one list: variant, type, singular, short names.
macro_rules! registry {
    ($( $variant:ident: $ty:ty, $singular:literal, [$($short:literal),*]; )*) => {
        /// Every kind weft stores.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Kind {
            $($variant,)*
        }

        impl Kind {
            /// Every kind, in the registry's order.
            pub const ALL: &'static [Kind] = &[$(Kind::$variant,)*];

            pub fn info(self) -> &'static KindInfo {
                match self {
                    $(Kind::$variant => {
                        const INFO: KindInfo = KindInfo {
                            kind: Kind::$variant,
                            name: <$ty as Resource>::KIND,
                            group: <$ty as Resource>::GROUP,
                            version: <$ty as Resource>::VERSION,
                            api_version: <$ty as Resource>::API_VERSION,
                            resource: <$ty as Resource>::URL_PATH_SEGMENT,
                            singular: $singular,
                            short_names: &[$($short),*],
                            namespaced: <$ty as Object>::NAMESPACED,
                        };
                        &INFO
                    })*
                }
            }
        }

        /// A typed object of any registered kind (a manifest's document, a controller's write).
        #[derive(Debug, Clone, PartialEq)]
        pub enum AnyObject {
            $($variant($ty),)*
        }

        impl AnyObject {
            pub fn kind(&self) -> Kind {
                match self {
                    $(AnyObject::$variant(_) => Kind::$variant,)*
                }
            }
        }

        $(impl From<$ty> for AnyObject {
            fn from(o: $ty) -> AnyObject {
                AnyObject::$variant(o)
            }
        })*
    };
}

registry! {
    Pod: Pod, "pod", ["po"];
    ReplicaSet: ReplicaSet, "replicaset", ["rs"];
    ReplicationController: ReplicationController, "replicationcontroller", ["rc"];
    Deployment: Deployment, "deployment", ["deploy"];
    DaemonSet: DaemonSet, "daemonset", ["ds"];
    Service: Service, "service", ["svc"];
    Endpoints: Endpoints, "endpoints", ["ep"];
    Node: Node, "node", ["no"];
    Namespace: Namespace, "namespace", ["ns"];
    Lease: Lease, "lease", [];
}

/// Runs `$body` with `$K` the object type of `$kind` (a [`Kind`]). The arms must list every kind of the
/// registry; the `with_kind_covers_the_registry` test checks them against it.
#[macro_export]
macro_rules! with_kind {
    ($kind:expr, $K:ident => $body:expr) => {
        match $kind {
            $crate::kind::Kind::Pod => {
                type $K = $crate::k8s_openapi::api::core::v1::Pod;
                $body
            }
            $crate::kind::Kind::Service => {
                type $K = $crate::k8s_openapi::api::core::v1::Service;
                $body
            }
            $crate::kind::Kind::Endpoints => {
                type $K = $crate::k8s_openapi::api::core::v1::Endpoints;
                $body
            }
            $crate::kind::Kind::Node => {
                type $K = $crate::k8s_openapi::api::core::v1::Node;
                $body
            }
            $crate::kind::Kind::Namespace => {
                type $K = $crate::k8s_openapi::api::core::v1::Namespace;
                $body
            }
            $crate::kind::Kind::Deployment => {
                type $K = $crate::k8s_openapi::api::apps::v1::Deployment;
                $body
            }
            $crate::kind::Kind::ReplicaSet => {
                type $K = $crate::k8s_openapi::api::apps::v1::ReplicaSet;
                $body
            }
            $crate::kind::Kind::DaemonSet => {
                type $K = $crate::k8s_openapi::api::apps::v1::DaemonSet;
                $body
            }
            $crate::kind::Kind::ReplicationController => {
                type $K = $crate::k8s_openapi::api::core::v1::ReplicationController;
                $body
            }
            $crate::kind::Kind::Lease => {
                type $K = $crate::k8s_openapi::api::coordination::v1::Lease;
                $body
            }
        }
    };
}

/// Runs `$body` with `$o` bound to the typed object inside an [`AnyObject`] (by value, reference or mutable
/// reference, as `$obj` is).
#[macro_export]
macro_rules! with_object {
    ($obj:expr, $o:ident => $body:expr) => {
        match $obj {
            $crate::kind::AnyObject::Pod($o) => $body,
            $crate::kind::AnyObject::Service($o) => $body,
            $crate::kind::AnyObject::Endpoints($o) => $body,
            $crate::kind::AnyObject::Node($o) => $body,
            $crate::kind::AnyObject::Namespace($o) => $body,
            $crate::kind::AnyObject::Deployment($o) => $body,
            $crate::kind::AnyObject::ReplicaSet($o) => $body,
            $crate::kind::AnyObject::DaemonSet($o) => $body,
            $crate::kind::AnyObject::ReplicationController($o) => $body,
            $crate::kind::AnyObject::Lease($o) => $body,
        }
    };
}

impl Kind {
    /// The kind a manifest's `kind` names (`Deployment`), in any group version.
    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.info().name == name)
    }

    /// The kind of `apiVersion` + `kind` as stored (after conversion from older group versions).
    pub fn from_api(api_version: &str, name: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.info().api_version == api_version && k.info().name == name)
    }

    /// The kind a resource name on a command line means: plural, singular or short name, optionally with its group
    /// (`deployments.apps`), case-insensitive.
    pub fn from_resource(word: &str) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| k.info().is_named(word))
    }

    /// The kind an ownerReference names; older group versions (extensions/v1beta1, apps/v1beta2) name the same kinds.
    pub fn of_owner(r: &OwnerReference) -> Option<Kind> {
        Kind::from_name(&r.kind)
    }

    /// `Deployment`
    pub fn name(self) -> &'static str {
        self.info().name
    }

    /// `apps/v1`
    pub fn api_version(self) -> &'static str {
        self.info().api_version
    }

    pub fn namespaced(self) -> bool {
        self.info().namespaced
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl AnyObject {
    pub fn metadata(&self) -> &ObjectMeta {
        with_object!(self, o => o.metadata())
    }

    pub fn metadata_mut(&mut self) -> &mut ObjectMeta {
        with_object!(self, o => o.metadata_mut())
    }

    /// Its store key (namespace defaulted for namespaced kinds).
    pub fn key(&self) -> ObjectKey {
        with_object!(self, o => ObjectKey::of(o))
    }

    /// kubectl's `resource[.group]/name`, e.g. `service/my-service`, `deployment.apps/web`.
    pub fn display_name(&self) -> String {
        format!("{}/{}", self.kind().info().qualified_singular(), self.metadata().name.as_deref().unwrap_or(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_kind_covers_the_registry() {
        for &k in Kind::ALL {
            let (name, namespaced) = with_kind!(k, K => (K::KIND, <K as Object>::NAMESPACED));
            assert_eq!((name, namespaced), (k.name(), k.namespaced()), "{k:?}");
            let obj: AnyObject = with_kind!(k, K => K::default().into());
            assert_eq!(obj.kind(), k);
            assert!(with_object!(&obj, o => o.metadata().name.is_none()));
        }
    }

    #[test]
    fn kubectl_resource_names_find_their_kind() {
        // (word, kind, kubectl's resource name, kubectl's singular)
        let cases = [
            ("svc", Kind::Service, "services", "service"),
            ("Services", Kind::Service, "services", "service"),
            ("ep", Kind::Endpoints, "endpoints", "endpoints"),
            ("po", Kind::Pod, "pods", "pod"),
            ("no", Kind::Node, "nodes", "node"),
            ("ns", Kind::Namespace, "namespaces", "namespace"),
            ("deploy", Kind::Deployment, "deployments.apps", "deployment.apps"),
            ("deployments.apps", Kind::Deployment, "deployments.apps", "deployment.apps"),
            ("rs", Kind::ReplicaSet, "replicasets.apps", "replicaset.apps"),
            ("daemonset", Kind::DaemonSet, "daemonsets.apps", "daemonset.apps"),
            ("rc", Kind::ReplicationController, "replicationcontrollers", "replicationcontroller"),
            ("leases", Kind::Lease, "leases.coordination.k8s.io", "lease.coordination.k8s.io"),
        ];
        for (word, kind, resource, singular) in cases {
            assert_eq!(Kind::from_resource(word), Some(kind), "{word}");
            assert_eq!(kind.info().qualified_resource(), resource);
            assert_eq!(kind.info().qualified_singular(), singular);
        }
        for word in ["deploy.batch", "foo", "", "services.apps"] {
            assert_eq!(Kind::from_resource(word), None, "{word}");
        }
        assert_eq!(Kind::from_api("apps/v1", "Deployment"), Some(Kind::Deployment));
        assert_eq!(Kind::from_api("extensions/v1beta1", "Deployment"), None);
        assert_eq!(Kind::from_name("ReplicaSet"), Some(Kind::ReplicaSet));
        let pod = AnyObject::from(Pod {
            metadata: ObjectMeta { name: Some("a".into()), ..Default::default() },
            ..Default::default()
        });
        assert_eq!((pod.display_name(), pod.key().to_string()), ("pod/a".to_string(), "default/a".to_string()));
    }
}
