//! Load: client threads in the client namespace that open short connections to a VIP
//! and record each (`Load`, `Attempt`), and the spread of a series of connections over
//! the backends (`Spread`), and a spoofed SYN flood from the client namespace
//! (`Lab::syn_flood`, `Flood`).

use std::{
    collections::BTreeMap,
    marker::PhantomData,
    net::SocketAddr,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use super::{
    ASK_TIMEOUT, Lab, Node, SERVICE_PORT, VIP4, probes::greeting_within, run_bounded,
    topology::enter_netns,
};

impl Lab {
    /// Runs hping3 in the client namespace, one process pinned to each CPU so that every
    /// CPU records new flows (each CPU's flood guard counts its own): SYNs from
    /// random sources to the VIP's (`VIP4`) service port, `syns` in all, as fast as
    /// hping3 goes with a 5 µs pause. Bounded in count and in time: each hping3 is
    /// interrupted (SIGINT, so that it still prints its statistics) after `max_time`.
    pub fn syn_flood(&self, syns: u32, max_time: Duration) -> Result<Flood> {
        let cpus = thread::available_parallelism().map_or(1, |n| n.get()) as u32;
        let count = (syns / cpus).max(1).to_string();
        let secs = format!("{:.3}", max_time.as_secs_f64());
        let port = SERVICE_PORT.to_string();
        let vip = VIP4.to_string();
        let ns = self.ns(Node::Client);
        let started = Instant::now();
        let outputs = thread::scope(|scope| {
            let runs: Vec<_> = (0..cpus)
                .map(|cpu| {
                    let mut cmd = Command::new("ip");
                    cmd.args(["netns", "exec", &ns, "taskset", "-c", &cpu.to_string()])
                        .args(["timeout", "-s", "INT", &secs])
                        .args(["hping3", "-q", "-S", "--rand-source", "-i", "u5"])
                        .args(["-c", &count, "-p", &port, &vip]);
                    scope.spawn(move || run_bounded(cmd, max_time + Duration::from_secs(10)))
                })
                .collect();
            runs.into_iter()
                .map(|r| {
                    r.join()
                        .map_err(|_| anyhow::anyhow!("a flood thread panicked"))?
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut flood = Flood {
            lines: Vec::new(),
            sent: 0,
            elapsed: started.elapsed(),
        };
        for out in outputs {
            // hping3 exits non-zero when no reply came back, which is the case here: the
            // backends answer the spoofed sources, not us. What it printed is the record.
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                text.contains("packets transmitted"),
                "hping3 did not run: {text}"
            );
            for line in text.lines().filter(|l| l.contains("transmitted")) {
                flood.sent += line
                    .split_whitespace()
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
                flood.lines.push(line.trim().to_string());
            }
        }
        Ok(flood)
    }

    /// Opens `n` connections to `addr` one after the other and counts which backend
    /// greeted each. Stops early once `budget` has passed; connections not tried then
    /// count as failures.
    pub fn spread(&self, addr: SocketAddr, n: usize, budget: Duration) -> Spread {
        let start = Instant::now();
        let mut spread = Spread {
            addr,
            attempted: 0,
            not_tried: 0,
            counts: BTreeMap::new(),
            failures: Vec::new(),
            elapsed: Duration::ZERO,
        };
        for k in 0..n {
            if start.elapsed() > budget {
                spread.not_tried = n - k;
                break;
            }
            spread.attempted += 1;
            match self.ask_backend(addr) {
                Ok(name) => *spread.counts.entry(name).or_default() += 1,
                Err(e) => spread.failures.push(format!("connection {k}: {e}")),
            }
        }
        spread.elapsed = start.elapsed();
        spread
    }

    /// Starts a client thread in the client namespace that opens short connections to
    /// `addr` one after the other (each reads the greeting, then closes), pausing
    /// `pause` between two, and records every attempt. It stops by itself after
    /// `max_connections` attempts or `max_time`, or when the `Load` is stopped or dropped.
    pub fn start_load(
        &self,
        addr: SocketAddr,
        max_connections: usize,
        max_time: Duration,
        pause: Duration,
    ) -> Result<Load<'_>> {
        let pacing = Pacing::Pause(pause);
        self.start_recorder("load", addr, max_connections, max_time, pacing, ASK_TIMEOUT)
    }

    /// A client thread in the client namespace that opens short connections to `addr`
    /// (connect and greeting each bounded by `timeout`), paced by `pacing`, and records
    /// every attempt, until `max_connections`, `max_time`, or the `Load` stops or drops.
    pub(super) fn start_recorder(
        &self,
        what: &'static str,
        addr: SocketAddr,
        max_connections: usize,
        max_time: Duration,
        pacing: Pacing,
        timeout: Duration,
    ) -> Result<Load<'_>> {
        let ns = self.ns(Node::Client);
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let (entered_tx, entered_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, attempts) = (stop.clone(), attempts.clone());
            thread::Builder::new()
                .name(format!("{what}-{addr}"))
                .spawn(move || {
                    let entered = enter_netns(&ns);
                    let ok = entered.is_ok();
                    let _ = entered_tx.send(entered);
                    if !ok {
                        return;
                    }
                    let start = Instant::now();
                    for _ in 0..max_connections {
                        if stop.load(Ordering::Relaxed) || start.elapsed() > max_time {
                            break;
                        }
                        let started = Instant::now();
                        let outcome = greeting_within(addr, timeout).map_err(|e| e.to_string());
                        let attempt = Attempt {
                            started,
                            elapsed: started.elapsed(),
                            outcome,
                        };
                        attempts
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(attempt);
                        thread::sleep(match pacing {
                            Pacing::Pause(pause) => pause,
                            Pacing::Every(every) => every.saturating_sub(started.elapsed()),
                        });
                    }
                })
                .with_context(|| format!("starting the {what} thread"))?
        };
        entered_rx
            .recv()
            .with_context(|| {
                format!("the {what} thread ended before entering the client namespace")
            })?
            .with_context(|| format!("{what} thread"))?;
        Ok(Load {
            stop,
            attempts,
            thread: Some(thread),
            _lab: PhantomData,
        })
    }
}

/// How a recording client spaces its connections.
#[derive(Clone, Copy, Debug)]
pub(super) enum Pacing {
    /// This long between the end of one connection and the start of the next.
    Pause(Duration),
    /// One connection started this often (or as soon as the last one ends).
    Every(Duration),
}

/// One short connection of a `Load`.
#[derive(Clone, Debug)]
pub struct Attempt {
    /// When the connect began.
    pub started: Instant,
    /// Connect plus greeting.
    pub elapsed: Duration,
    /// The greeting (backend name), or the error.
    pub outcome: Result<String, String>,
}

impl Attempt {
    /// The backend that answered, if any.
    pub fn backend(&self) -> Option<&str> {
        self.outcome.as_deref().ok()
    }
}

/// A client thread opening short connections (see `Lab::start_load`). `Drop` stops it.
pub struct Load<'lab> {
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<()>>,
    _lab: PhantomData<&'lab Lab>,
}

