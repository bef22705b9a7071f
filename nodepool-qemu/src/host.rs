//! What the host offers: the programs a VM needs, whether KVM works, and
//! how much memory is available.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nodepool_model::config::Accelerator;

/// Where system programs live when `PATH` (of a non-root user) lacks them:
/// `mkfs.vfat` is in `/usr/sbin`.
const SYSTEM_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// Finds a program: a path with a `/` as is, a bare name on `PATH` or in
/// the system directories.
pub(crate) fn find_program(name: &str) -> Result<PathBuf, String> {
    if name.contains('/') {
        return runnable(Path::new(name))
            .map(|()| PathBuf::from(name))
            .map_err(|why| format!("program {name:?} {why}"));
    }
    let path_dirs = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    path_dirs
        .into_iter()
        .chain(SYSTEM_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| runnable(p).is_ok())
        .ok_or_else(|| format!("program {name:?} is not found on PATH"))
}

fn runnable(p: &Path) -> Result<(), &'static str> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::metadata(p) {
        Err(_) => Err("does not exist"),
        Ok(m) if !m.is_file() => Err("is not a file"),
        Ok(m) if m.permissions().mode() & 0o111 == 0 => Err("is not executable"),
        Ok(_) => Ok(()),
    }
}

/// The first line of `program --version`, proving it runs.
pub(crate) fn version_of(program: &Path) -> Result<String, String> {
    let out = std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{} cannot be run: {e}", program.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} --version failed ({}): {}",
            program.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

/// What the serial console of the boot-sector stub prints.
pub const STUB_BANNER: &str = "nodepool qemu stub booted";

/// A tiny bootable disk (1 MiB, raw): a boot sector that prints
/// [`STUB_BANNER`] on the first serial port and halts. It proves that a
/// guest really runs (the KVM probe) and is the tests' image.
pub fn stub_disk() -> Vec<u8> {
    // 16-bit real mode at 0x7c00: ds = 0; si = message; out each byte to
    // 0x3f8 until NUL; then hlt forever.
    let mut code: Vec<u8> = vec![
        0x31, 0xC0, // xor ax, ax
        0x8E, 0xD8, // mov ds, ax
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xBE, 0x15, 0x7C, // mov si, 0x7c15 (the message)
        0xAC, // lodsb
        0x84, 0xC0, // test al, al
        0x74, 0x03, // jz +3 (halt)
        0xEE, // out dx, al
        0xEB, 0xF8, // jmp lodsb
        0xF4, // hlt
        0xEB, 0xFD, // jmp hlt
    ];
    code.extend_from_slice(STUB_BANNER.as_bytes());
    code.extend_from_slice(b"\r\n\0");
    code.resize(510, 0);
    code.extend_from_slice(&[0x55, 0xAA]);
    // SeaBIOS does not boot a one-sector virtio disk.
    code.resize(1 << 20, 0);
    code
}

/// How long a probe guest may take to print its banner.
const PROBE_LIMIT: Duration = Duration::from_secs(20);

/// How much slower than TCG the KVM probe may be and still be chosen.
/// Healthy KVM reaches the boot sector faster than emulation; nested KVM
/// (a VM inside a microVM, as on this project's CI host) runs it ten times
/// slower (measured: ~10 s against TCG's ~1 s), and a Debian guest under it
/// does not reach SSH in minutes, while under TCG it does in about two.
const KVM_SLOWDOWN_ALLOWED: f64 = 1.5;

/// The accelerator VMs use: `auto` is KVM when a probe guest really runs
/// under it, and not slower than under TCG (a `/dev/kvm` that opens is not
/// enough: nested setups accept the device and run guests slower than
/// emulation, or never), else TCG.
pub(crate) async fn choose_accelerator(
    wanted: Accelerator,
    qemu: &Path,
    scratch: &Path,
) -> (&'static str, String) {
    match wanted {
        Accelerator::Kvm => ("kvm", "configured".into()),
        Accelerator::Tcg => ("tcg", "configured".into()),
        Accelerator::Auto => match probe_kvm(qemu, scratch).await {
            Ok(why) => ("kvm", format!("auto: {why}")),
            Err(why) => ("tcg", format!("auto: {why}")),
        },
    }
}

/// Boots the stub under KVM and under TCG; `Ok` (saying why) when KVM is
/// worth using.
async fn probe_kvm(qemu: &Path, scratch: &Path) -> Result<String, String> {
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        return Err(format!("/dev/kvm cannot be opened: {e}"));
    }
    let dir = scratch.join(format!(".kvm-probe-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    // The CPU model VMs get under KVM (`QemuProvider::start`).
    let kvm = run_probe(qemu, &dir, &["-accel", "kvm", "-cpu", "host"]).await;
    let tcg = match &kvm {
        Ok(_) => run_probe(qemu, &dir, &["-accel", "tcg"]).await,
        Err(_) => Err(String::new()),
    };
    let _ = std::fs::remove_dir_all(&dir);
    let kvm = kvm.map_err(|why| format!("under KVM {why}"))?;
    match tcg {
        Ok(tcg) if kvm.as_secs_f64() > tcg.as_secs_f64() * KVM_SLOWDOWN_ALLOWED => Err(format!(
            "a probe guest booted in {:.1} s under KVM and {:.1} s under TCG: KVM here is nested or starved, slower than emulation",
            kvm.as_secs_f64(),
            tcg.as_secs_f64()
        )),
        Ok(tcg) => Ok(format!(
            "a probe guest booted in {:.1} s under KVM ({:.1} s under TCG)",
            kvm.as_secs_f64(),
            tcg.as_secs_f64()
        )),
        // TCG failing says nothing against KVM, which did run the guest.
        Err(_) => Ok(format!(
            "a probe guest booted in {:.1} s under KVM",
            kvm.as_secs_f64()
        )),
    }
}

/// Boots the stub with `accel` and returns how long it took to print its
/// banner.
async fn run_probe(qemu: &Path, dir: &Path, accel: &[&str]) -> Result<Duration, String> {
    let disk = dir.join("stub.raw");
    let serial = dir.join(format!("serial-{}.log", accel[1]));
    std::fs::write(&disk, stub_disk()).map_err(|e| format!("{}: {e}", disk.display()))?;
    let started = tokio::time::Instant::now();
    let mut child = tokio::process::Command::new(qemu)
        .args(accel)
        .args(["-m", "16", "-display", "none"])
        .args(["-monitor", "none", "-nodefaults", "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-drive")
        .arg(format!(
            "file={},if=ide,format=raw,snapshot=on",
            disk.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{} cannot be run: {e}", qemu.display()))?;
    let outcome = loop {
        let printed = std::fs::read_to_string(&serial).unwrap_or_default();
        if printed.contains(STUB_BANNER) {
            break Ok(started.elapsed());
        }
        if let Ok(Some(status)) = child.try_wait() {
            break Err(format!("the probe guest exited ({status})"));
        }
        if started.elapsed() >= PROBE_LIMIT {
            break Err(format!(
                "a probe guest printed nothing within {} s",
                PROBE_LIMIT.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let _ = child.kill().await;
    outcome
}

/// The host's available memory in MiB (`MemAvailable`), if readable.
pub(crate) fn available_ram_mib() -> Option<i64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: i64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}
