//! A minimal HTTP/1 server (hyper) for the metrics and readiness endpoints: GET a path, get a
//! text body. Handlers run on the blocking pool, so a slow map read never stalls the runtime.

use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, header::CONTENT_TYPE, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A handler's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Reply {
    pub fn text(status: u16, body: impl Into<String>) -> Reply {
        Reply { status, content_type: "text/plain; charset=utf-8", body: body.into() }
    }
    pub fn not_found(path: &str) -> Reply {
        Reply::text(404, format!("no such endpoint: {path}\n"))
    }
}

/// Maps a request path to a reply.
pub type Handler = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} for {what}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Bind `addr` now (so a taken port fails the agent's start, not a later scrape).
pub async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr).await.map_err(|source| BindError { what, addr, source })
}

/// Serve `handler` on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("accepting a telemetry connection: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let handler = handler.clone();
                let path = req.uri().path().to_string();
                async move {
                    let reply = tokio::task::spawn_blocking(move || handler(&path))
                        .await
                        .unwrap_or_else(|e| Reply::text(500, format!("BUG: telemetry handler failed: {e}\n")));
                    let mut resp = Response::new(Full::new(Bytes::from(reply.body)));
                    *resp.status_mut() =
                        StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, hyper::header::HeaderValue::from_static(reply.content_type));
                    Ok::<_, Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}
