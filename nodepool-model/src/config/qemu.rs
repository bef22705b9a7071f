//! `driver: qemu`: servers that are QEMU virtual machines on the
//! launcher's host (see `docs/local-vms.md`).

use std::path::PathBuf;

use super::ConfigErrorKind as Kind;
use super::SimulatedFlavor;
use super::yaml::{At, Errors, Fields};
use crate::model::{CORES, INSTANCES, Limits, RAM};

/// The QEMU program used when `qemu-binary` is absent.
pub const DEFAULT_QEMU_BINARY: &str = "qemu-system-x86_64";

/// Which hardware acceleration the VMs use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Accelerator {
    /// KVM when `/dev/kvm` works, else TCG (detected at provider start).
    #[default]
    Auto,
    /// KVM only: starting a VM fails when it does not work.
    Kvm,
    /// Software emulation (TCG), slow but works everywhere.
    Tcg,
}

impl Accelerator {
    /// The configuration spelling.
    pub fn name(self) -> &'static str {
        match self {
            Accelerator::Auto => "auto",
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        }
    }
}

/// The host behind a `driver: qemu` provider.
#[derive(Clone, Debug, PartialEq)]
pub struct QemuHost {
    /// `image-dir`: where uploaded images and the servers' files (overlay,
    /// serial log, config drive, pid file, metadata) live. Relative paths
    /// are resolved against the configuration file's directory.
    pub image_dir: PathBuf,
    /// `qemu-binary`: the `qemu-system-x86_64` program (a bare name is
    /// looked up on `PATH`).
    pub qemu_binary: String,
    /// `accelerator`: `auto`, `kvm` or `tcg`.
    pub accelerator: Accelerator,
    /// `quota`: instances, cores and RAM (MiB) the VMs may use together;
    /// missing names are unlimited (RAM is also bounded by the host's
    /// available memory at each launch).
    pub quota: Limits,
    /// `flavors`: the sizes labels pick with `flavor-name` / `min-ram`;
    /// a label naming neither gets the first.
    pub flavors: Vec<SimulatedFlavor>,
    /// `public-key`: an SSH public key file put into each VM's config drive
    /// (`public_keys`), so images using glean or cloud-init accept the
    /// launcher's key. Relative paths are resolved against the
    /// configuration file's directory.
    pub public_key: Option<PathBuf>,
}

/// The flavor a `driver: qemu` provider offers when it lists none.
pub fn default_qemu_flavors() -> Vec<SimulatedFlavor> {
    vec![SimulatedFlavor {
        name: "default".into(),
        vcpus: 1,
        ram: 1024,
    }]
}

/// Reads the qemu keys of a provider mapping (only called for
/// `driver: qemu`).
pub(crate) fn qemu(m: &mut Fields<'_>, errs: &mut Errors) -> Option<QemuHost> {
    let image_dir = m.required_string("image-dir", errs).map(PathBuf::from);
    let qemu_binary = m
        .string("qemu-binary", errs)
        .unwrap_or_else(|| DEFAULT_QEMU_BINARY.into());
    let accelerator = match m.string("accelerator", errs).as_deref() {
        None | Some("auto") => Accelerator::Auto,
        Some("kvm") => Accelerator::Kvm,
        Some("tcg") => Accelerator::Tcg,
        Some(other) => {
            errs.push(
                &m.path_of("accelerator"),
                Kind::InvalidValue,
                format!("unknown accelerator `{other}` (one of: auto, kvm, tcg)"),
            );
            Accelerator::Auto
        }
    };
    let mut quota = Limits::unlimited();
    if let Some(f) = m.get("quota")
        && let Some(mut q) = f.at().fields(errs)
    {
        for (key, name) in [("instances", INSTANCES), ("cores", CORES), ("ram", RAM)] {
            match q.int(key, errs) {
                Some(n) if n >= 0 => quota.set(name, n),
                Some(n) => errs.push(
                    &q.path_of(key),
                    Kind::InvalidValue,
                    format!("must not be negative, found {n}"),
                ),
                None => {}
            }
        }
        q.finish(errs);
    }
    let flavors = match m.get("flavors") {
        Some(f) => flavors(f.at(), errs),
        None => default_qemu_flavors(),
    };
    let public_key = m.string("public-key", errs).map(PathBuf::from);
    Some(QemuHost {
        image_dir: image_dir?,
        qemu_binary,
        accelerator,
        quota,
        flavors,
        public_key,
    })
}

fn flavors(at: At<'_>, errs: &mut Errors) -> Vec<SimulatedFlavor> {
    let mut out = Vec::new();
    for (path, v) in at.list(errs).unwrap_or_default() {
        let Some(mut fl) = (At {
            value: v,
            path: &path,
        })
        .fields(errs) else {
            continue;
        };
        let name = fl.required_string("name", errs);
        let mut positive = |key: &'static str, fl: &mut Fields<'_>| {
            let n = fl.required(key, errs).and_then(|f| f.at().int(errs))?;
            if n < 1 {
                errs.push(
                    &fl.path_of(key),
                    Kind::InvalidValue,
                    format!("must be at least 1, found {n}"),
                );
                return None;
            }
            Some(n)
        };
        let vcpus = positive("vcpus", &mut fl);
        let ram = positive("ram", &mut fl);
        fl.finish(errs);
        if let (Some(name), Some(vcpus), Some(ram)) = (name, vcpus, ram) {
            out.push(SimulatedFlavor { name, vcpus, ram });
        }
    }
    out
}
