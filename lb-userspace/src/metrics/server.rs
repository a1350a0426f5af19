//! The `/metrics` endpoint (`[agent] metrics_listen`): a small HTTP/1 server (hyper) on
//! a thread and a runtime of its own, so a scrape neither waits for the agent's loop
//! (busy with a reload, say) nor takes time from it.
//!
//! A scrape reads only what others published: the agent's `View` and the flow
//! scanner's and VRRP speaker's snapshots (`ArcSwap` loads), the sync thread's status
//! (a short lock), and the data path's counters through a map descriptor of its own,
//! read on a blocking thread. Only `GET /metrics` is answered (404 otherwise); requests
//! are bounded in size, connections in number and time.

use std::{
    convert::Infallible, io, net::SocketAddr, sync::Arc, thread::JoinHandle, time::Duration,
};

use arc_swap::ArcSwap;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::CONTENT_TYPE,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use tokio::sync::{Semaphore, oneshot, watch};

use super::{CounterSource, View, gather, render};
use crate::{
    announce::kernel::Announced, dataplane::DataPlaneError, flows::FlowSnapshot,
    protocol::VrrpStatus, sync::SyncStatusSource,
};

/// Where a scrape reads from; every part is published by its owner, none is asked.
#[derive(Clone)]
pub struct Sources {
    pub view: Arc<ArcSwap<View>>,
    pub counters: Arc<dyn CounterSource>,
    pub flows: Arc<ArcSwap<FlowSnapshot>>,
    pub vrrp: Option<Arc<ArcSwap<VrrpStatus>>>,
    pub sync: Option<SyncStatusSource>,
    /// The routes the `[announce]` task keeps, as it last saw them in the kernel.
    pub announce: Option<watch::Receiver<Announced>>,
}

impl Sources {
    /// One exposition: the published state and the counters as they are now.
    pub fn scrape(&self) -> Result<String, DataPlaneError> {
        let mut sample = gather(
            &self.view.load(),
            &*self.counters,
            &self.flows.load(),
            self.vrrp.as_ref().map(|v| VrrpStatus::clone(&v.load())),
            self.sync.as_ref().map(|s| s.read()),
        )?;
        sample.announced = self.announce.as_ref().map(|a| {
            let a = a.borrow();
            let withdrawn = a.withdrawn.keys().map(|vip| (*vip, false));
            withdrawn
                .chain(a.routes.keys().map(|vip| (*vip, true)))
                .collect()
        });
        Ok(render(&sample))
    }
}

/// Bounds on what a client can make the server hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections served at once; more are closed at once.
    pub connections: usize,
    /// Time to send the request head.
    pub header_timeout: Duration,
    /// Time for the whole exchange.
    pub connection_timeout: Duration,
    /// Request head size (hyper's smallest buffer is 8 KiB): beyond it, 431.
    pub max_request_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections: 8,
            header_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(10),
            max_request_bytes: 8192,
        }
    }
}

/// What a request gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Metrics,
    NotFound,
}

