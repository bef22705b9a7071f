//! The leak rules: which servers, images, floating IPs and ports in a
//! cloud's listing Nodepool made (or left) and no longer accounts for, and
//! why.
//!
//! One rule each, used everywhere it matters: the launcher's cleanup
//! ([`plan`](super::plan) deletes a server found leaked by two leak checks
//! in a row, since a listing may race a launch or a deletion; unattached
//! floating IPs at once and DOWN ports seen in two listings
//! `port-cleanup-interval` apart, as Python does), the builder's cleanup
//! ([`plan_images`](super::images::plan_images) deletes an image found
//! leaked by two checks in a row) and the admin command's `alien-list` /
//! `alien-image-list`, which show what one listing finds
//! (`nodepool_core::admin`). Plain functions of a listing and the store's
//! records: no IO, no clock.

use std::collections::BTreeSet;

use super::fast::FastMap;
use crate::config::ProviderConfig;
use crate::model::{Node, NodeState, UploadState};
use crate::provider::{
    CloudImageInfo, CloudResource, IMAGE_BUILD_ID, IMAGE_PROVIDER, IMAGE_UPLOAD_ID, Instance,
    META_VALIDATION,
};
use crate::store::{ImageState, NodeRecord, UploadRecord};

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
    /// A builder's boot test of an upload that is no longer `uploading`
    /// (the builder died during the test).
    ValidationOver {
        /// `<image>/<build>/<upload>`, as tagged.
        upload: String,
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
            LeakReason::ValidationOver { upload } => {
                write!(
                    f,
                    "boot test of upload {upload}, which is no longer uploading"
                )
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
    /// `(<provider>, <image>/<build>/<upload>)` of uploads still
    /// `uploading`, whose boot test servers are not leaks.
    uploading: BTreeSet<(&'a str, String)>,
}

impl<'a> KnownNodes<'a> {
    /// Indexes node records (a listing of `/nodepool/nodes`).
    pub fn new(nodes: &'a [NodeRecord]) -> Self {
        KnownNodes {
            by_id: nodes
                .iter()
                .map(|r| ((r.node.provider.as_str(), r.id.as_str()), &*r.node))
                .collect(),
            uploading: BTreeSet::new(),
        }
    }

    /// Adds the store's uploads: a builder's boot test server
    /// (`validate`) is ours while its upload is `uploading`. Without
    /// them, every boot test server counts as leaked.
    pub fn with_uploads(mut self, uploads: &'a [UploadRecord]) -> Self {
        self.uploading = uploads
            .iter()
            .filter(|u| u.upload.state == UploadState::Uploading)
            .map(|u| {
                (
                    u.provider.as_str(),
                    validation_tag(&u.image, &u.build_id, &u.id),
                )
            })
            .collect();
        self
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
        if let Some(upload) = inst.metadata.get(META_VALIDATION) {
            if known.uploading.contains(&(provider, upload.clone())) {
                continue;
            }
            out.push(Leak {
                instance: inst,
                reason: LeakReason::ValidationOver {
                    upload: upload.clone(),
                },
            });
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

/// The [`META_VALIDATION`] tag of the boot test server of an upload.
pub fn validation_tag(image: &str, build: &str, upload: &str) -> String {
    format!("{image}/{build}/{upload}")
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
                && (provider.diskimage(&u.image).is_some()
                    || provider.snapshot_image(&u.image).is_some())
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

/// The images of `provider`'s listing that the builder uploaded and the
/// store no longer knows, in listing order: tagged with the provider's
/// name (`nodepool_provider_name`), a build id and an upload id, and no
/// upload record of the provider has that build and upload id (whatever
/// its state). Python's rule: the key is the build *and* the upload, since
/// upload ids repeat across builds. These are failed or half-finished
/// uploads, or a builder killed mid-upload; the builder deletes one found
/// leaked by two checks in a row.
///
/// Images of a build whose records could not all be read are never leaked
/// (their uploads are unknown, not missing). Untagged images, images tagged
/// for another provider, or with only part of the tags are someone else's:
/// [`alien_images`] shows them, nothing deletes them.
pub fn leaked_images<'a>(
    provider: &str,
    images: &'a [CloudImageInfo],
    state: &ImageState,
) -> Vec<&'a CloudImageInfo> {
    let known: BTreeSet<(&str, &str)> = state
        .uploads
        .iter()
        .filter(|u| u.provider == provider)
        .map(|u| (u.build_id.as_str(), u.id.as_str()))
        .collect();
    let unreadable: BTreeSet<&str> = state
        .unreadable_builds
        .iter()
        .map(|(_, b)| b.as_str())
        .collect();
    images
        .iter()
        .filter(|img| {
            let tag = |k: &str| img.properties.get(k).map(String::as_str);
            match (
                tag(IMAGE_PROVIDER),
                tag(IMAGE_BUILD_ID),
                tag(IMAGE_UPLOAD_ID),
            ) {
                (Some(p), Some(build), Some(upload)) if p == provider => {
                    !known.contains(&(build, upload)) && !unreadable.contains(build)
                }
                _ => false,
            }
        })
        .collect()
}

/// The floating IPs of a listing attached to nothing, in listing order
/// (openstacksdk's `delete_unattached_floating_ips`, which Python's
/// `clean-floating-ips` calls). Only for providers with
/// `clean-floating-ips`: every unattached floating IP of the project goes,
/// whoever allocated it.
pub fn unattached_floating_ips(fips: &[CloudResource]) -> Vec<&CloudResource> {
    fips.iter().filter(|f| !f.attached).collect()
}

/// Whether a port is one the DOWN-port cleanup may delete: status `DOWN`
/// and owned by a server (`compute:*`) or by nothing. Router, DHCP and
/// other service ports are never touched (Python's `_filterComputePorts`).
pub fn is_cleanable_port(port: &CloudResource) -> bool {
    port.status.eq_ignore_ascii_case("DOWN")
        && port
            .device_owner
            .as_deref()
            .is_none_or(|o| o.is_empty() || o.starts_with("compute:"))
}

/// The DOWN ports of one provider's last counted listing: the first of
/// the two sightings the port cleanup needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DownPorts {
    /// When that listing was asked for (epoch seconds).
    pub listed_at: f64,
    /// The ids of its cleanable ports ([`is_cleanable_port`]).
    pub ids: BTreeSet<String>,
}

impl DownPorts {
    /// The cleanable ports of a listing.
    pub fn of(ports: &[CloudResource], listed_at: f64) -> Self {
        DownPorts {
            listed_at,
            ids: ports
                .iter()
                .filter(|p| is_cleanable_port(p))
                .map(|p| p.id.clone())
                .collect(),
        }
    }
}

/// Python's DOWN-port rule: the ports of a listing (asked for at
/// `listed_at`) that were already DOWN in `previous`, a listing at least
/// `interval` seconds older; and the listing to compare the next one with.
///
/// The first listing only records what is DOWN. A listing less than
/// `interval` after the recorded one changes nothing (the recorded one
/// stays). Otherwise the ports DOWN in both are leaked and this listing is
/// recorded in its place, whole: a port whose deletion fails is DOWN again
/// next time and is retried then, as Python relists after deleting.
pub fn leaked_ports<'a>(
    ports: &'a [CloudResource],
    listed_at: f64,
    previous: Option<&DownPorts>,
    interval: f64,
) -> (Vec<&'a CloudResource>, DownPorts) {
    match previous {
        Some(prev) if listed_at - prev.listed_at < interval => (Vec::new(), prev.clone()),
        Some(prev) => (
            ports
                .iter()
                .filter(|p| is_cleanable_port(p) && prev.ids.contains(&p.id))
                .collect(),
            DownPorts::of(ports, listed_at),
        ),
        None => (Vec::new(), DownPorts::of(ports, listed_at)),
    }
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
    fn a_boot_test_server_is_a_leak_once_its_upload_is_not_uploading() {
        let upload = |id: &str, state: UploadState| {
            let mut u = ImageUpload::new(1.0, None);
            u.set_state(state, 1.0);
            UploadRecord {
                image: "deb".into(),
                build_id: "b1".into(),
                provider: "p1".into(),
                id: id.into(),
                upload: u,
                version: 0,
                locked: false,
                uploads_locked: false,
            }
        };
        let uploads = [
            upload("0000000001", UploadState::Uploading),
            upload("0000000002", UploadState::Failed),
        ];
        let test_server = |id: &str, upload: &str| {
            server(
                id,
                &[
                    ("nodepool_provider_name", "p1"),
                    (
                        META_VALIDATION,
                        validation_tag("deb", "b1", upload).as_str(),
                    ),
                ],
            )
        };
        let listing = [
            test_server("srv-testing", "0000000001"),
            test_server("srv-failed", "0000000002"),
            test_server("srv-gone", "0000000003"),
        ];
        let known = KnownNodes::new(&[]).with_uploads(&uploads);
        let got: Vec<(&str, String)> = leaked_servers("p1", &listing, &known)
            .into_iter()
            .map(|l| (l.instance.external_id.as_str(), l.reason.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (
                    "srv-failed",
                    "boot test of upload deb/b1/0000000002, which is no longer uploading".into()
                ),
                (
                    "srv-gone",
                    "boot test of upload deb/b1/0000000003, which is no longer uploading".into()
                ),
            ]
        );
        // Without the uploads (a listing alone), every one is a leak.
        assert_eq!(
            leaked_servers("p1", &listing, &KnownNodes::new(&[])).len(),
            3
        );
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

    #[test]
    fn leaked_images_are_tagged_for_the_provider_and_unknown_by_build_and_upload() {
        let image = |id: &str, props: &[(&str, &str)]| CloudImageInfo {
            id: id.into(),
            name: format!("name-{id}"),
            status: "active".into(),
            properties: props
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        };
        let upload = |build: &str, provider: &str, id: &str, state: UploadState| {
            let mut u = ImageUpload::new(1.0, None);
            u.set_state(state, 1.0);
            UploadRecord {
                image: "deb".into(),
                build_id: build.into(),
                provider: provider.into(),
                id: id.into(),
                upload: u,
                version: 0,
                locked: false,
                uploads_locked: false,
            }
        };
        let state = ImageState {
            uploads: vec![
                upload("b1", "p1", "0000000001", UploadState::Ready),
                // Any state vouches: a failed or deleting upload's image is
                // the builder's to delete through its record.
                upload("b1", "p1", "0000000002", UploadState::Uploading),
                upload("b2", "p2", "0000000001", UploadState::Ready),
            ],
            unreadable_builds: [("deb".into(), "b-unreadable".into())].into(),
            ..ImageState::default()
        };
        fn tags<'a>(b: &'a str, u: &'a str, p: &'a str) -> [(&'a str, &'a str); 3] {
            [
                (IMAGE_BUILD_ID, b),
                (IMAGE_UPLOAD_ID, u),
                (IMAGE_PROVIDER, p),
            ]
        }
        let listing = [
            image("known", &tags("b1", "0000000001", "p1")),
            image("uploading", &tags("b1", "0000000002", "p1")),
            // Upload ids repeat across builds: the key is both.
            image("other-build", &tags("b2", "0000000001", "p1")),
            image("no-record", &tags("b1", "0000000003", "p1")),
            image("p2s", &tags("b9", "0000000001", "p2")),
            image("unreadable", &tags("b-unreadable", "0000000001", "p1")),
            image(
                "no-provider",
                &[(IMAGE_BUILD_ID, "b9"), (IMAGE_UPLOAD_ID, "0000000001")],
            ),
            image(
                "no-upload",
                &[(IMAGE_BUILD_ID, "b9"), (IMAGE_PROVIDER, "p1")],
            ),
            image("plain", &[]),
        ];
        let got: Vec<&str> = leaked_images("p1", &listing, &state)
            .into_iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(got, ["other-build", "no-record"]);
        let got: Vec<&str> = leaked_images("p2", &listing, &state)
            .into_iter()
            .map(|i| i.id.as_str())
            .collect();
        assert_eq!(got, ["p2s"]);
    }

    #[test]
    fn floating_ips_and_ports_by_pythons_rules() {
        let r = |kind, id: &str, status: &str, attached, owner: Option<&str>| CloudResource {
            kind,
            id: id.into(),
            status: status.into(),
            attached,
            device_owner: owner.map(str::to_owned),
        };
        use crate::provider::ResourceKind::{FloatingIp, Port};
        let fips = [
            r(FloatingIp, "a", "ACTIVE", true, None),
            r(FloatingIp, "b", "DOWN", false, None),
        ];
        let got: Vec<&str> = unattached_floating_ips(&fips)
            .into_iter()
            .map(|f| f.id.as_str())
            .collect();
        assert_eq!(got, ["b"]);
        let ports = [
            r(Port, "nova", "DOWN", false, Some("compute:nova")),
            r(Port, "none", "DOWN", false, None),
            r(Port, "empty", "DOWN", false, Some("")),
            r(Port, "lower", "down", false, Some("compute:az1")),
            r(Port, "active", "ACTIVE", true, Some("compute:nova")),
            r(
                Port,
                "router",
                "DOWN",
                false,
                Some("network:router_interface"),
            ),
            r(Port, "dhcp", "DOWN", false, Some("network:dhcp")),
        ];
        let first = DownPorts::of(&ports, 100.0);
        assert_eq!(
            first.ids.iter().map(String::as_str).collect::<Vec<_>>(),
            ["empty", "lower", "none", "nova"]
        );
        let (leaked, next) = leaked_ports(&ports, 100.0, None, 60.0);
        assert!(leaked.is_empty());
        assert_eq!(next, first);
        let (leaked, next) = leaked_ports(&ports[..2], 159.9, Some(&first), 60.0);
        assert!(leaked.is_empty());
        assert_eq!(next, first, "too soon: the reference stays");
        let (leaked, next) = leaked_ports(&ports[..2], 160.0, Some(&first), 60.0);
        let got: Vec<&str> = leaked.into_iter().map(|p| p.id.as_str()).collect();
        assert_eq!(got, ["nova", "none"]);
        assert_eq!(next.listed_at, 160.0);
    }
}
