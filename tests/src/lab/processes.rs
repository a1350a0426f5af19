//! Processes: programs the lab starts (`ProcessGuard`), lb-agent among them
//! (`AgentGuard`), and `lbctl`, the operator's tool, which is also how the lab asks an
//! agent whether it is ready and what it is doing. `run_bounded` and `Streaming` run
//! any command with a bound on its time.

use std::{
    ffi::OsStr,
    fs::{self, File},
    io::{self, BufRead, BufReader, Read},
    marker::PhantomData,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_userspace::protocol::{self, BackendStatus, Status};

use super::{LBCTL_TIMEOUT, Lab, Node, POLL_INTERVAL};

/// How long an agent may take from its start to answering `lbctl status`.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a starting agent is asked whether it answers.
const READY_POLL: Duration = Duration::from_millis(50);
/// How long a process gets to exit after SIGTERM before it gets SIGKILL.
const TERM_GRACE: Duration = Duration::from_secs(5);
/// A SIGHUP has no reply: the agent's report of it is a line of its log, one of these.
const AGENT_RELOADED: &str = "reloaded: ";
const AGENT_RELOAD_FAILED: &str = "reload failed, running config unchanged";
const AGENT_RELOAD_TIMEOUT: Duration = Duration::from_secs(20);

impl Lab {
    /// Starts `args` in `node`'s namespace in the background, stdout and stderr to a log
    /// file (see `ProcessGuard::log`). Dropping the guard stops it.
    pub fn spawn<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<ProcessGuard<'_>> {
        let log = self.new_file(&format!("{}-proc", node.short_name()), "log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)]).args(args);
        ProcessGuard::spawn(cmd, log)
    }

    /// `spawn_agent_on(Node::Lb, config)`.
    pub fn spawn_agent(&self, config: &str) -> Result<AgentGuard<'_>> {
        self.spawn_agent_on(Node::Lb, config)
    }

    /// Starts `lb-agent --config FILE` in `node`'s namespace (`Node::Lb`, or `Node::Lb2`
    /// with `LabBuilder::second_lb`) and waits (at most 20 s) until it is ready: until
    /// `lbctl --json status` on its control socket (`control_socket_of(node)`) answers.
    /// The config should come from `config_on(node, ..)` or `config_file(node, ..)`. On
    /// failure (the agent exits, or does not answer in time) the error holds its log.
    pub fn spawn_agent_on(&self, node: Node, config: &str) -> Result<AgentGuard<'_>> {
        self.spawn_agent_bin_on(node, &bin_path("lb-agent")?, config)
    }

    /// `spawn_agent_on` with the lb-agent at `bin` (another build's, for a benchmark's
    /// A/B).
    pub fn spawn_agent_bin_on(
        &self,
        node: Node,
        bin: &Path,
        config: &str,
    ) -> Result<AgentGuard<'_>> {
        ensure!(
            self.lbs().contains(&node),
            "no load balancer {node:?} in this lab (LabBuilder::second_lb for Node::Lb2)"
        );
        ensure!(bin.is_file(), "no lb-agent at {}", bin.display());
        let stem = format!("agent-{}", node.short_name());
        let config_path = self.new_file(&stem, "toml");
        write_atomically(&config_path, config)?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(node)])
            .arg(bin)
            .arg("--config")
            .arg(&config_path);
        let process = ProcessGuard::spawn(cmd, self.new_file(&stem, "log"))?;
        let mut agent = AgentGuard {
            process,
            node,
            config_path,
            control_socket: self.control_socket_of(node),
        };
        agent.wait_ready(AGENT_START_TIMEOUT)?;
        Ok(agent)
    }

    /// `lbctl_command_on(Node::Lb, args)`.
    pub fn lbctl_command<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Command> {
        self.lbctl_command_on(Node::Lb, args)
    }

    /// The command `lbctl --socket <control_socket_of(node)> ARGS`, not started. It runs
    /// in the root namespace: the control socket is a file, not lab traffic. For a run
    /// on another thread, pass it to `run_bounded`.
    pub fn lbctl_command_on<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<Command> {
        lbctl_command(&self.control_socket_of(node), args)
    }

    /// `lbctl_on(Node::Lb, args)`.
    pub fn lbctl<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<Output> {
        self.lbctl_on(Node::Lb, args)
    }

    /// Runs `lbctl --socket <control_socket_of(node)> ARGS`, bounded by `LBCTL_TIMEOUT`,
    /// and returns its output whatever the exit status.
    pub fn lbctl_on<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<Output> {
        run_bounded(self.lbctl_command_on(node, args)?, LBCTL_TIMEOUT)
    }

    /// `lbctl_ok_on(Node::Lb, args)`.
    pub fn lbctl_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<String> {
        self.lbctl_ok_on(Node::Lb, args)
    }

    /// `lbctl_on` that must exit 0; returns its stdout. The error holds status and stderr.
    pub fn lbctl_ok_on<S: AsRef<OsStr>>(&self, node: Node, args: &[S]) -> Result<String> {
        lbctl_ok(&self.control_socket_of(node), args, LBCTL_TIMEOUT)
    }

    /// `lbctl --json status` against the agent in the LB namespace, parsed.
    pub fn lbctl_status(&self) -> Result<Status> {
        self.lbctl_status_on(Node::Lb)
    }

    /// `lbctl --json status` against the agent in `node`'s namespace, parsed.
    pub fn lbctl_status_on(&self, node: Node) -> Result<Status> {
        lbctl_status(&self.control_socket_of(node), LBCTL_TIMEOUT)
    }

    /// Polls `lbctl --json status` of the agent in `node`'s namespace every
    /// `POLL_INTERVAL` until `done` holds; returns how long that took and the status
    /// then. Fails after `timeout`, with the last status seen.
    pub fn wait_status_on(
        &self,
        node: Node,
        what: &str,
        timeout: Duration,
        done: impl Fn(&Status) -> bool,
    ) -> Result<(Duration, Status)> {
        poll_lbctl(
            &format!("{node:?}"),
            what,
            timeout,
            || self.lbctl_status_on(node),
            done,
        )
    }

    /// `lbctl --json backend list [SERVICE]` against the agent in the LB namespace, parsed.
    pub fn lbctl_backends(&self, service: Option<&str>) -> Result<Vec<BackendStatus>> {
        let mut args = vec!["--json", "backend", "list"];
        args.extend(service);
        parse_backends_json(&self.lbctl_ok(&args)?)
    }

    /// One backend as `lbctl --json backend list SERVICE` shows it.
    pub fn lbctl_backend(&self, service: &str, backend: &str) -> Result<BackendStatus> {
        let all = self.lbctl_backends(Some(service))?;
        all.iter()
            .find(|b| b.service == service && b.name == backend)
            .cloned()
            .ok_or_else(|| anyhow!("lbctl backend list {service} has no {backend}: {all:#?}"))
    }

    /// Polls `lbctl --json backend list SERVICE` every `POLL_INTERVAL` until `done`
    /// holds for `backend`; returns how long that took and what lbctl showed then.
    /// Fails after `timeout`, with the last state seen.
    pub fn wait_backend(
        &self,
        service: &str,
        backend: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&BackendStatus) -> bool,
    ) -> Result<(Duration, BackendStatus)> {
        let subject = format!("{service}/{backend}");
        poll_lbctl(
            &subject,
            what,
            timeout,
            || self.lbctl_backend(service, backend),
            done,
        )
    }

    /// Waits until every named backend of `service` is up (healthy, enabled, in the ring).
    pub fn wait_backends_up(
        &self,
        service: &str,
        backends: &[&str],
        timeout: Duration,
    ) -> Result<()> {
        let all_up = |all: &Vec<BackendStatus>| {
            let mut named = all.iter().filter(|b| backends.contains(&b.name.as_str()));
            named.clone().count() == backends.len()
                && named.all(|b| b.state == protocol::BackendState::Up)
        };
        let what = format!("{backends:?} all up");
        let ask = || self.lbctl_backends(Some(service));
        poll_lbctl(service, &what, timeout, ask, all_up).map(|_| ())
    }
}