pub fn route(method: &Method, path: &str) -> Route {
    if method == Method::GET && path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// The endpoint's socket, bound at start so a taken address stops the agent early.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// The running endpoint; dropping it stops it.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `listener` (from `bind`) on a thread of its own.
    pub fn spawn(
        listener: std::net::TcpListener,
        sources: Sources,
        limits: Limits,
    ) -> io::Result<Self> {
        let addr = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("lb-metrics".into())
            .spawn(move || {
                runtime.block_on(async move {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => serve(listener, sources, limits, stopped).await,
                        Err(e) => tracing::error!("metrics endpoint {addr}: {e}"),
                    }
                })
            })?;
        Ok(Self {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: tokio::net::TcpListener,
    sources: Sources,
    limits: Limits,
    mut stopped: oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut accept_errors = 0u64;
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of descriptors, say: logged the 1st, 2nd, 4th... time.
                    accept_errors += 1;
                    if accept_errors.is_power_of_two() {
                        tracing::warn!("metrics endpoint: accept failed ({accept_errors} times): {e}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Beyond the limit the connection is closed unanswered.
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let sources = sources.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = service_fn(move |req| answer(req, sources.clone()));
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(limits.max_request_bytes)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(limits.connection_timeout, connection).await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    sources: Sources,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if route(request.method(), request.uri().path()) == Route::NotFound {
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: only GET /metrics\n".into(),
        ));
    }
    // Map reads are syscalls: off the runtime's thread.
    let scraped = tokio::task::spawn_blocking(move || sources.scrape()).await;
    Ok(match scraped {
        Ok(Ok(body)) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(prometheus_text::CONTENT_TYPE),
            );
            response
        }
        Ok(Err(e)) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading the counters: {e}\n"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the scrape failed: {e}\n"),
        ),
    })
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        io::{Read, Write},
        net::TcpStream,
        time::Instant,
    };

    use lb_common::{Counter, counters::vip_slot};

    use super::*;
    use crate::metrics::ServiceView;

    struct Fixed(HashMap<u32, Counter>);

    impl CounterSource for Fixed {
        fn counter(&self, slot: u32) -> Result<Counter, DataPlaneError> {
            Ok(self.0.get(&slot).copied().unwrap_or_default())
        }
    }

    fn sources() -> Sources {
        let view = View {
            version: "9.9.9".into(),
            xdp_mode: "generic".into(),
            interface: "lo".into(),
            serving: true,
            services: vec![ServiceView {
                name: "web".into(),
                vip_num: Some(0),
                backends: Vec::new(),
            }],
        };
        let counters = Fixed(HashMap::from([(
            vip_slot(0),
            Counter {
                packets: 5,
                bytes: 300,
                new_flows: 1,
            },
        )]));
        Sources {
            view: Arc::new(ArcSwap::from_pointee(view)),
            counters: Arc::new(counters),
            flows: Arc::new(ArcSwap::from_pointee(FlowSnapshot::default())),
            vrrp: None,
            sync: None,
            announce: None,
        }
    }

    fn server(limits: Limits) -> MetricsServer {
        let listener = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        MetricsServer::spawn(listener, sources(), limits).unwrap()
    }

    /// Sends `request` as is and reads until the server closes.
    fn exchange(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        // The server may close before reading all of an oversized request.
        let _ = s.write_all(request);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    }

    #[test]
    fn routes() {
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        assert_eq!(route(&Method::GET, "/"), Route::NotFound);
        assert_eq!(route(&Method::GET, "/metrics/x"), Route::NotFound);
        assert_eq!(route(&Method::POST, "/metrics"), Route::NotFound);
        assert_eq!(route(&Method::HEAD, "/metrics"), Route::NotFound);
    }

    #[test]
    fn get_metrics_answers_with_the_exposition_and_nothing_else_does() {
        let s = server(Limits::default());
        let ok = exchange(s.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{ok}"
        );
        assert!(
            ok.contains("\nlb_service_packets_total{service=\"web\"} 5\n"),
            "{ok}"
        );
        assert!(ok.contains("lb_agent_info{version=\"9.9.9\""), "{ok}");
        for request in [
            &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        ] {
            let answer = exchange(s.local_addr(), request);
            assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        }
    }

    #[test]
    fn oversized_and_silent_requests_are_cut_off() {
        let s = server(Limits {
            header_timeout: Duration::from_millis(300),
            ..Limits::default()
        });
        let mut big = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Filler: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', 64 * 1024));
        big.extend(b"\r\n\r\n");
        let answer = exchange(s.local_addr(), &big);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "an oversized request head is refused: {answer:?}"
        );
        // A client that never finishes its head is closed after the header timeout.
        let started = Instant::now();
        let answer = exchange(s.local_addr(), b"GET /metr");
        let took = started.elapsed();
        println!("a silent client was closed after {took:?}");
        assert!(!answer.contains("200 OK"), "{answer}");
        assert!(took < Duration::from_secs(10), "closed after {took:?}");
        // And the server still answers.
        let ok = exchange(s.local_addr(), b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    }
}
