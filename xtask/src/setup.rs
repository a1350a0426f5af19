//! `cargo xtask setup`: installs what the build and the lab need, skipping what is there.
//! Each step prints one line.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::workspace::{Workspace, capture_stdout, is_root, run};

/// The bpf-linker release the eBPF build is known to work with.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the namespace lab calls.
const DEBIAN_PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "iputils-ping",
    "tcpdump",
    "iptables",
    "keepalived",
    // Bounded SYN floods in the flood lab test; IP fragments in the trace lab test.
    "hping3",
    // `promtool check metrics` / `check rules` in the metrics lab test.
    "prometheus",
    // `systemd-analyze verify` of config/lb-agent.service.
    "systemd",
    // The routing daemon of the active-active lab: BGP from the LB hosts to a router.
    "bird2",
    // A pseudo-terminal for `lbctl top` in the observe lab test.
    "tmux",
    // The comparative lab bench: HAProxy (`mode tcp`) and nginx `stream` as the proxies
    // to beat, nginx also as the backends' HTTP server, wrk for the connection rate and
    // iperf3 for one bulk stream. Each runs in a lab namespace, never as a service.
    "haproxy",
    "nginx-light",
    "libnginx-mod-stream",
    "wrk",
    "iperf3",
    // The font the bench's PNG charts are labelled with.
    "fonts-dejavu-core",
];

/// Debian's `invoke-rc.d` asks this script whether a package's postinst may start its
/// daemon; exit 101 says no. Setup installs tools, never services.
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

pub fn setup(ws: &Workspace) -> Result<()> {
    rust_src(ws).context("setup: rust-src for the nightly toolchain")?;
    bpf_linker(ws).context("setup: bpf-linker")?;
    debian_packages(ws).context("setup: Debian packages")?;
    no_bird_service(ws).context("setup: the bird service")?;
    Ok(())
}

/// The lab runs BIRD only inside its namespaces; the bird2 package enables a daemon for
/// the host (where an init system starts services): stop and disable it, so nothing
/// routes or peers from the root namespace.
fn no_bird_service(ws: &Workspace) -> Result<()> {
    if Path::new("/run/systemd/system").exists() {
        let enabled = ws
            .command("systemctl")
            .args(["is-enabled", "--quiet", "bird.service"])
            .status()
            .is_ok_and(|s| s.success());
        let active = ws
            .command("systemctl")
            .args(["is-active", "--quiet", "bird.service"])
            .status()
            .is_ok_and(|s| s.success());
        if enabled || active {
            run(ws
                .command("systemctl")
                .args(["disable", "--now", "bird.service"]))?;
            println!("bird service: stopped and disabled (the lab starts its own)");
            return Ok(());
        }
    } else if Path::new("/etc/init.d/bird").exists() && bird_in_root_namespace()? {
        run(ws.command("invoke-rc.d").args(["bird", "stop"]))?;
        run(ws.command("update-rc.d").args(["bird", "disable"]))?;
        println!("bird service: stopped and disabled (the lab starts its own)");
    }
    if bird_in_root_namespace()? {
        bail!(
            "a bird daemon runs in the root network namespace; stop it (the lab runs BIRD only in its namespaces)"
        );
    }
    println!("bird service: not running");
    Ok(())
}