/// Asks `ask` every `POLL_INTERVAL` until `done` holds for its answer; returns how long
/// that took and the answer then. Fails after `timeout` with the last answer, or at
/// once if asking fails.
fn poll_lbctl<T: std::fmt::Debug>(
    subject: &str,
    what: &str,
    timeout: Duration,
    mut ask: impl FnMut() -> Result<T>,
    done: impl Fn(&T) -> bool,
) -> Result<(Duration, T)> {
    let start = Instant::now();
    loop {
        let answer = ask()?;
        if done(&answer) {
            return Ok((start.elapsed(), answer));
        }
        if start.elapsed() > timeout {
            bail!("{subject}: not {what} within {timeout:?}; lbctl shows {answer:#?}");
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Where lab programs find `lb-agent` and the other binaries: `$LB_BIN_DIR` (set by
/// `cargo xtask test`), else next to the running executable or one level up
/// (`target/debug/lb-demo`, `target/debug/deps/lab_dataplane-…`).
pub fn bin_path(name: &str) -> Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("LB_BIN_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    if let Ok(exe) = std::env::current_exe() {
        dirs.extend(exe.ancestors().skip(1).take(2).map(Path::to_path_buf));
    }
    for dir in &dirs {
        let path = dir.join(name);
        if path.is_file() {
            return Ok(path);
        }
    }
    bail!(
        "{name} not found (looked in {}). Build it with `cargo build --bins`, or set LB_BIN_DIR \
         to the directory that holds it",
        dirs.iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Runs `cmd` (stdin from /dev/null, stdout and stderr captured) and waits at most
/// `timeout` for it to exit; then it is killed and this is an error.
pub fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("waiting for {what}"))?
        {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(2));
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{what} did not finish within {timeout:?} (killed)\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout).trim(),
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// A command running in the background whose stdout lines are timestamped as they
/// arrive (e.g. `lbctl backend disable --wait`: when its first line comes, the disable
/// is in effect). `Drop` kills it if it still runs.
pub struct Streaming {
    child: Child,
    what: String,
    lines: std::sync::mpsc::Receiver<(Instant, String)>,
    seen: Vec<(Instant, String)>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    ended: Option<(ExitStatus, Instant)>,
}

impl Streaming {
    /// Starts `cmd` (stdin from /dev/null, stdout and stderr captured).
    pub fn spawn(mut cmd: Command) -> Result<Self> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let what = format!("{cmd:?}");
        let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        let (tx, lines) = std::sync::mpsc::channel();
        let stdout = child.stdout.take().context("no stdout pipe")?;
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = child.stderr.take().map(|mut pipe| {
            thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        });
        Ok(Streaming {
            child,
            what,
            lines,
            seen: Vec::new(),
            stderr,
            ended: None,
        })
    }

    fn collect(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
    }

    /// The first stdout line and when it was read, waiting at most `timeout` for it.
    pub fn first_line(&mut self, timeout: Duration) -> Result<(Instant, String)> {
        if self.seen.is_empty() {
            match self.lines.recv_timeout(timeout) {
                Ok(line) => self.seen.push(line),
                Err(_) => bail!("{}: no output within {timeout:?}", self.what),
            }
        }
        Ok(self.seen[0].clone())
    }

    /// The exit status and when it was first seen, if the command has ended.
    pub fn poll(&mut self) -> Result<Option<(ExitStatus, Instant)>> {
        if self.ended.is_none()
            && let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for {}", self.what))?
        {
            self.ended = Some((status, Instant::now()));
        }
        Ok(self.ended)
    }

    /// Waits (polling every 5 ms) at most `timeout` for the command to end.
    pub fn wait(&mut self, timeout: Duration) -> Result<Option<(ExitStatus, Instant)>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(ended) = self.poll()? {
                return Ok(Some(ended));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Every stdout line so far.
    pub fn stdout(&mut self) -> String {
        self.collect();
        self.seen.iter().map(|(_, l)| format!("{l}\n")).collect()
    }

    /// Its stderr; empty until the command has ended.
    pub fn stderr(&mut self) -> String {
        if self.ended.is_none() {
            return String::new();
        }
        let bytes = self
            .stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        if self.ended.is_none() && matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// `lbctl status --json`.
pub fn parse_status_json(text: &str) -> Result<Status> {
    serde_json::from_str(text.trim()).map_err(|e| anyhow!("lbctl status --json: {e}: {text:?}"))
}

/// `lbctl backend list --json`.
pub fn parse_backends_json(text: &str) -> Result<Vec<BackendStatus>> {
    serde_json::from_str(text.trim())
        .map_err(|e| anyhow!("lbctl backend list --json: {e}: {text:?}"))
}

/// A child process the lab started; `Drop` ends it: SIGTERM, up to 5 s, then SIGKILL.
/// It borrows the lab so that it ends before the namespaces do.
pub struct ProcessGuard<'lab> {
    child: Option<Child>,
    what: String,
    log: PathBuf,
    _lab: PhantomData<&'lab Lab>,
}

impl ProcessGuard<'_> {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        let what = format!("{cmd:?}");
        let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
        Ok(ProcessGuard {
            child: Some(child),
            what,
            log,
            _lab: PhantomData,
        })
    }

    /// The process id (`ip netns exec` execs the program, so it is the program's).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its stdout and stderr so far.
    pub fn log(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The exit status if it has ended (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Sends `signal` unless the process has ended. The child is not reaped before this
    /// guard does so, so the pid cannot belong to anyone else.
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        if self.exited().is_some() {
            return Err(io::Error::other(format!("{} has exited", self.what)));
        }
        let Some(pid) = self.pid() else {
            return Err(io::Error::other("no process"));
        };
        // SAFETY: kill(2) on our own unreaped child.
        if unsafe { libc::kill(pid as libc::pid_t, signal) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Ends the process: SIGTERM, a bounded wait, SIGKILL. Returns how it ended.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(io::Error::other("already stopped"));
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // SAFETY: kill(2) on our own unreaped child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + TERM_GRACE;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "lab: {} ignored SIGTERM for {TERM_GRACE:?}; killing it",
            self.what
        );
        child.kill()?;
        child.wait()
    }

    /// SIGKILL (no chance to clean up) and reap. Returns how it ended.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            return Err(io::Error::other("already stopped"));
        };
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        // Child::kill sends SIGKILL to this child's own pid.
        child.kill()?;
        child.wait()
    }
}

impl Drop for ProcessGuard<'_> {
    fn drop(&mut self) {
        if self.child.is_some()
            && let Err(e) = self.stop()
        {
            eprintln!("lab: stopping {}: {e}", self.what);
        }
    }
}

