//! The agent's servers: gRPC on the listen address (peers, health, and on a DB-backed node the
//! artifact hub and saver), and the admin service on `state_dir/admin.sock`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::Server;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::{HealthReporter, HealthService};
use tracing::error;

use super::{DaemonError, Tasks};
use crate::admin::AdminService;
use crate::artifacts::hub::HubService;
use crate::config::Config;
use crate::engine::FolderHandle;
use crate::metrics::{Metrics, MetricsServer, Sources};
use crate::model::{FolderId, NodeId};
use crate::net::{self, PeerService};

/// Binds the gRPC listen address; returns the listener and the address it got.
pub(super) async fn bind(
    listen: SocketAddr,
) -> Result<(tokio::net::TcpListener, SocketAddr), DaemonError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| DaemonError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    let bound = listener
        .local_addr()
        .map_err(|source| DaemonError::Listen {
            addr: listen.to_string(),
            source,
        })?;
    Ok((listener, bound))
}

/// The gRPC server before it serves: health and the peer service (with TLS when configured);
/// the retriever may add the artifact hub to it.
pub(super) struct GrpcServer {
    router: Router,
}

impl GrpcServer {
    pub(super) async fn build(
        config: &Config,
        node: NodeId,
        folders: &Arc<HashMap<FolderId, FolderHandle>>,
        health: &HealthReporter,
        metrics: &Metrics,
        tasks: &Tasks,
    ) -> Result<Self, DaemonError> {
        let peer_service = PeerService::new(
            node,
            config.node.clone(),
            folders.clone(),
            config.inline_max_bytes,
            tasks.cancel.clone(),
        )
        .with_metrics(metrics.clone());
        let mut builder = Server::builder()
            .tcp_nodelay(true)
            .http2_keepalive_interval(Some(Duration::from_secs(10)));
        if let Some(tls) = &config.tls {
            builder = builder
                .tls_config(net::server_tls(tls).await?)
                .map_err(|e| net::NetError::Peer {
                    peer: "(server)".into(),
                    message: e.to_string(),
                })?;
        }
        let health_service = HealthServer::new(HealthService::from_health_reporter(health.clone()));
        let router = builder
            .add_service(health_service)
            .add_service(peer_service.into_server());
        Ok(Self { router })
    }

    /// Serves the artifact hub and saver too.
    pub(super) fn with_hub(self, hub: HubService) -> Self {
        Self {
            router: self
                .router
                .add_service(hub.clone().hub_server())
                .add_service(hub.saver_server()),
        }
    }

    /// Serves on `listener` until the agent is cancelled; a failure cancels the agent.
    pub(super) fn spawn(self, listener: tokio::net::TcpListener, tasks: &Tasks) {
        let grpc_cancel = tasks.cancel.clone();
        let router = self.router;
        tasks.tracker.spawn(async move {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, grpc_cancel.cancelled())
                .await
            {
                error!(error = %e, "gRPC server failed");
                grpc_cancel.cancel();
            }
        });
    }
}

/// Binds the admin socket (mode 0600, replacing a stale one) and serves `admin` on it until
/// the agent is cancelled.
pub(super) fn start_admin(
    admin: AdminService,
    socket: &Path,
    tasks: &Tasks,
) -> Result<(), DaemonError> {
    let _ = std::fs::remove_file(socket);
    let uds = tokio::net::UnixListener::bind(socket).map_err(|source| DaemonError::Admin {
        path: socket.to_owned(),
        source,
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        DaemonError::Admin {
            path: socket.to_owned(),
            source,
        }
    })?;
    let admin_cancel = tasks.cancel.clone();
    tasks.tracker.spawn(async move {
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(uds);
        if let Err(e) = Server::builder()
            .add_service(admin.into_server())
            .serve_with_incoming_shutdown(incoming, admin_cancel.cancelled())
            .await
        {
            error!(error = %e, "admin server failed");
        }
    });
    Ok(())
}

/// With `[metrics]`: binds the endpoint and serves every series (see [`crate::metrics`])
/// until the agent is cancelled. Returns the address it got.
pub(super) async fn start_metrics(
    config: &Config,
    metrics: &Metrics,
    sources: Sources,
    tasks: &Tasks,
) -> Result<Option<SocketAddr>, DaemonError> {
    let Some(m) = &config.metrics else {
        return Ok(None);
    };
    let server = MetricsServer::bind(m.listen).await?;
    let local = server.local_addr();
    let retriever = sources
        .retriever
        .clone()
        .map(|h| (h, sources.retriever_events.clone()));
    let registry = metrics.registry(sources);
    tasks
        .tracker
        .spawn(server.run(registry, retriever, tasks.cancel.clone()));
    Ok(Some(local))
}
