//! Where things are (workspace, target folder, cargo home) and how xtask starts programs:
//! every child gets the same PATH, with `$CARGO_HOME/bin` first so that the bpf-linker
//! `setup` installs is the one the eBPF build finds.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

pub struct Workspace {
    pub root: PathBuf,
    pub target_dir: PathBuf,
    pub cargo_home: PathBuf,
    child_path: OsString,
}

impl Workspace {
    pub fn locate() -> Result<Self> {
        // xtask sits one level below the workspace root.
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let root = manifest_dir
            .parent()
            .with_context(|| format!("{} has no parent folder", manifest_dir.display()))?
            .to_path_buf();

        let target_dir = match env::var_os("CARGO_TARGET_DIR") {
            Some(dir) => root.join(dir),
            None => root.join("target"),
        };

        let cargo_home = match env::var_os("CARGO_HOME") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let home = env::var_os("HOME").context("neither CARGO_HOME nor HOME is set")?;
                PathBuf::from(home).join(".cargo")
            }
        };

        let cargo_bin = cargo_home.join("bin");
        let inherited = env::var_os("PATH").unwrap_or_default();
        let rest = env::split_paths(&inherited).filter(|dir| *dir != cargo_bin);
        let child_path = env::join_paths(std::iter::once(cargo_bin.clone()).chain(rest))
            .with_context(|| format!("cannot put {} on PATH", cargo_bin.display()))?;

        Ok(Self {
            root,
            target_dir,
            cargo_home,
            child_path,
        })
    }

    /// A command that sees xtask's PATH (used both by the child and to find `program`).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new(program);
        command.env("PATH", &self.child_path);
        command
    }

    /// `cargo ARGS`, run from the workspace root.
    pub fn cargo(&self, args: &[&str]) -> Command {
        let mut command = self.command("cargo");
        command.args(args).current_dir(&self.root);
        command
    }

    /// Where `cargo build` puts the binaries of a profile ("debug" or "release").
    pub fn bin_dir(&self, profile: &str) -> PathBuf {
        self.target_dir.join(profile)
    }
}

/// Runs a command with inherited stdio, printing it first; fails if it does not succeed.
pub fn run(command: &mut Command) -> Result<()> {
    let shown = describe(command);
    println!("==> {shown}");
    let status = command
        .status()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Test counts added up over every `test result:` line cargo printed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TestTotals {
    pub passed: u64,
    pub failed: u64,
    pub ignored: u64,
}

impl TestTotals {
    /// Adds one libtest summary line (`test result: ok. 3 passed; 0 failed; 1 ignored; ...`).
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next(), words.next())
                && let Ok(n) = n.parse::<u64>()
            {
                match what {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// Runs `cargo test ...`, passing its output through, and adds up the results, so the
/// run ends on one total rather than on the last (often empty) test binary's line.
pub fn run_tests(command: &mut Command) -> Result<(TestTotals, std::process::ExitStatus)> {
    use std::io::{BufRead, BufReader};
    let shown = describe(command);
    println!("==> {shown}");
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("could not start `{shown}`"))?;
    let mut totals = TestTotals::default();
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.with_context(|| format!("reading the output of `{shown}`"))?;
            println!("{line}");
            totals.add_line(&line);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    Ok((totals, status))
}

/// Replaces xtask with the command (so signals reach it directly); returns only on failure.
pub fn exec(command: &mut Command) -> Result<()> {
    let shown = describe(command);
    println!("==> {shown}");
    let error = command.exec();
    Err(error).with_context(|| format!("could not start `{shown}`"))
}

/// Runs a command quietly and returns its stdout; fails if it does not succeed.
pub fn capture_stdout(command: &mut Command) -> Result<String> {
    let shown = describe(command);
    let output = command
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !output.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{shown}` printed something that is not UTF-8"))
}

/// The command as a shell line, with the variables it sets (PATH left out: always the same).
fn describe(command: &Command) -> String {
    let vars = command
        .get_envs()
        .filter(|(key, _)| *key != "PATH")
        .filter_map(|(key, value)| {
            value.map(|value| format!("{}={}", key.to_string_lossy(), value.to_string_lossy()))
        });
    let words = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.to_string_lossy().into_owned());
    vars.chain(words).collect::<Vec<_>>().join(" ")
}

/// Whether xtask runs with effective uid 0, read from /proc so that no libc binding is needed.
pub fn is_root() -> Result<bool> {
    let status =
        fs::read_to_string("/proc/self/status").context("cannot read /proc/self/status")?;
    // "Uid:  real  effective  saved  filesystem"
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .context("no Uid line in /proc/self/status")?;
    Ok(effective == "0")
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root()? {
        bail!(
            "`cargo xtask {what}` builds network namespaces and loads XDP programs: run it as root"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::TestTotals;

    #[test]
    fn totals_add_up_libtest_summaries() {
        let mut t = TestTotals::default();
        t.add_line("test result: ok. 20 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.90s");
        t.add_line(
            "test result: FAILED. 3 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out",
        );
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            TestTotals {
                passed: 23,
                failed: 2,
                ignored: 1
            }
        );
    }
}
