//! WSO2 API-M 3.2 compatibility (`[retriever] schema = "wso2-apim-3.2"`): the retriever reads
//! WSO2's own gateway artifact tables, read only, and renders every API into the files Synapse
//! deploys. WSO2's tables, as its 3.2 DDL creates them:
//!
//! - `AM_GW_PUBLISHED_API_DETAILS (API_ID, TENANT_DOMAIN, API_PROVIDER, API_NAME, API_VERSION)`
//! - `AM_GW_API_ARTIFACTS (API_ID, ARTIFACT, GATEWAY_INSTRUCTION, GATEWAY_LABEL, TIME_STAMP)`,
//!   one row per API and gateway label; `ARTIFACT` is WSO2's `GatewayAPIDTO` as JSON,
//!   `GATEWAY_INSTRUCTION` is `Publish` or `Remove`.
//!
//! The parts:
//! - [`render`] (pure, bytes in, files out): one `ARTIFACT` becomes `default/api/`,
//!   `default/sequences/`, `default/endpoints/` and `default/local-entries/` files, named as
//!   Synapse names them ([`synapse_file_name`]).
//! - [`select`] (pure): an API's rows, one per label, become what a node with some labels
//!   deploys: metadata, revision, digest and bundle, into its tenant's folder ([`Routes`]).
//! - [`ChangeLog`] (pure): WSO2 has no event table. Successive snapshots of every row's cheap
//!   version ([`Fingerprint`]) become the event log the retriever follows.
//! - [`Wso2Source`]: the retriever [`Source`](crate::artifacts::retriever::Source) over them, on SQLite, PostgreSQL or
//!   MySQL/MariaDB. It never writes: SQLite is opened read-only, server sessions are set to
//!   read-only transactions, and nothing is migrated.

mod changelog;
mod render;
mod select;
mod source;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use changelog::{ChangeLog, Fingerprint, Snapshot};
pub use render::{
    ApiNameError, GA_CONFIG_KEY, NameError, RenderError, Rendered, render, render_dto,
    synapse_file_name,
};
pub use select::{ArtifactRow, Routes, RowInstruction, SelectError, Selected, select, tenant_of};
pub use source::Wso2Source;

/// Where each kind of entry goes, below the API's folder (a `synapse-configs` root: the super
/// tenant's, or its tenant's).
pub const API_DIR: &str = "default/api";
pub const SEQUENCES_DIR: &str = "default/sequences";
pub const ENDPOINTS_DIR: &str = "default/endpoints";
pub const LOCAL_ENTRIES_DIR: &str = "default/local-entries";
/// Characters replaced with `_` in a file name: WSO2's `[\\/?*|:<> ]`
/// (`ServiceBusUtils.generateFileName`, as Synapse's `MultiXMLConfigurationSerializer`).
/// Two names that differ only there (`a:b`, `a_b`) map to one file: within one artifact that
/// fails it; across artifacts the ownership rules decide (see [`crate::artifacts::owners`]).
pub const SYNAPSE_NAME_REPLACED: &[char] = &['\\', '/', '?', '*', '|', ':', '<', '>', ' '];
/// Longest text taken from a database value into a message.
const MAX_SHOWN: usize = 80;

fn shown(s: &str) -> String {
    s.chars().take(MAX_SHOWN).collect()
}
