//! Builds the XDP program (lb-ebpf) with the nightly toolchain and bpf-linker, so the
//! object lands in OUT_DIR and gets embedded in the agent. `cargo xtask setup` installs
//! what this needs.
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = Path::new(&manifest_dir).join("..").join("lb-ebpf");
    let ebpf_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow::anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )?;
    // The same program without the trace code, for the benchmark's "tracing off costs
    // nothing" figure: into OUT_DIR/untraced/. aya-build builds in OUT_DIR/aya-build;
    // sharing that folder lets cargo keep both builds (and `core`) cached side by side.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let untraced = out_dir.join("untraced");
    std::fs::create_dir_all(&untraced)?;
    // Relative, so a copy of the target directory keeps its own cache.
    let shared = untraced.join("aya-build");
    if std::fs::symlink_metadata(&shared).is_err() {
        std::fs::create_dir_all(out_dir.join("aya-build"))?;
        std::os::unix::fs::symlink("../aya-build", &shared)?;
    }
    // SAFETY: a build script is single-threaded; aya-build reads OUT_DIR from the env.
    unsafe { std::env::set_var("OUT_DIR", &untraced) };
    let result = aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir,
            no_default_features: true,
            features: &[],
        }],
        aya_build::Toolchain::Nightly,
    );
    unsafe { std::env::set_var("OUT_DIR", &out_dir) };
    result
}