/// Whether a process named `bird` runs in this process's network namespace.
fn bird_in_root_namespace() -> Result<bool> {
    let ours = fs::read_link("/proc/self/ns/net").context("reading /proc/self/ns/net")?;
    for entry in fs::read_dir("/proc").context("reading /proc")? {
        let dir = entry?.path();
        let is_bird = fs::read_to_string(dir.join("comm")).is_ok_and(|c| c.trim() == "bird");
        if is_bird && fs::read_link(dir.join("ns/net")).is_ok_and(|ns| ns == ours) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The eBPF crate builds `core` itself (`-Z build-std`), which needs the nightly's sources.
fn rust_src(ws: &Workspace) -> Result<()> {
    let installed = capture_stdout(ws.command("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src"))
    {
        println!("rust-src: present");
        return Ok(());
    }
    run(ws
        .command("rustup")
        .args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    println!("rust-src: installed");
    Ok(())
}

fn bpf_linker(ws: &Workspace) -> Result<()> {
    // PATH starts with $CARGO_HOME/bin, so this finds the one cargo install would replace.
    let found = bpf_linker_version(ws);
    if found.as_deref() == Some(BPF_LINKER_VERSION) {
        println!("bpf-linker {BPF_LINKER_VERSION}: present");
        return Ok(());
    }
    match &found {
        Some(version) => println!("bpf-linker: found {version}, building {BPF_LINKER_VERSION}"),
        None => println!("bpf-linker: not found, building {BPF_LINKER_VERSION}"),
    }

    let started = Instant::now();
    let llvm = NightlyLlvm::find(ws)?;
    let prefix = llvm.prefix(ws)?;
    let crate_spec = format!("bpf-linker@{BPF_LINKER_VERSION}");
    let feature = format!("llvm-{}", llvm.major);
    let mut install = ws.cargo(&[
        "install",
        &crate_spec,
        "--locked",
        "--no-default-features",
        "--features",
        &feature,
        // Replaces a bpf-linker of another version, or one whose LLVM library has gone.
        "--force",
    ]);
    install
        .arg("--root")
        .arg(&ws.cargo_home)
        .env("LLVM_PREFIX", &prefix);
    run(&mut install)?;

    match bpf_linker_version(ws) {
        Some(version) if version == BPF_LINKER_VERSION => {}
        Some(version) => {
            bail!("installed bpf-linker {BPF_LINKER_VERSION} but PATH finds {version}")
        }
        None => bail!("installed bpf-linker {BPF_LINKER_VERSION} but it does not run"),
    }
    println!(
        "bpf-linker {BPF_LINKER_VERSION}: built in {} s",
        started.elapsed().as_secs()
    );
    Ok(())
}

/// The version `bpf-linker --version` reports ("bpf-linker 0.13.0"), if it runs at all.
fn bpf_linker_version(ws: &Workspace) -> Option<String> {
    let output = ws.command("bpf-linker").arg("--version").output().ok()?;
    if !output.status.success() {
        return None;
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout.split_whitespace().nth(1).map(str::to_owned)
}

/// The LLVM shared library the nightly toolchain ships; bpf-linker must use the same major.
struct NightlyLlvm {
    major: u32,
    library: PathBuf,
}

impl NightlyLlvm {
    fn find(ws: &Workspace) -> Result<Self> {
        let version_info = capture_stdout(
            ws.command("rustup")
                .args(["run", "nightly", "rustc", "-vV"]),
        )?;
        let llvm_version = version_info
            .lines()
            .find_map(|line| line.strip_prefix("LLVM version:"))
            .map(str::trim)
            .context("`rustc -vV` of the nightly toolchain names no LLVM version")?;
        let major = llvm_version
            .split('.')
            .next()
            .and_then(|major| major.parse::<u32>().ok())
            .with_context(|| format!("cannot read the LLVM major version in {llvm_version:?}"))?;

        let sysroot = capture_stdout(
            ws.command("rustup")
                .args(["run", "nightly", "rustc", "--print", "sysroot"]),
        )?;
        let lib_dir = Path::new(sysroot.trim()).join("lib");
        let library = find_llvm_library(&lib_dir, major)?;
        Ok(Self { major, library })
    }

    /// `$CARGO_HOME/lb-llvm/<major>`, a prefix whose `lib/` holds the library under the
    /// name the linker looks for (`libLLVM.so`) and under its soname, which bpf-linker
    /// finds at run time through the rpath its build sets to that folder.
    fn prefix(&self, ws: &Workspace) -> Result<PathBuf> {
        let prefix = ws.cargo_home.join("lb-llvm").join(self.major.to_string());
        let lib = prefix.join("lib");
        // The folder holds only our links; start afresh so no link to an old nightly stays.
        if lib.exists() {
            fs::remove_dir_all(&lib).with_context(|| format!("cannot remove {}", lib.display()))?;
        }
        fs::create_dir_all(&lib).with_context(|| format!("cannot create {}", lib.display()))?;

        let own_name = self
            .library
            .file_name()
            .with_context(|| format!("{} has no file name", self.library.display()))?;
        for name in [Path::new("libLLVM.so"), Path::new(own_name)] {
            let link = lib.join(name);
            symlink(&self.library, &link).with_context(|| {
                format!(
                    "cannot link {} to {}",
                    link.display(),
                    self.library.display()
                )
            })?;
        }
        Ok(prefix)
    }
}

/// The one `libLLVM.so.*` in the sysroot's lib folder (if several, the one of `major`).
fn find_llvm_library(lib_dir: &Path, major: u32) -> Result<PathBuf> {
    let entries =
        fs::read_dir(lib_dir).with_context(|| format!("cannot read {}", lib_dir.display()))?;
    let mut candidates = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot read {}", lib_dir.display()))?;
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("libLLVM.so.") {
            candidates.push(entry.path());
        }
    }
    if candidates.len() > 1 {
        let of_major = format!("libLLVM.so.{major}.");
        candidates.retain(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&of_major))
        });
    }
    match candidates.as_slice() {
        [library] => Ok(library.clone()),
        [] => bail!(
            "no libLLVM.so.{major}.* in {}: is the nightly toolchain complete?",
            lib_dir.display()
        ),
        _ => bail!(
            "several LLVM {major} libraries in {}: {candidates:?}",
            lib_dir.display()
        ),
    }
}

