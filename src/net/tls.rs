//! TLS material and the channel to a peer.

use std::path::Path;
use std::time::Duration;

use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig,
};

use super::NetError;
use crate::config::TlsConfig;

/// HTTP/2 receive window of one stream (the client's side of a subscription).
const STREAM_WINDOW_BYTES: u32 = 8 * 1024 * 1024;

// ---------------------------------------------------------------- TLS

async fn read_pem(path: &Path) -> Result<Vec<u8>, NetError> {
    tokio::fs::read(path)
        .await
        .map_err(|source| NetError::TlsFile {
            path: path.to_owned(),
            source,
        })
}

/// Server side of mutual TLS: this node's identity, and peers must present a cert from the CA.
pub async fn server_tls(tls: &TlsConfig) -> Result<ServerTlsConfig, NetError> {
    let cert = read_pem(&tls.cert).await?;
    let key = read_pem(&tls.key).await?;
    let ca = read_pem(&tls.ca).await?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca)))
}

async fn client_tls(tls: &TlsConfig, host: &str) -> Result<ClientTlsConfig, NetError> {
    let cert = read_pem(&tls.cert).await?;
    let key = read_pem(&tls.key).await?;
    let ca = read_pem(&tls.ca).await?;
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(host))
}

/// Builds a (lazy) channel to a peer address, with TLS for `https://`.
pub async fn channel(
    address: &str,
    tls: Option<&TlsConfig>,
    peer: &str,
) -> Result<Channel, NetError> {
    let transport = |source| NetError::Transport {
        peer: peer.to_owned(),
        source,
    };
    let mut endpoint = Endpoint::from_shared(address.to_owned())
        .map_err(transport)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        // Room for a whole index batch in flight, so the peer sends the next batch while
        // this node applies the last one.
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(2 * STREAM_WINDOW_BYTES))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    let (secure, host) =
        crate::config::parse_peer_address(address).map_err(|message| NetError::Peer {
            peer: peer.to_owned(),
            message,
        })?;
    if secure {
        let tls = tls.ok_or_else(|| NetError::Peer {
            peer: peer.to_owned(),
            message: "https address but no [tls] configured".into(),
        })?;
        endpoint = endpoint
            .tls_config(client_tls(tls, &host).await?)
            .map_err(transport)?;
    }
    Ok(endpoint.connect_lazy())
}
