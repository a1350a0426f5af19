//! The agent's control socket. Each connection is served on its own task; requests go to
//! the agent's main loop over a channel, so all state changes happen in one place. A
//! request that cannot be read gets an error reply, and the socket keeps serving.
//! A `trace` request turns its connection into a stream of the program's decisions,
//! served from the trace hub on the connection's own task.

use std::{
    io,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{broadcast::error::RecvError, mpsc, oneshot},
};

use crate::{
    protocol::{MAX_REQUEST, ProtocolError, Request, Response, decode_request, encode},
    trace::{TraceFilter, TraceHub},
};

/// A request and where its answer goes.
pub type Call = (Request, oneshot::Sender<Response>);

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("another agent is already serving {0}")]
    InUse(PathBuf),
    #[error("control socket {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Binds the socket with mode 0600, replacing a stale socket file but never a live one.
pub fn bind(path: &Path) -> Result<UnixListener, ControlError> {
    let io_err = |source| ControlError::Io {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(ControlError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(io_err)?;
    }
    let listener = UnixListener::bind(path).map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err)?;
    Ok(listener)
}

/// Accepts connections until the listener fails; each one is served on its own task.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<Call>, trace: TraceHub) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, calls.clone(), trace.clone()));
            }
            Err(e) => {
                tracing::warn!("control socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn reply(stream: &mut (impl AsyncWriteExt + Unpin), response: &Response) -> io::Result<()> {
    stream.write_all(&encode(response)).await
}

/// Requests, one per line, answered in order, until EOF or an oversized request.
async fn serve_connection(stream: UnixStream, calls: mpsc::Sender<Call>, trace: TraceHub) {
    // The socket file is 0600 root; checking the peer too costs nothing.
    let uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (read, mut write) = stream.into_split();
    if uid != Some(0) {
        let _ = reply(
            &mut write,
            &Response::error("permission denied: only root may control lb-agent"),
        )
        .await;
        return;
    }
    let mut read = BufReader::new(read);
    loop {
        let mut line = Vec::new();
        let limit = (MAX_REQUEST + 1) as u64;
        match (&mut read).take(limit).read_until(b'\n', &mut line).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                let _ = reply(
                    &mut write,
                    &Response::error(format!("reading the request: {e}")),
                )
                .await;
                return;
            }
        }
        if line.len() > MAX_REQUEST {
            // The rest of the line is unread: the connection cannot be resynchronised.
            let _ = reply(
                &mut write,
                &Response::error(ProtocolError::TooLarge(MAX_REQUEST).to_string()),
            )
            .await;
            return;
        }
        let response = match decode_request(&line) {
            Err(e) => Response::error(format!("bad request: {e}")),
            Ok(Request::Trace { vip, count }) => {
                let filter = TraceFilter { vip };
                stream_trace(read, write, &calls, &trace, filter, count).await;
                return;
            }
            Ok(request) => call(&calls, request).await,
        };
        if reply(&mut write, &response).await.is_err() {
            return;
        }
    }
}

/// A trace: subscribe (the count of clients switches the program's flag), ask the loop
/// to switch it now, say so, then send every matching event until `count` or until
/// the client goes (EOF or a failed write); dropping the subscription switches it off.
async fn stream_trace(
    mut read: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut write: tokio::net::unix::OwnedWriteHalf,
    calls: &mpsc::Sender<Call>,
    trace: &TraceHub,
    filter: TraceFilter,
    count: Option<u64>,
) {
    let mut sub = trace.subscribe();
    let started = call(
        calls,
        Request::Trace {
            vip: filter.vip,
            count,
        },
    )
    .await;
    let failed = matches!(started, Response::Error { .. });
    if reply(&mut write, &started).await.is_err() || failed {
        return;
    }
    let mut sent = 0u64;
    let mut scratch = [0u8; 512];
    while count.is_none_or(|n| sent < n) {
        let response = tokio::select! {
            // Anything the client sends is ignored; its EOF ends the trace.
            r = read.read(&mut scratch) => match r {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            },
            event = sub.events.recv() => match event {
                Ok(record) if filter.matches(&record) => {
                    sent += 1;
                    Response::Trace((*record).clone())
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(events)) => Response::TraceLost { events },
                Err(RecvError::Closed) => Response::error("the agent stopped tracing"),
            },
        };
        if reply(&mut write, &response).await.is_err() {
            return;
        }
    }
    let _ = reply(
        &mut write,
        &Response::Done {
            message: format!("{sent} events"),
        },
    )
    .await;
}

