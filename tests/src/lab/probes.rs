//! Probes: single connections from the client namespace (`connect`, `ask_backend`,
//! `converse` and its `Conversation`), and the prober that measures how long the
//! client could not connect around an event (`start_probe`, `probe_gap`).

use std::{
    collections::BTreeMap,
    io::{self, BufRead, BufReader, Write},
    net::{SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};

use super::{ASK_TIMEOUT, Attempt, Lab, Load, Node, load::Pacing, try_in_ns};

impl Lab {
    /// Connects from the client namespace.
    pub fn connect(&self, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
        try_in_ns(&self.ns(Node::Client), || {
            TcpStream::connect_timeout(&addr, timeout)
        })
    }

    /// Connects from the client namespace and returns the greeting line: the name of the
    /// backend that answered. Connect and read are each bounded by `ASK_TIMEOUT`.
    pub fn ask_backend(&self, addr: SocketAddr) -> io::Result<String> {
        Ok(self.converse(addr)?.greeting)
    }

    /// A connection from the client namespace, greeting read, ready to echo lines.
    pub fn converse(&self, addr: SocketAddr) -> io::Result<Conversation> {
        let stream = self.connect(addr, ASK_TIMEOUT)?;
        stream.set_read_timeout(Some(ASK_TIMEOUT))?;
        stream.set_write_timeout(Some(ASK_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut conversation = Conversation {
            reader: BufReader::new(stream),
            writer,
            greeting: String::new(),
        };
        conversation.greeting = conversation.read_line()?;
        Ok(conversation)
    }

    /// Opens connections to `vip` until each backend of `wanted` (by greeting) holds
    /// one, at most `max_attempts` connections; the extra ones are closed at once.
    pub fn one_per_backend(
        &self,
        vip: SocketAddr,
        wanted: &[&str],
        max_attempts: usize,
    ) -> Result<BTreeMap<String, Conversation>> {
        let mut held = BTreeMap::new();
        for k in 0..max_attempts {
            if held.len() == wanted.len() {
                println!("long-lived connections: one on each of {wanted:?} after {k} connections");
                return Ok(held);
            }
            let c = self
                .converse(vip)
                .with_context(|| format!("long-lived connection attempt {k} to {vip}"))?;
            if wanted.contains(&c.greeting.as_str()) && !held.contains_key(&c.greeting) {
                held.insert(c.greeting.clone(), c);
            }
        }
        ensure!(
            held.len() == wanted.len(),
            "no long-lived connection on every one of {wanted:?} within {max_attempts} \
             connections; got {:?}",
            held.keys().collect::<Vec<_>>()
        );
        Ok(held)
    }

    /// Starts a prober: a thread in the client namespace that, every `every`, opens a
    /// short connection to `addr` (connect and greeting each bounded by `timeout`),
    /// records it as an `Attempt`, and closes it. It ends by itself after `max_time`,
    /// or when the returned `Load` is stopped or dropped. `probe_gap` reads the record.
    pub fn start_probe(
        &self,
        addr: SocketAddr,
        every: Duration,
        timeout: Duration,
        max_time: Duration,
    ) -> Result<Load<'_>> {
        let pacing = Pacing::Every(every);
        self.start_recorder("probe", addr, usize::MAX, max_time, pacing, timeout)
    }
}

/// A client connection whose greeting has been read.
pub struct Conversation {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The first line the server sent: the backend's name.
    pub greeting: String,
}

impl Conversation {
    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_string())
    }

    /// Sends `line` and returns what came back (bounded by `ASK_TIMEOUT`).
    pub fn echo(&mut self, line: &str) -> io::Result<String> {
        self.writer.write_all(format!("{line}\n").as_bytes())?;
        self.read_line()
    }

    /// Sends `line` and checks that the same line comes back.
    pub fn check_echo(&mut self, line: &str) -> Result<()> {
        let got = self.echo(line).with_context(|| {
            format!(
                "echo {line:?} on the long-lived connection to {}",
                self.greeting
            )
        })?;
        ensure!(
            got == line,
            "the long-lived connection to {} echoed {got:?} for {line:?}",
            self.greeting
        );
        Ok(())
    }
}

/// What a prober (`Lab::start_probe`) saw around one event: the longest time without
/// a successful connection, from the end of the last success begun before the event
/// to the end of the success that closed that stretch. (A connection begun just after
/// a SIGKILL may still get through while the kernel tears the XDP link down, so "the
/// first success after the event" alone would hide the outage that follows.)
#[derive(Clone, Debug)]
pub struct ProbeGap {
    pub gap: Duration,
    /// When the stretch began, measured from the event (negative: before it).
    pub from_event_ms: i64,
    /// Failed attempts within the stretch.
    pub failures: usize,
    /// When the success that ended the stretch ended, measured from the event.
    pub recovered_after: Duration,
    /// The backend that answered that connection.
    pub backend: String,
    /// When the record ends in failures: how long since its last success (an outage
    /// still going on, not counted in `gap`), and how many failed since.
    pub still_failing: Option<(Duration, usize)>,
}

impl std::fmt::Display for ProbeGap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "gap {:.1?} (from {} ms after the event to a success from {} {:.1?} after it; {} failed attempts in between)",
            self.gap, self.from_event_ms, self.backend, self.recovered_after, self.failures
        )?;
        if let Some((d, n)) = self.still_failing {
            write!(
                f,
                "; STILL FAILING: {n} attempts in {d:.1?} since the last success"
            )?;
        }
        Ok(())
    }
}

/// The longest stretch without success in a prober's record from the last success
/// begun before `event` on (see `ProbeGap`); `None` when no connection begun after
/// `event` succeeded. With no success before the event, the first stretch counts from
/// the event.
pub fn probe_gap(attempts: &[Attempt], event: Instant) -> Option<ProbeGap> {
    let end = |a: &Attempt| a.started + a.elapsed;
    let from = attempts
        .iter()
        .rposition(|a| a.started < event && a.outcome.is_ok());
    if !attempts[from.map_or(0, |i| i + 1)..]
        .iter()
        .any(|a| a.outcome.is_ok())
    {
        return None;
    }
    let mut prev = from.map_or(event, |i| end(&attempts[i]));
    let mut failures = 0;
    let mut best: Option<ProbeGap> = None;
    for a in &attempts[from.map_or(0, |i| i + 1)..] {
        if a.started < event && from.is_none() {
            continue;
        }
        if a.outcome.is_err() {
            failures += 1;
            continue;
        }
        let gap = end(a).saturating_duration_since(prev);
        if best.as_ref().is_none_or(|b| gap > b.gap) {
            let from_event_ms = if prev >= event {
                prev.duration_since(event).as_millis() as i64
            } else {
                -(event.duration_since(prev).as_millis() as i64)
            };
            best = Some(ProbeGap {
                gap,
                from_event_ms,
                failures,
                recovered_after: end(a).saturating_duration_since(event),
                backend: a.backend().unwrap_or_default().to_string(),
                still_failing: None,
            });
        }
        prev = end(a);
        failures = 0;
    }
    if let (Some(b), Some(last)) = (best.as_mut(), attempts.last())
        && failures > 0
    {
        b.still_failing = Some((end(last).saturating_duration_since(prev), failures));
    }
    best
}

/// Connects to `addr` and reads the greeting, connect and read each bounded by `timeout`.
pub(super) fn greeting_within(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the server closed the connection before its greeting",
        ));
    }
    Ok(line.trim_end_matches(['\r', '\n']).to_string())
}
