//! A stand-in for diskimage-builder's `disk-image-create`, for fast tests.
//!
//! It accepts only the command line Nodepool gives DIB (reference §5.3) and
//! checks the environment, failing with exit code 2 and a message saying
//! what is wrong; then it behaves like DIB from the outside: prints
//! timestamped lines (one of them 25 kB long, some on stderr), writes the
//! `<base>.d/dib-manifests/` directory first, each format through a
//! `<base>.<format>-new` file renamed at the end, `.md5`/`.sha256` files
//! for every format but tar, and ends with `Build completed successfully`.
//!
//! Controlled by environment variables (run with `--help` for the list).

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use md5::{Digest, Md5};
use nix::sys::signal::{SigSet, Signal};
use sha2::Sha256;

const HELP: &str = "\
fake-disk-image-create: a test stand-in for diskimage-builder.

usage: fake-disk-image-create -x -t FMT[,FMT...] --checksum --no-tmpfs \\
         [--qemu-img-options compat=0.10  (exactly when qcow2 is built)] \\
         -o BASE ELEMENT...

Always checked: the argument grammar above; DIB_IMAGE_FILENAME == BASE;
DIB_IMAGE_NAME set; DIB_RELEASE set (may be empty); TMP_DIR == TMPDIR, an
existing absolute directory; vhd only when vhd-util is on PATH (as DIB).

Environment:
  FAKE_DIB_EXPECT_ARGS  newline-separated arguments that must match exactly
  FAKE_DIB_EXPECT_ENV   newline-separated NAME=VALUE (must equal) or !NAME (must be unset)
  FAKE_DIB_LINES        ordinary output lines (default 100)
  FAKE_DIB_LONG_LINE    length of the one long line (default 25600)
  FAKE_DIB_SIZE         bytes per image file (default 65536)
  FAKE_DIB_FAIL=N       exit with code N after the output (manifests are left)
  FAKE_DIB_HANG=1       hang while converting the first format, a `sleep` child
                        in the group; SIGTERM ends it like DIB's trap (exit 143)
  FAKE_DIB_HANG=ignore-term   the same with SIGTERM blocked in it and its child
  FAKE_DIB_CORRUPT=FMT  write a wrong sha256 for FMT
  FAKE_DIB_SKIP=FMT     do not write FMT
  FAKE_DIB_ORPHAN=1     succeed, leaving a `sleep` child running in the group
  FAKE_DIB_LEAK=1       (root) leave two nested tmpfs mounts and a loop device
                        (+ a /dev/mapper link) under TMP_DIR, as a killed DIB does
";

struct Args {
    formats: Vec<String>,
    base: PathBuf,
    elements: Vec<String>,
}

fn fail(msg: impl AsRef<str>) -> ExitCode {
    eprintln!("fake-disk-image-create: ERROR: {}", msg.as_ref());
    ExitCode::from(2)
}

fn parse(args: &[String]) -> Result<Args, String> {
    let mut it = args.iter().map(String::as_str).peekable();
    let mut expect = |want: &str| match it.next() {
        Some(a) if a == want => Ok(()),
        other => Err(format!("expected {want:?}, got {other:?} in {args:?}")),
    };
    expect("-x")?;
    expect("-t")?;
    let fmts = it
        .next()
        .ok_or_else(|| format!("-t needs formats in {args:?}"))?;
    let formats: Vec<String> = fmts.split(',').map(str::to_owned).collect();
    if formats.iter().any(|f| f.is_empty()) {
        return Err(format!("empty format in -t {fmts:?}"));
    }
    let mut expect = |want: &str| match it.next() {
        Some(a) if a == want => Ok(()),
        other => Err(format!("expected {want:?}, got {other:?} in {args:?}")),
    };
    expect("--checksum")?;
    expect("--no-tmpfs")?;
    let qcow2 = formats.iter().any(|f| f == "qcow2");
    if qcow2 {
        expect("--qemu-img-options")?;
        expect("compat=0.10")?;
    }
    expect("-o")?;
    let base = it
        .next()
        .ok_or_else(|| format!("-o needs a path in {args:?}"))?;
    let elements: Vec<String> = it.map(str::to_owned).collect();
    if elements.is_empty() {
        return Err("no elements given".into());
    }
    if let Some(e) = elements.iter().find(|e| e.starts_with('-')) {
        return Err(format!(
            "option {e:?} among the elements (wrong order, or --qemu-img-options without qcow2?)"
        ));
    }
    Ok(Args {
        formats,
        base: PathBuf::from(base),
        elements,
    })
}