/// A running lb-agent. `Drop` stops it and, if the thread is panicking, prints the
/// end of its log.
pub struct AgentGuard<'lab> {
    process: ProcessGuard<'lab>,
    node: Node,
    config_path: PathBuf,
    control_socket: PathBuf,
}

impl AgentGuard<'_> {
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// The namespace it runs in.
    pub fn node(&self) -> Node {
        self.node
    }

    /// Everything the agent wrote to stdout and stderr so far: for diagnostics, and
    /// for tests about a message it logs.
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// How many lines of the log so far contain `marker`.
    pub fn count_log(&self, marker: &str) -> usize {
        count_lines(&self.log(), marker)
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn control_socket(&self) -> &Path {
        &self.control_socket
    }

    /// Rewrites the config file without telling the agent (for `lbctl reload`).
    pub fn write_config(&self, config: &str) -> Result<()> {
        write_atomically(&self.config_path, config)
    }

    /// `lbctl --json status` of this agent, parsed.
    pub fn status(&self) -> Result<Status> {
        lbctl_status(&self.control_socket, LBCTL_TIMEOUT)
    }

    /// Rewrites the config file and runs `lbctl reload`; returns the agent's answer.
    /// A reload the agent refuses is an error holding the errors it names.
    pub fn reload(&mut self, config: &str) -> Result<String> {
        self.write_config(config)?;
        lbctl_ok(&self.control_socket, &["reload"], LBCTL_TIMEOUT)
            .with_context(|| format!("lb-agent in {:?}: reload", self.node))
    }

    /// Rewrites the config file, sends SIGHUP and waits (at most 20 s) for the agent to
    /// report the reload. A signal gets no answer, so its report is the line the agent
    /// logs (`lb-agent: reloaded`, or `lb-agent: reload failed`, an error): for tests
    /// about SIGHUP. Others use `reload`, which `lbctl reload` answers.
    pub fn reload_by_sighup(&mut self, config: &str) -> Result<()> {
        let log = self.log();
        let (ok_before, failed_before) = (
            count_lines(&log, AGENT_RELOADED),
            count_lines(&log, AGENT_RELOAD_FAILED),
        );
        self.write_config(config)?;
        self.process
            .signal(libc::SIGHUP)
            .context("sending SIGHUP to lb-agent")?;
        let deadline = Instant::now() + AGENT_RELOAD_TIMEOUT;
        loop {
            let exited = self.process.exited();
            let log = self.log();
            if count_lines(&log, AGENT_RELOAD_FAILED) > failed_before {
                bail!("lb-agent: the reload failed; its log:\n{log}");
            }
            if count_lines(&log, AGENT_RELOADED) > ok_before {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!("lb-agent exited ({status}) during the reload; its log:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("lb-agent: no reload within {AGENT_RELOAD_TIMEOUT:?}; its log:\n{log}");
            }
            thread::sleep(READY_POLL);
        }
    }

    /// Sends `signal` to the agent unless it has exited.
    pub fn signal(&mut self, signal: libc::c_int) -> io::Result<()> {
        self.process.signal(signal)
    }

    /// The exit status if the agent has ended (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// Stops the agent (SIGTERM, then SIGKILL after 5 s) and returns how it ended.
    pub fn stop(&mut self) -> io::Result<ExitStatus> {
        self.process.stop()
    }

    /// Stops the agent if it still runs, then runs `lb-agent --config <its config>
    /// --detach`, which removes its program from the interface and its pins for good.
    /// Returns the detach run's output; an error if it failed.
    pub fn detach(&mut self) -> Result<Output> {
        if self.process.exited().is_none() {
            self.stop().context("stopping lb-agent before --detach")?;
        }
        let mut cmd = Command::new(bin_path("lb-agent")?);
        cmd.arg("--config").arg(&self.config_path).arg("--detach");
        let out = run_bounded(cmd, LBCTL_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "lb-agent --detach failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(out)
    }

    /// SIGKILL the agent and reap it. Its XDP link and maps stay pinned (a VRRP master's
    /// serving lease runs out by itself). The log stays readable; start a new agent with
    /// `Lab::spawn_agent_on`.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        self.process.kill()
    }

    /// Asks the agent `lbctl --json status` until it answers; fails if the agent exits
    /// first or `timeout` passes, with its log. (The agent binds its socket before it
    /// attaches XDP and answers only once it serves, so an early question waits.)
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            // A socket file left by a killed agent refuses the connection: ask again.
            if self.control_socket.exists() {
                let left = deadline.saturating_duration_since(Instant::now());
                match lbctl_status(&self.control_socket, left.max(READY_POLL)) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = Some(e),
                }
            }
            if let Some(status) = self.process.exited() {
                bail!(
                    "lb-agent in {:?} exited ({status}) before it answered on {}; its log:\n{}",
                    self.node,
                    self.control_socket.display(),
                    self.log()
                );
            }
            if Instant::now() > deadline {
                let last = last.map_or("its socket never appeared".into(), |e| format!("{e:#}"));
                bail!(
                    "lb-agent in {:?}: no answer to lbctl status on {} within {timeout:?} \
                     (last: {last}); its log:\n{}",
                    self.node,
                    self.control_socket.display(),
                    self.log()
                );
            }
            thread::sleep(READY_POLL);
        }
    }
}

