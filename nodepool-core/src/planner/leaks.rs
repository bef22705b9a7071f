//! The leak rules: which servers and images in a cloud's listing Nodepool
//! made but no longer accounts for, and why.
//!
//! One rule each, used everywhere it matters: the launcher's cleanup
//! ([`plan`](super::plan) deletes a server found leaked by two leak checks
//! in a row, since a listing may race a launch or a deletion) and the
//! admin command's `alien-list` / `alien-image-list`, which show what one
//! listing finds (`nodepool_core::admin`). Plain functions of a listing and
//! the store's records: no IO, no clock.

use std::collections::BTreeSet;

use super::fast::FastMap;
use crate::config::ProviderConfig;
use crate::model::{Node, NodeState, UploadState};
use crate::provider::{CloudImageInfo, IMAGE_BUILD_ID, IMAGE_PROVIDER, Instance};
use crate::store::{NodeRecord, UploadRecord};

/// Why a server counts as leaked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeakReason {
    /// Tagged with the provider's name but with no node id.
    NoNodeId,
    /// No node of the provider has the node id it is tagged with.
    UnknownNode {
        /// The node id it is tagged with.
        node: String,
    },
    /// Its node has moved on to another server: a leftover of an earlier
    /// launch attempt of that node.
    Superseded {
        /// The node id it is tagged with.
        node: String,
        /// The server the node has now.
        current: String,
    },
}

impl std::fmt::Display for LeakReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeakReason::NoNodeId => f.write_str("tagged with no node id"),
            LeakReason::UnknownNode { node } => write!(f, "node {node} is not in the store"),
            LeakReason::Superseded { node, current } => {
                write!(f, "node {node} has moved on to server {current}")
            }
        }
    }
}

/// A server of a listing that the leak rule finds leaked.
#[derive(Clone, Debug, PartialEq)]
pub struct Leak<'a> {
    /// The server, as listed.
    pub instance: &'a Instance,
    /// Why it is leaked.
    pub reason: LeakReason,
}

/// The store's nodes, by provider and node id, as the leak rule looks them
/// up. Built once for any number of listings.
#[derive(Debug)]
pub struct KnownNodes<'a> {
    by_id: FastMap<(&'a str, &'a str), &'a Node>,
}

impl<'a> KnownNodes<'a> {
    /// Indexes node records (a listing of `/nodepool/nodes`).
    pub fn new(nodes: &'a [NodeRecord]) -> Self {
        KnownNodes {
            by_id: nodes
                .iter()
                .map(|r| ((r.node.provider.as_str(), r.id.as_str()), &*r.node))
                .collect(),
        }
    }

    fn get(&self, provider: &str, id: &str) -> Option<&'a Node> {
        self.by_id.get(&(provider, id)).copied()
    }
}

/// The servers of `provider`'s listing that Nodepool launched and no longer
/// accounts for, in listing order.
///
/// A server is ours when its `nodepool_provider_name` tag names the
/// provider; it is leaked when it has no node id, when no node of the
/// provider has that id, or when that node has moved on to another server
/// and is not launching (a node in `init`/`building` may be on its way to
/// this very server). Servers tagged for another provider, or not tagged
/// at all, are never leaks: they are someone else's.
///
/// ```no_run
/// use nodepool_core::planner::leaks::{KnownNodes, leaked_servers};
/// # fn listing() -> (Vec<nodepool_core::store::NodeRecord>, Vec<nodepool_core::provider::Instance>) { unimplemented!() }
/// let (nodes, servers) = listing();
/// let known = KnownNodes::new(&nodes);
/// for leak in leaked_servers("cloud1", &servers, &known) {
///     println!("{} is leaked: {}", leak.instance.external_id, leak.reason);
/// }
/// ```
pub fn leaked_servers<'a>(
    provider: &str,
    instances: &'a [Instance],
    known: &KnownNodes<'_>,
) -> Vec<Leak<'a>> {
    let mut out = Vec::new();
    for inst in instances {
        if inst.provider_name().as_deref() != Some(provider) {
            continue;
        }
        let reason = match inst.node_id() {
            None => LeakReason::NoNodeId,
            Some(id) => match known.get(provider, &id) {
                None => LeakReason::UnknownNode { node: id },
                Some(n) => match n.external_id.as_deref() {
                    Some(current)
                        if current != inst.external_id
                            && !matches!(n.state, NodeState::Init | NodeState::Building) =>
                    {
                        LeakReason::Superseded {
                            node: id,
                            current: current.to_owned(),
                        }
                    }
                    _ => continue,
                },
            },
        };
        out.push(Leak {
            instance: inst,
            reason,
        });
    }
    out
}

