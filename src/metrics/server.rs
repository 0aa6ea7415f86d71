//! The HTTP endpoint: `/metrics` (Prometheus text), `/healthz` (the process
//! answers), `/readyz` (200 once every assigned partition is restored and
//! consuming, 503 with the reason before).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::{Metrics, Readiness};

/// A bound listener, ready to serve.
pub struct Endpoint {
    listener: tokio::net::TcpListener,
    pub addr: SocketAddr,
}

/// Binds `addr` (port 0: a free port; [`Endpoint::addr`] says which).
pub async fn bind(addr: SocketAddr) -> std::io::Result<Endpoint> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    Ok(Endpoint { listener, addr })
}

impl Endpoint {
    /// Serves until the runtime shuts down.
    pub async fn serve(self, metrics: Arc<Metrics>) {
        let app = Router::new()
            .route("/metrics", get(metrics_text))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(metrics);
        if let Err(e) = axum::serve(self.listener, app).await {
            tracing::warn!("metrics endpoint stopped: {e}");
        }
    }
}

async fn metrics_text(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        metrics.render(),
    )
}

async fn readyz(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    match metrics.health.readiness() {
        Readiness::Ready { partitions } => (
            StatusCode::OK,
            format!("ready: consuming partitions {partitions:?}\n"),
        ),
        Readiness::NotReady(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}
