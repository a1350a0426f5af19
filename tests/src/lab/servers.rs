//! The backends' TCP servers: threads of the test process, each listening inside a
//! backend's namespace, that greet every connection with the backend's name and then
//! echo its lines.

use std::{
    io::{self, BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use anyhow::{Context, Result, ensure};

use super::{ASK_TIMEOUT, Lab, Node, try_in_ns};

/// How often idle server threads look at their stop flag.
const SERVER_TICK: Duration = Duration::from_millis(50);

impl Lab {
    /// Starts a TCP server in backend `i`'s namespace on `[::]:port`, dual stack (IPv4
    /// and IPv6). Each connection gets the line `b<i>`, then every line it sends comes
    /// back, until EOF.
    pub fn start_server(&self, i: usize, port: u16) -> Result<()> {
        ensure!(
            (1..=self.backends).contains(&i),
            "no backend {i} in this lab"
        );
        self.start_server_on(Node::Backend(i), port)
    }

    /// `start_server` for every backend.
    pub fn start_servers(&self, port: u16) -> Result<()> {
        (1..=self.backends).try_for_each(|i| self.start_server(i, port))
    }

    /// A server like the backends' in any node's namespace; it greets with the node's
    /// short name (`lb`, `cl`, `b<i>`).
    pub fn start_server_on(&self, node: Node, port: u16) -> Result<()> {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        ensure!(
            !servers.contains_key(&(node, port)),
            "a server already runs on {node:?} port {port}"
        );
        let server = Server::start(&self.ns(node), port, node.short_name())
            .with_context(|| format!("starting a server on {node:?} port {port}"))?;
        servers.insert((node, port), server);
        Ok(())
    }

    /// Stops backend `i`'s server on `port`, closing its open connections; false when
    /// none ran.
    pub fn stop_server(&self, i: usize, port: u16) -> bool {
        self.stop_server_on(Node::Backend(i), port)
    }

    pub fn stop_server_on(&self, node: Node, port: u16) -> bool {
        let server = self
            .servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(node, port));
        server.is_some() // dropping it stops it
    }

    /// Stops and starts backend `i`'s server on `port` again.
    pub fn restart_server(&self, i: usize, port: u16) -> Result<()> {
        self.stop_server(i, port);
        self.start_server(i, port)
    }
}

/// An in-process TCP server; `Drop` stops it and closes its connections.
pub(super) struct Server {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    fn start(ns: &str, port: u16, greeting: String) -> io::Result<Server> {
        let listener = try_in_ns(ns, || dual_stack_listener(port))?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let acceptor = {
            let (stop, connections) = (stop.clone(), connections.clone());
            thread::Builder::new()
                .name(format!("accept-{greeting}-{port}"))
                .spawn(move || accept_loop(&listener, &greeting, &stop, &connections))?
        };
        Ok(Server {
            stop,
            acceptor: Some(acceptor),
            connections,
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections =
            std::mem::take(&mut *self.connections.lock().unwrap_or_else(|e| e.into_inner()));
        for c in connections {
            let _ = c.join();
        }
    }
}

/// One `[::]:port` socket taking IPv4 (mapped) and IPv6 connections alike.
fn dual_stack_listener(port: u16) -> io::Result<TcpListener> {
    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }
    // SAFETY: socket(2) has no preconditions; the fd is owned right away.
    let fd = unsafe {
        OwnedFd::from_raw_fd(check(libc::socket(
            libc::AF_INET6,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
        ))?)
    };
    let set = |level, name, value: libc::c_int| {
        // SAFETY: a valid fd and a pointer to a c_int of the given size.
        check(unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        })
    };
    set(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 0)?;
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    // SAFETY: all-zero is a valid sockaddr_in6 (the any address).
    let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    addr.sin6_family = libc::AF_INET6 as libc::sa_family_t;
    addr.sin6_port = port.to_be();
    // SAFETY: a valid fd and a sockaddr_in6 of the size given.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_in6).cast(),
            size_of::<libc::sockaddr_in6>() as libc::socklen_t,
        )
    })?;
    // SAFETY: a valid, bound fd.
    check(unsafe { libc::listen(fd.as_raw_fd(), 1024) })?;
    Ok(TcpListener::from(fd))
}

/// Waits at most `timeout` for `fd` to become readable.
fn wait_readable(fd: &impl AsRawFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) > 0 }
}

fn accept_loop(
    listener: &TcpListener,
    greeting: &str,
    stop: &Arc<AtomicBool>,
    connections: &Mutex<Vec<JoinHandle<()>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(listener, SERVER_TICK) {
            continue;
        }
        match listener.accept() {
            Ok((stream, peer)) => {
                let (name, stop) = (greeting.to_string(), stop.clone());
                let spawned = thread::Builder::new()
                    .name(format!("conn-{greeting}"))
                    .spawn(move || {
                        if let Err(e) = serve_connection(stream, &name, &stop) {
                            eprintln!("lab server {name}: connection from {peer}: {e}");
                        }
                    });
                let mut connections = connections.lock().unwrap_or_else(|e| e.into_inner());
                connections.retain(|c| !c.is_finished());
                match spawned {
                    Ok(handle) => connections.push(handle),
                    Err(e) => {
                        eprintln!("lab server {greeting}: cannot start a connection thread: {e}")
                    }
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => {
                eprintln!("lab server {greeting}: accept: {e}");
                thread::sleep(SERVER_TICK);
            }
        }
    }
}

/// Greets, then echoes lines until EOF or until the server stops.
fn serve_connection(stream: TcpStream, greeting: &str, stop: &AtomicBool) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_TICK))?;
    stream.set_write_timeout(Some(ASK_TIMEOUT))?;
    let mut writer = stream.try_clone()?;
    writer.write_all(format!("{greeting}\n").as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_until(b'\n', &mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                writer.write_all(&line)?;
                if !line.ends_with(b"\n") {
                    return Ok(()); // EOF after a last, unterminated line
                }
                line.clear();
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