fn check_env(a: &Args) -> Result<(), String> {
    let var = |k: &str| std::env::var_os(k);
    if var("DIB_IMAGE_FILENAME") != Some(a.base.clone().into_os_string()) {
        return Err(format!(
            "DIB_IMAGE_FILENAME is {:?}, not the -o path {:?}",
            var("DIB_IMAGE_FILENAME"),
            a.base
        ));
    }
    if var("DIB_IMAGE_NAME").is_none_or(|v| v.is_empty()) {
        return Err("DIB_IMAGE_NAME is not set".into());
    }
    if var("DIB_RELEASE").is_none() {
        return Err("DIB_RELEASE is not set".into());
    }
    let tmp = var("TMP_DIR").ok_or("TMP_DIR is not set")?;
    if var("TMPDIR").as_ref() != Some(&tmp) {
        return Err(format!(
            "TMPDIR {:?} differs from TMP_DIR {tmp:?}",
            var("TMPDIR")
        ));
    }
    let tmp = Path::new(&tmp);
    if !tmp.is_absolute() || !tmp.is_dir() {
        return Err(format!(
            "TMP_DIR {} is not an existing absolute directory",
            tmp.display()
        ));
    }
    if let Some(spec) = var("FAKE_DIB_EXPECT_ENV") {
        for line in spec.to_string_lossy().lines().filter(|l| !l.is_empty()) {
            if let Some(name) = line.strip_prefix('!') {
                if let Some(v) = var(name) {
                    return Err(format!("{name} should be unset but is {v:?}"));
                }
            } else {
                let (k, v) = line
                    .split_once('=')
                    .ok_or(format!("bad FAKE_DIB_EXPECT_ENV line {line:?}"))?;
                let got = var(k);
                if got.as_deref() != Some(std::ffi::OsStr::new(v)) {
                    return Err(format!("{k} is {got:?}, expected {v:?}"));
                }
            }
        }
    }
    Ok(())
}

/// `YYYY-MM-DD HH:MM:SS.mmm | `, as DIB prefixes its lines (UTC here).
fn stamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03} | ",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_millis()
    )
}

fn out(line: &str) {
    let mut o = std::io::stdout().lock();
    let _ = writeln!(o, "{}{line}", stamp());
    let _ = o.flush();
}

fn err(line: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{}{line}", stamp());
    let _ = e.flush();
}