async fn call(calls: &mpsc::Sender<Call>, request: Request) -> Response {
    let (tx, rx) = oneshot::channel();
    if calls.send((request, tx)).await.is_err() {
        return Response::error("the agent is shutting down");
    }
    rx.await
        .unwrap_or_else(|_| Response::error("the agent dropped the request"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Envelope, PROTOCOL_VERSION, decode_response};

    /// The server in-process on a socket in a temporary folder, with a fake agent loop.
    async fn start(name: &str) -> PathBuf {
        start_with(name, TraceHub::new()).await
    }

    async fn start_with(name: &str, hub: TraceHub) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("lb-control-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("lb.sock");
        let listener = bind(&path).expect("bind");
        let (tx, mut rx) = mpsc::channel::<Call>(8);
        tokio::spawn(serve(listener, tx, hub));
        tokio::spawn(async move {
            while let Some((request, answer)) = rx.recv().await {
                let _ = answer.send(Response::Done {
                    message: format!("{request:?}"),
                });
            }
        });
        path
    }

    async fn exchange(stream: &mut UnixStream, bytes: &[u8]) -> Response {
        stream.write_all(bytes).await.expect("write");
        let mut line = Vec::new();
        BufReader::new(stream)
            .read_until(b'\n', &mut line)
            .await
            .expect("read");
        decode_response(&line).expect("a response")
    }

    #[tokio::test]
    async fn serves_requests_and_survives_bad_ones() {
        // Tests run as root in CI; as another user the server rightly refuses us.
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let path = start("serve").await;
        let mode = std::fs::metadata(&path)
            .expect("socket")
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let mut s = UnixStream::connect(&path).await.expect("connect");
        let good = encode(&Envelope {
            version: PROTOCOL_VERSION,
            request: Request::Status,
        });
        if !root {
            let r = exchange(&mut s, &good).await;
            assert!(
                matches!(r, Response::Error { ref message, .. } if message.contains("only root")),
                "{r:?}"
            );
            return;
        }
        assert!(matches!(
            exchange(&mut s, &good).await,
            Response::Done { .. }
        ));
        for bad in [
            &b"not json\n"[..],
            b"{\"version\":1,\"command\":\"explode\"}\n",
            b"{\"version\":3,\"command\":\"status\"}\n",
        ] {
            let r = exchange(&mut s, bad).await;
            assert!(matches!(r, Response::Error { .. }), "{r:?}");
        }
        // Same connection, still served.
        assert!(matches!(
            exchange(&mut s, &good).await,
            Response::Done { .. }
        ));
        // Oversized: an error reply, then this connection closes; others are served.
        let mut big = vec![b'x'; MAX_REQUEST + 10];
        big.push(b'\n');
        let r = exchange(&mut s, &big).await;
        assert!(
            matches!(r, Response::Error { ref message, .. } if message.contains("larger")),
            "{r:?}"
        );
        let mut again = UnixStream::connect(&path).await.expect("connect");
        assert!(matches!(
            exchange(&mut again, &good).await,
            Response::Done { .. }
        ));
    }

    #[tokio::test]
    async fn refuses_to_take_over_a_live_socket() {
        let path = start("live").await;
        assert!(matches!(bind(&path), Err(ControlError::InUse(_))));
    }

    async fn read_line(read: &mut BufReader<UnixStream>) -> Response {
        let mut line = Vec::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read.read_until(b'\n', &mut line),
        )
        .await
        .expect("a line within 5 s")
        .expect("read");
        decode_response(&line).expect("a response")
    }

    async fn clients_become(hub: &TraceHub, n: usize) {
        for _ in 0..500 {
            if hub.clients() == n {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{} trace clients, expected {n}", hub.clients());
    }

    #[tokio::test]
    async fn a_trace_streams_matching_events_until_its_count_or_its_client_goes() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let hub = TraceHub::new();
        let path = start_with("trace", hub.clone()).await;
        let vip: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        let request = Request::Trace {
            vip: Some(vip),
            count: Some(2),
        };
        let frame = encode(&Envelope {
            version: request.version(),
            request,
        });
        let mut s = BufReader::new(UnixStream::connect(&path).await.expect("connect"));
        s.get_mut().write_all(&frame).await.expect("write");
        let first = read_line(&mut s).await;
        if !root {
            assert!(matches!(first, Response::Error { .. }), "{first:?}");
            return;
        }
        // The fake loop's answer to the trace request comes first.
        assert!(matches!(first, Response::Done { .. }), "{first:?}");
        assert_eq!(hub.clients(), 1);
        let to = |dst: [u8; 4]| {
            let mut e = lb_common::TraceEvent::default();
            e.flow.family = lb_common::FAMILY_V4;
            e.flow.dst[..4].copy_from_slice(&dst);
            e
        };
        hub.publish(&to([192, 0, 2, 99]), 1);
        hub.publish(&to([192, 0, 2, 10]), 2);
        hub.publish(&to([192, 0, 2, 10]), 3);
        hub.publish(&to([192, 0, 2, 10]), 4);
        for at in [2, 3] {
            match read_line(&mut s).await {
                Response::Trace(r) => {
                    assert_eq!((r.dst, r.at_unix_ms), (Some(vip), at));
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(read_line(&mut s).await, Response::Done { .. }));
        clients_become(&hub, 0).await;

        // A client that goes away ends its subscription, even with no event flowing.
        let request = Request::Trace {
            vip: None,
            count: None,
        };
        let frame = encode(&Envelope {
            version: request.version(),
            request,
        });
        let mut s = BufReader::new(UnixStream::connect(&path).await.expect("connect"));
        s.get_mut().write_all(&frame).await.expect("write");
        read_line(&mut s).await;
        assert_eq!(hub.clients(), 1);
        drop(s);
        clients_become(&hub, 0).await;
    }
}