impl Load<'_> {
    /// Every attempt so far, in order.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.attempts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the thread still runs (it ends by itself at its bounds).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Polls (every 10 ms) until `done` holds for the attempts so far, the thread ends,
    /// or `timeout` passes; returns whether `done` held.
    pub fn wait_for(&self, timeout: Duration, done: impl Fn(&[Attempt]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let running = self.is_running();
            if done(&self.attempts.lock().unwrap_or_else(|e| e.into_inner())) {
                return true;
            }
            if !running || Instant::now() > deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the thread, waits for its last connection, returns every attempt.
    pub fn stop(mut self) -> Vec<Attempt> {
        self.halt();
        self.attempts()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Load<'_> {
    fn drop(&mut self) {
        self.halt();
    }
}

/// How `Lab::spread` found connections to spread over the backends.
#[derive(Clone, Debug)]
pub struct Spread {
    pub addr: SocketAddr,
    pub attempted: usize,
    /// Connections left out because the time budget ran out.
    pub not_tried: usize,
    /// Connections per greeting (backend name).
    pub counts: BTreeMap<String, usize>,
    /// One message per failed connection.
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl Spread {
    pub fn succeeded(&self) -> usize {
        self.counts.values().sum()
    }

    pub fn count(&self, backend: &str) -> usize {
        self.counts.get(backend).copied().unwrap_or(0)
    }

    /// A small table: backend, connections, share.
    pub fn table(&self) -> String {
        let total = self.succeeded().max(1) as f64;
        let mut out = format!("  {:<8} {:>11} {:>7}\n", "backend", "connections", "share");
        for (name, &n) in &self.counts {
            out += &format!("  {name:<8} {n:>11} {:>6.1}%\n", 100.0 * n as f64 / total);
        }
        out += &format!(
            "  {} of {} connections to {} succeeded in {:.2?}",
            self.succeeded(),
            self.attempted,
            self.addr,
            self.elapsed
        );
        if !self.failures.is_empty() {
            out += &format!(
                "; {} failed, first: {}",
                self.failures.len(),
                self.failures[0]
            );
        }
        if self.not_tried > 0 {
            out += &format!("; {} not tried: the time budget ran out", self.not_tried);
        }
        out
    }

    /// Checks that every connection was tried and succeeded and that each backend got between `low` and
    /// `high` times its expected share (`weights` are relative). Backends not named in
    /// `weights` must get nothing.
    pub fn check_shares(&self, weights: &[(&str, f64)], low: f64, high: f64) -> Result<()> {
        ensure!(
            self.failures.is_empty() && self.not_tried == 0,
            "not every connection succeeded:\n{}",
            self.table()
        );
        let sum: f64 = weights.iter().map(|&(_, w)| w).sum();
        let total = self.succeeded() as f64;
        for &(name, weight) in weights {
            let expected = total * weight / sum;
            let got = self.count(name) as f64;
            ensure!(
                got >= low * expected && got <= high * expected,
                "{name} got {got} connections, expected {expected:.0} (between {:.0} and {:.0})\n{}",
                low * expected,
                high * expected,
                self.table()
            );
        }
        for name in self.counts.keys() {
            ensure!(
                weights.iter().any(|&(n, _)| n == name),
                "{name} got connections it should not have\n{}",
                self.table()
            );
        }
        Ok(())
    }
}

/// What `Lab::syn_flood` sent.
#[derive(Clone, Debug)]
pub struct Flood {
    /// hping3's "packets transmitted" line, one per process.
    pub lines: Vec<String>,
    /// SYNs transmitted, all processes together.
    pub sent: u64,
    /// From the start of the first process to the end of the last.
    pub elapsed: Duration,
}

impl Flood {
    /// One line: what each hping3 reported.
    pub fn summary(&self) -> String {
        self.lines.join("; ")
    }
}