fn env_num(k: &str, default: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn suffixed(base: &Path, s: &str) -> PathBuf {
    let mut o: OsString = base.as_os_str().to_owned();
    o.push(s);
    PathBuf::from(o)
}

fn image_bytes(format: &str, size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    let mut i = 0u64;
    while v.len() < size {
        v.extend_from_slice(format!("{format} block {i}\n").as_bytes());
        i += 1;
    }
    v.truncate(size);
    v
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn sh(program: &str, args: &[&str]) -> Result<String, String> {
    let o = std::process::Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{program} {args:?}: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// Leaves what a SIGKILLed DIB leaves: nested mounts and a loop device.
fn leak(tmp: &Path) -> Result<(), String> {
    let build = tmp.join("dib_build.fake0001");
    let mnt = build.join("mnt");
    let proc_ = mnt.join("proc");
    let image_dir = tmp.join("dib_image.fake0001");
    std::fs::create_dir_all(&mnt).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&image_dir).map_err(|e| e.to_string())?;
    let p = |p: &Path| p.to_string_lossy().into_owned();
    sh("mount", &["-t", "tmpfs", "fake-dib-root", &p(&mnt)])?;
    std::fs::create_dir_all(&proc_).map_err(|e| e.to_string())?;
    sh("mount", &["-t", "tmpfs", "fake-dib-proc", &p(&proc_)])?;
    let img = image_dir.join("image0.raw");
    let f = std::fs::File::create(&img).map_err(|e| e.to_string())?;
    f.set_len(8 << 20).map_err(|e| e.to_string())?;
    drop(f);
    let dev = sh("losetup", &["-f", "--show", &p(&img)])?;
    let name = dev.trim_start_matches("/dev/");
    std::fs::create_dir_all("/dev/mapper").map_err(|e| e.to_string())?;
    let link = format!("/dev/mapper/{name}p1");
    std::os::unix::fs::symlink(format!("../{name}p1"), &link)
        .map_err(|e| format!("{link}: {e}"))?;
    out(&format!(
        "fake-dib: leaked mounts {} {} loop {dev} link {link}",
        mnt.display(),
        proc_.display()
    ));
    Ok(())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--help") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    let hang = std::env::var("FAKE_DIB_HANG").unwrap_or_default();
    if hang == "ignore-term" {
        // Before any thread exists, so it holds for the whole process, and
        // is inherited by the child: both survive SIGTERM.
        let mut set = SigSet::empty();
        set.add(Signal::SIGTERM);
        if let Err(e) = set.thread_block() {
            return fail(format!("cannot block SIGTERM: {e}"));
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start a runtime: {e}")),
    };
    rt.block_on(fake(argv, hang))
}

async fn fake(argv: Vec<String>, hang: String) -> ExitCode {
    let pid = std::process::id();
    let pgid = nix::unistd::getpgrp();
    out(&format!("fake-dib: pid {pid} pgid {pgid}"));
    if let Ok(expected) = std::env::var("FAKE_DIB_EXPECT_ARGS") {
        let expected: Vec<&str> = expected.lines().collect();
        if argv != expected {
            return fail(format!(
                "arguments differ:\n  got      {argv:?}\n  expected {expected:?}"
            ));
        }
    }
    let args = match parse(&argv) {
        Ok(a) => a,
        Err(e) => return fail(format!("bad command line: {e}")),
    };
    if let Err(e) = check_env(&args) {
        return fail(format!("bad environment: {e}"));
    }
    if args.formats.iter().any(|f| f == "vhd") && !in_path("vhd-util") {
        out("vhd output format specified but no vhd-util executable found.");
        return ExitCode::from(1);
    }
    let tmp = PathBuf::from(std::env::var_os("TMP_DIR").unwrap_or_default());

    // Manifests come first and stay after a failure, as with DIB.
    let manifests = suffixed(&args.base, ".d").join("dib-manifests");
    if let Err(e) = std::fs::create_dir_all(&manifests) {
        return fail(format!("cannot create {}: {e}", manifests.display()));
    }
    let mut env: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("DIB_"))
        .map(|(k, v)| format!("export {k}={v:?}"))
        .collect();
    env.sort();
    let _ = std::fs::write(manifests.join("dib_arguments"), argv.join(" ") + "\n");
    let _ = std::fs::write(manifests.join("dib_environment"), env.join("\n") + "\n");

    out(&format!("fake-dib: elements {}", args.elements.join(" ")));
    let lines = env_num("FAKE_DIB_LINES", 100);
    for i in 0..lines {
        out(&format!("fake-dib: line {i} of {lines}"));
        if i % 25 == 0 {
            err(&format!("fake-dib: warning {i} on stderr"));
        }
        if i == lines / 2 {
            let long = env_num("FAKE_DIB_LONG_LINE", 25_600);
            out(&format!("fake-dib: long line {}", "x".repeat(long)));
        }
    }
    if std::env::var("FAKE_DIB_LEAK").as_deref() == Ok("1")
        && let Err(e) = leak(&tmp)
    {
        return fail(format!("cannot leak: {e}"));
    }
    if let Some(code) = std::env::var("FAKE_DIB_FAIL")
        .ok()
        .and_then(|v| v.parse::<u8>().ok())
    {
        out("fake-dib: failing on request");
        out("ERROR: something inside the image failed");
        return ExitCode::from(code);
    }

    let size = env_num("FAKE_DIB_SIZE", 65_536);
    let skip = std::env::var("FAKE_DIB_SKIP").unwrap_or_default();
    let corrupt = std::env::var("FAKE_DIB_CORRUPT").unwrap_or_default();
    for (n, fmt) in args.formats.iter().enumerate() {
        if *fmt == skip {
            out(&format!("fake-dib: not writing {fmt} on request"));
            continue;
        }
        let file = suffixed(&args.base, &format!(".{fmt}"));
        let new = suffixed(&file, "-new");
        out("Converting image using qemu-img convert");
        let data = image_bytes(fmt, size);
        if let Err(e) = std::fs::write(&new, &data) {
            return fail(format!("cannot write {}: {e}", new.display()));
        }
        if n == 0 && !hang.is_empty() {
            return hang_here(&hang).await;
        }
        if let Err(e) = std::fs::rename(&new, &file) {
            return fail(format!("cannot rename {}: {e}", new.display()));
        }
        if fmt != "tar" {
            let md5 = hex::encode(Md5::digest(&data));
            let mut sha = hex::encode(Sha256::digest(&data));
            if *fmt == corrupt {
                sha = "0".repeat(64);
            }
            let _ = std::fs::write(
                suffixed(&file, ".md5"),
                format!("{md5}  {}\n", file.display()),
            );
            let _ = std::fs::write(
                suffixed(&file, ".sha256"),
                format!("{sha}  {}\n", file.display()),
            );
        }
        out(&format!("Image file {} created...", file.display()));
    }
    if std::env::var("FAKE_DIB_ORPHAN").as_deref() == Ok("1") {
        match std::process::Command::new("sleep").arg("3600").spawn() {
            Ok(c) => out(&format!("fake-dib: leaving child {}", c.id())),
            Err(e) => return fail(format!("cannot start the child: {e}")),
        }
    }
    out("Build completed successfully");
    ExitCode::SUCCESS
}

async fn hang_here(mode: &str) -> ExitCode {
    let child = std::process::Command::new("sleep").arg("3600").spawn();
    match &child {
        Ok(c) => out(&format!("fake-dib: hanging ({mode}), child {}", c.id())),
        Err(e) => return fail(format!("cannot start the child: {e}")),
    }
    if mode == "ignore-term" {
        loop {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => return fail(format!("cannot handle SIGTERM: {e}")),
    };
    term.recv().await;
    // DIB's EXIT trap: it cleans its temp dirs, not the child it started.
    out("fake-dib: SIGTERM, running the cleanup trap");
    ExitCode::from(143)
}