fn debian_packages(ws: &Workspace) -> Result<()> {
    let mut missing = Vec::new();
    for &package in DEBIAN_PACKAGES {
        if !debian_package_installed(ws, package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        println!("debian packages: present");
        return Ok(());
    }
    let list = missing.join(" ");
    if !is_root()? {
        bail!("missing Debian packages: {list}; install them as root: apt-get install {list}");
    }
    run(ws.command("apt-get").arg("update"))?;
    // `prometheus` would start a Prometheus server (and, recommended, a node exporter)
    // in the root namespace: no daemon is started, and no recommended package added.
    let policy = NoDaemons::install()?;
    let installed = run(ws
        .command("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing));
    drop(policy);
    installed?;
    println!("debian packages: installed {list}");
    Ok(())
}

/// A `policy-rc.d` that forbids starting daemons, for as long as it lives; a policy the
/// system already has is left as it is.
struct NoDaemons(Option<&'static Path>);

impl NoDaemons {
    fn install() -> Result<Self> {
        let path = Path::new(POLICY_RC_D);
        if path.exists() {
            return Ok(Self(None));
        }
        fs::write(
            path,
            "#!/bin/sh\n# cargo xtask setup: no daemon starts during its install\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for NoDaemons {
    fn drop(&mut self) {
        if let Some(path) = self.0
            && let Err(e) = fs::remove_file(path)
        {
            eprintln!("setup: could not remove {}: {e}", path.display());
        }
    }
}

fn debian_package_installed(ws: &Workspace, package: &str) -> Result<bool> {
    // dpkg-query fails for a package it has never heard of: that is "not installed" too.
    let output = ws
        .command("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("could not start dpkg-query (is this a Debian system?)")?;
    Ok(
        output.status.success()
            && String::from_utf8_lossy(&output.stdout) == "install ok installed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_library_of_the_major() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("xtask-llvm-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        for name in [
            "libLLVM.so.21.1-rust",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc.so",
        ] {
            fs::write(dir.join(name), b"")?;
        }
        let found = find_llvm_library(&dir, 22);
        let missing = find_llvm_library(&dir, 23);
        fs::remove_dir_all(&dir)?;
        assert_eq!(found?, dir.join("libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert!(missing.is_err());
        Ok(())
    }
}
