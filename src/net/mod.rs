//! The gRPC edge between peers: the `Peer` service every node serves, and the session every
//! node runs to each configured peer (subscribe to its index, hand batches to the folder
//! engines, fetch large contents, reconnect with backoff). Generated types stop here: records
//! are converted to and from the model at this boundary, and every path from a peer is
//! validated before anything else sees it.
//!
//! - `convert`: records to and from the wire, checked.
//! - `service`: the `Peer` service (subscriptions, fetches).
//! - `session`: the session to each peer, its backoff and its status.
//! - `tls`: TLS material and the channel to a peer.

use std::path::PathBuf;

mod convert;
mod service;
mod session;
mod tls;

pub use convert::{MAX_VERSION_ENTRIES, record_from_pb, record_to_pb};
pub use service::{PeerService, SubscriptionStream};
pub use session::{PeerSession, PeerStatus, PeerStatuses, Received, peer_sessions};
pub use tls::{channel, server_tls};

/// Largest gRPC message accepted (batches carry inline contents).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("peer {peer}: {message}")]
    Peer { peer: String, message: String },
    #[error("peer {peer}: folder {folder} is paused here: {reason}")]
    Paused {
        peer: String,
        folder: crate::model::FolderId,
        reason: String,
    },
    #[error("TLS material {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("peer {peer}: {source}")]
    Transport {
        peer: String,
        source: tonic::transport::Error,
    },
}