/// The images of `provider`'s listing that Nodepool uploaded and no longer
/// accounts for, in listing order: tagged with a build id
/// (`nodepool_build_id`) and not the cloud image of a `ready` upload to the
/// provider of a diskimage it lists (Nodepool's rule). Images tagged with
/// another provider's name (`nodepool_provider_name`) are that provider's
/// business and never listed, so two providers on one cloud project do not
/// list each other's.
pub fn alien_images<'a>(
    provider: &ProviderConfig,
    images: &'a [CloudImageInfo],
    uploads: &[UploadRecord],
) -> Vec<&'a CloudImageInfo> {
    let known: BTreeSet<&str> = uploads
        .iter()
        .filter(|u| {
            u.provider == provider.name
                && u.upload.state == UploadState::Ready
                && provider.diskimage(&u.image).is_some()
        })
        .filter_map(|u| u.upload.external_id.as_deref())
        .collect();
    images
        .iter()
        .filter(|img| img.properties.contains_key(IMAGE_BUILD_ID))
        .filter(|img| !known.contains(img.id.as_str()))
        .filter(|img| {
            img.properties
                .get(IMAGE_PROVIDER)
                .is_none_or(|p| *p == provider.name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::model::{ImageUpload, Node};
    use crate::provider::InstanceStatus;

    fn server(external_id: &str, meta: &[(&str, &str)]) -> Instance {
        Instance {
            external_id: external_id.into(),
            name: format!("srv-{external_id}"),
            status: InstanceStatus::Active,
            metadata: meta
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            public_ipv4: None,
            private_ipv4: None,
            public_ipv6: None,
            interface_ip: None,
            az: None,
            region: None,
            cloud: None,
            host_id: None,
            resources: None,
        }
    }

    fn node(id: &str, provider: &str, state: NodeState, server: Option<&str>) -> NodeRecord {
        let mut n = Node::new(state, 1.0, provider, "main", vec!["small".into()]);
        n.external_id = server.map(str::to_owned);
        NodeRecord {
            id: id.into(),
            node: Arc::new(n),
            version: 0,
            locked: false,
        }
    }

    fn tagged(id: &str, node: &str, provider: &str) -> Instance {
        server(
            id,
            &[
                ("nodepool_node_id", node),
                ("nodepool_provider_name", provider),
            ],
        )
    }

    #[test]
    fn every_reason_and_every_non_leak() {
        let nodes = [
            node("0000000001", "p1", NodeState::Ready, Some("srv-a")),
            node("0000000002", "p1", NodeState::InUse, Some("srv-b")),
            node("0000000003", "p1", NodeState::Building, Some("srv-c")),
            node("0000000004", "p1", NodeState::Init, None),
            node("0000000005", "p2", NodeState::Ready, Some("srv-e")),
        ];
        let listing = [
            // Ours and accounted for.
            tagged("srv-a", "0000000001", "p1"),
            // An earlier attempt of a node now on srv-b.
            tagged("srv-old-b", "0000000002", "p1"),
            // A node still launching may be on its way to this server.
            tagged("srv-new-c", "0000000003", "p1"),
            // A node with no server yet: this may become its server.
            tagged("srv-d", "0000000004", "p1"),
            // A node of another provider with that id does not count.
            tagged("srv-e", "0000000005", "p1"),
            // Another provider's server.
            tagged("srv-f", "0000009999", "p2"),
            // Not tagged at all: not ours.
            server("srv-g", &[]),
            // Ours, but with no node id.
            server("srv-h", &[("nodepool_provider_name", "p1")]),
            // The legacy JSON tag of older versions is read too.
            server(
                "srv-i",
                &[("nodepool", r#"{"node_id": 77, "provider_name": "p1"}"#)],
            ),
        ];
        let known = KnownNodes::new(&nodes);
        let got: Vec<(&str, LeakReason)> = leaked_servers("p1", &listing, &known)
            .into_iter()
            .map(|l| (l.instance.external_id.as_str(), l.reason))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "srv-old-b",
                    LeakReason::Superseded {
                        node: "0000000002".into(),
                        current: "srv-b".into()
                    }
                ),
                (
                    "srv-e",
                    LeakReason::UnknownNode {
                        node: "0000000005".into()
                    }
                ),
                ("srv-h", LeakReason::NoNodeId),
                (
                    "srv-i",
                    LeakReason::UnknownNode {
                        node: "0000000077".into()
                    }
                ),
            ]
        );
        assert_eq!(
            got[0].1.to_string(),
            "node 0000000002 has moved on to server srv-b"
        );
        // p2's view of the same listing: only its own tagged servers.
        let got: Vec<&str> = leaked_servers("p2", &listing, &known)
            .into_iter()
            .map(|l| l.instance.external_id.as_str())
            .collect();
        assert_eq!(got, ["srv-f"]);
        assert!(leaked_servers("p3", &listing, &known).is_empty());
    }

    #[test]
    fn alien_images_are_tagged_unknown_and_not_another_providers() {
        let config = Config::from_yaml(
            "labels: [{name: small}]\n\
             diskimages: [{name: deb}, {name: cent}]\n\
             providers:\n  - name: p1\n    driver: simulated\n    diskimages: [{name: deb}]\n",
        )
        .expect("valid");
        let p1 = config.provider("p1").expect("p1");
        let image = |id: &str, props: &[(&str, &str)]| CloudImageInfo {
            id: id.into(),
            name: format!("name-{id}"),
            status: "active".into(),
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let upload = |image: &str, provider: &str, state: UploadState, ext: &str| {
            let mut u = ImageUpload::new(1.0, None);
            u.set_state(state, 1.0);
            u.external_id = Some(ext.into());
            UploadRecord {
                image: image.into(),
                build_id: "b".into(),
                provider: provider.into(),
                id: "0000000001".into(),
                upload: u,
                version: 0,
                locked: false,
                uploads_locked: false,
            }
        };
        let uploads = [
            upload("deb", "p1", UploadState::Ready, "img-ready"),
            upload("deb", "p1", UploadState::Deleting, "img-deleting"),
            // p1 does not list cent: its upload does not vouch for the image.
            upload("cent", "p1", UploadState::Ready, "img-cent"),
            upload("deb", "p2", UploadState::Ready, "img-p2"),
        ];
        let build = [(IMAGE_BUILD_ID, "b")];
        let listing = [
            image("img-ready", &build),
            image("img-deleting", &build),
            image("img-cent", &build),
            image("img-p2", &build),
            image("img-cloud", &[]),
            image(
                "img-other",
                &[(IMAGE_BUILD_ID, "b"), (IMAGE_PROVIDER, "p2")],
            ),
            image("img-mine", &[(IMAGE_BUILD_ID, "b"), (IMAGE_PROVIDER, "p1")]),
        ];
        let got: Vec<&str> = alien_images(p1, &listing, &uploads)
            .into_iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(got, ["img-deleting", "img-cent", "img-p2", "img-mine"]);
    }
}
