//! The OpenStack-format config drive: a small FAT image labelled
//! `config-2` holding `openstack/latest/meta_data.json` (name, hostname,
//! public key, the server's metadata), `network_data.json` (DHCP on the
//! one interface) and `user_data` when the label has some. glean (DIB's
//! `simple-init`) and cloud-init read it as they do in a real cloud.

use std::path::Path;

use serde_json::json;

/// What goes onto a drive.
pub(crate) struct DriveContents<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub mac: &'a str,
    pub metadata: &'a indexmap::IndexMap<String, String>,
    pub public_key: Option<&'a str>,
    pub userdata: Option<&'a str>,
}

/// The programs that make the drive.
#[derive(Debug)]
pub(crate) struct DriveTools {
    pub mkfs_vfat: std::path::PathBuf,
    pub mcopy: std::path::PathBuf,
}

/// Size of the FAT image in KiB: ample for metadata and user data.
const DRIVE_KIB: &str = "4096";

/// Writes `image` (staging the files in `staging`, removed after).
pub(crate) async fn write(
    tools: &DriveTools,
    contents: &DriveContents<'_>,
    staging: &Path,
    image: &Path,
) -> Result<(), String> {
    let latest = staging.join("openstack").join("latest");
    std::fs::create_dir_all(&latest).map_err(|e| format!("{}: {e}", latest.display()))?;
    let mut meta = json!({
        "uuid": contents.id,
        "name": contents.name,
        "hostname": contents.name,
        "launch_index": 0,
        "availability_zone": "qemu",
        "meta": contents.metadata,
    });
    if let Some(key) = contents.public_key {
        meta["public_keys"] = json!({ "nodepool": key });
        meta["keys"] = json!([{ "name": "nodepool", "type": "ssh", "data": key }]);
    }
    let network = json!({
        "links": [{
            "id": "eth0",
            "type": "phy",
            "ethernet_mac_address": contents.mac,
            "mtu": 1500,
        }],
        "networks": [{
            "id": "network0",
            "link": "eth0",
            "type": "ipv4_dhcp",
            "network_id": "qemu-user",
        }],
        "services": [],
    });
    let files = [
        ("meta_data.json", meta.to_string()),
        ("network_data.json", network.to_string()),
        ("vendor_data.json", "{}".to_owned()),
    ];
    for (file, text) in files {
        std::fs::write(latest.join(file), text).map_err(|e| format!("{file}: {e}"))?;
    }
    if let Some(u) = contents.userdata {
        std::fs::write(latest.join("user_data"), u).map_err(|e| format!("user_data: {e}"))?;
    }
    run(tokio::process::Command::new(&tools.mkfs_vfat)
        .args(["-n", "config-2", "-C"])
        .arg(image)
        .arg(DRIVE_KIB))
    .await?;
    run(tokio::process::Command::new(&tools.mcopy)
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-i"])
        .arg(image)
        .arg(staging.join("openstack"))
        .arg("::"))
    .await?;
    let _ = std::fs::remove_dir_all(staging);
    Ok(())
}

async fn run(cmd: &mut tokio::process::Command) -> Result<(), String> {
    let program = cmd.as_std().get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| format!("{program} cannot be run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
