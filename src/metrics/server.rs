//! `GET /metrics`: the Prometheus text format (0.0.4) over plaintext HTTP/1.1, encoded by
//! prometheus-client. Every other request gets 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::collect::EventClock;
use crate::artifacts::retriever::RetrieverHandle;

/// Scrapes served at once; a connection beyond them is closed at once.
const MAX_CONNECTIONS: usize = 16;
/// A client must send its request head within this time.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the retriever's event cursor is looked at (see [`EventClock`]).
const EVENT_SAMPLE_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics endpoint: cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The metrics endpoint, bound and not yet serving.
pub struct MetricsServer {
    listener: TcpListener,
    local: SocketAddr,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self, MetricsError> {
        let bind = |source| MetricsError::Bind { addr, source };
        let listener = TcpListener::bind(addr).await.map_err(bind)?;
        let local = listener.local_addr().map_err(bind)?;
        Ok(Self { listener, local })
    }

    /// The address it got (the port, when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serves `registry` until `cancel`. With a retriever, also samples its event cursor
    /// into `events` every second.
    pub async fn run(
        self,
        registry: Registry,
        retriever: Option<(RetrieverHandle, Arc<EventClock>)>,
        cancel: CancellationToken,
    ) {
        info!(listen = %self.local, "metrics endpoint listening");
        let registry = Arc::new(registry);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let mut sample = tokio::time::interval(EVENT_SAMPLE_EVERY);
        sample.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (stream, remote) = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = sample.tick(), if retriever.is_some() => {
                    if let Some((handle, events)) = &retriever {
                        events.note(handle.status().last_event_id, crate::now_ms());
                    }
                    continue;
                }
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(remote = %remote, "metrics endpoint: too many connections; closing one");
                continue;
            };
            let (registry, cancel) = (registry.clone(), cancel.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let mut builder = http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT);
                let service = service_fn(move |req| answer(req, registry.clone()));
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    r = conn => if let Err(e) = r {
                        debug!(remote = %remote, error = %e, "metrics endpoint: connection ended");
                    },
                    _ = cancel.cancelled() => {}
                }
            });
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// `GET /metrics`: the registry, encoded on a blocking thread (the process series read
/// `/proc`); anything else: 404.
async fn answer(
    req: Request<Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.method() != Method::GET || req.uri().path() != "/metrics" {
        return Ok(reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the metrics are at GET /metrics\n",
        ));
    }
    let encoded = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &registry).map(|()| text)
    })
    .await;
    Ok(match encoded {
        Ok(Ok(text)) => reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, text),
        Ok(Err(e)) => {
            warn!(error = %e, "metrics endpoint: encoding failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "encoding failed\n",
            )
        }
        Err(e) => {
            warn!(error = %e, "metrics endpoint: encoding task failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "encoding failed\n",
            )
        }
    })
}
