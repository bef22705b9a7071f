//! The launcher's web app (reference §7.1). Filled in with the admin CLI's
//! listings; for now `/ready` and `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use nodepool_core::config::Config;
use nodepool_core::launcher::{LauncherStatus, Metrics};
use nodepool_core::store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct AppState {
    status: Arc<LauncherStatus>,
    metrics: Arc<Metrics>,
}

/// Binds the configured address and serves until `shutdown`.
pub async fn spawn(
    _store: Store,
    config: watch::Receiver<Arc<Config>>,
    status: Arc<LauncherStatus>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let web = config.borrow().webapp.clone();
    let addr = format!("{}:{}", web.listen_address, web.port);
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(|e| anyhow::anyhow!("web app cannot listen on {addr}: {e}"))?;
    tracing::info!(%addr, "web app listening");
    let app = axum::Router::new()
        .route("/ready", get(ready))
        .route("/metrics", get(prometheus))
        .with_state(AppState { status, metrics });
    tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "web app stopped");
        }
    });
    Ok(())
}

async fn ready(State(s): State<AppState>) -> impl IntoResponse {
    if s.status.is_ready() {
        (StatusCode::OK, "OK")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn prometheus(State(s): State<AppState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.prometheus(),
    )
}