impl Drop for AgentGuard<'_> {
    fn drop(&mut self) {
        if thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!(
                "--- lb-agent log (last {} lines) ---\n{}\n---",
                tail.len(),
                tail.join("\n")
            );
        }
        // ProcessGuard's Drop stops the process.
    }
}

/// `lbctl --socket SOCKET ARGS`, not started.
fn lbctl_command<S: AsRef<OsStr>>(socket: &Path, args: &[S]) -> Result<Command> {
    let mut cmd = Command::new(bin_path("lbctl")?);
    cmd.arg("--socket").arg(socket).args(args);
    Ok(cmd)
}

/// `lbctl --socket SOCKET ARGS` within `timeout`, which must exit 0; returns its stdout.
/// The error holds status, stdout and stderr.
fn lbctl_ok<S: AsRef<OsStr>>(socket: &Path, args: &[S], timeout: Duration) -> Result<String> {
    let out = run_bounded(lbctl_command(socket, args)?, timeout)?;
    ensure!(
        out.status.success(),
        "lbctl {} failed ({}):\nstdout: {}\nstderr: {}",
        args.iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `lbctl --socket SOCKET --json status` within `timeout`, parsed.
fn lbctl_status(socket: &Path, timeout: Duration) -> Result<Status> {
    parse_status_json(&lbctl_ok(socket, &["--json", "status"], timeout)?)
}

fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn count_lines(log: &str, marker: &str) -> usize {
    log.lines().filter(|l| l.contains(marker)).count()
}
