//! `ARTIFACT` (WSO2's `GatewayAPIDTO` JSON) -> the Synapse files it deploys, and Synapse's
//! file naming. Pure: bytes in, files out.
use std::collections::BTreeMap;

use serde::Deserialize;

use super::{
    API_DIR, ENDPOINTS_DIR, LOCAL_ENTRIES_DIR, SEQUENCES_DIR, SYNAPSE_NAME_REPLACED, shown,
};
use crate::artifacts::db::MAX_BUNDLE_BYTES;
use crate::artifacts::{Bundle, BundleFile};
use crate::model::RelPath;

/// Mode recorded for rendered files (the folder's engine writes them with the folder's mode).
const FILE_MODE: u32 = 0o640;
/// Longest file name Linux file systems take.
const MAX_FILE_NAME_BYTES: usize = 255;
/// endpoint credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    #[error("ARTIFACT is {size} bytes, more than the {max} allowed")]
    TooLarge { size: u64, max: u64 },
    #[error("ARTIFACT is not GatewayAPIDTO JSON: {0}")]
    Json(String),
    #[error(
        "ARTIFACT has nothing to deploy: no apiDefinition, sequenceToBeAdd, endpointEntriesToBeAdd or localEntriesToBeAdd"
    )]
    Empty,
    #[error("{field} entry {name:?}: {problem}")]
    Name {
        field: &'static str,
        name: String,
        #[source]
        problem: NameError,
    },
    #[error("{path}: not well-formed XML ({problem})")]
    NotXml { path: String, problem: String },
    #[error("{path} would be written by two entries")]
    Duplicate { path: String },
}

/// Why an entry's name cannot become a deployed file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("the name is empty")]
    Empty,
    #[error("the name is not a file name")]
    NotAFileName,
    #[error("the name has control characters")]
    ControlCharacters,
    #[error("the file name would be longer than {max} bytes")]
    TooLong { max: usize },
    #[error(transparent)]
    Path(#[from] crate::model::PathError),
    #[error("the name would leave its directory")]
    LeavesDirectory,
    #[error("the file name matches an ignore pattern (editor or temp file)")]
    Ignored,
    #[error("has no content")]
    NoContent,
    #[error(transparent)]
    ApiName(#[from] ApiNameError),
}

/// Why the `name` of an API definition's root `<api>` element cannot be read. quick-xml's
/// errors are kept as text: they are neither `Clone` nor `Eq`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiNameError {
    #[error("the root element is <{0}>, not <api>")]
    NotApi(String),
    #[error("bad attribute: {0}")]
    Attribute(String),
    #[error("bad name attribute: {0}")]
    NameAttribute(String),
    #[error("<api> has no name attribute")]
    NoName,
    #[error("no root element")]
    NoRoot,
    #[error("at byte {position}: {problem}")]
    Xml { position: u64, problem: String },
}

/// The part of WSO2's `GatewayAPIDTO` that becomes files, and `override`. Everything else in
/// the JSON (client certificates, endpoint credentials, the `*ToBeRemove` lists, ...) is not
/// even read.
#[derive(Debug, Deserialize)]
struct GatewayApiDto {
    /// `false` (Java's default when absent): existing sequences, endpoints and local entries
    /// are not replaced.
    #[serde(rename = "override", default)]
    override_existing: bool,
    #[serde(rename = "tenantDomain", default)]
    tenant_domain: Option<String>,
    #[serde(rename = "apiDefinition", default)]
    api_definition: Option<String>,
    #[serde(rename = "defaultAPIDefinition", default)]
    default_api_definition: Option<String>,
    #[serde(rename = "sequenceToBeAdd", default)]
    sequences: Option<Vec<GatewayContentDto>>,
    #[serde(rename = "endpointEntriesToBeAdd", default)]
    endpoints: Option<Vec<GatewayContentDto>>,
    #[serde(rename = "localEntriesToBeAdd", default)]
    local_entries: Option<Vec<GatewayContentDto>>,
    /// Only the aliases are read: the passwords are skipped by the parser, never held.
    #[serde(rename = "credentialsToBeAdd", default)]
    credentials: Option<Vec<Alias>>,
    /// Only the names (aliases) are read.
    #[serde(rename = "clientCertificatesToBeAdd", default)]
    client_certificates: Option<Vec<Named>>,
}

/// A `CredentialDto`'s alias (its `password` is not a field here, so it is skipped).
#[derive(Debug, Deserialize)]
struct Alias {
    #[serde(default)]
    alias: Option<String>,
}

/// A `GatewayContentDTO`'s name only.
#[derive(Debug, Deserialize)]
struct Named {
    #[serde(default)]
    name: Option<String>,
}

/// Most aliases named in one warning.
const MAX_ALIASES_SHOWN: usize = 10;

/// "a", "b", "c" and 3 more: at most [`MAX_ALIASES_SHOWN`] names, each cut to a few dozen
/// printable characters (they come from the database).
fn alias_list(names: impl Iterator<Item = Option<String>>) -> String {
    let names: Vec<String> = names
        .map(|n| {
            let n: String = n
                .unwrap_or_default()
                .chars()
                .filter(|c| !c.is_control())
                .collect();
            format!("{:?}", shown(&n))
        })
        .collect();
    let mut text = names
        .iter()
        .take(MAX_ALIASES_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_ALIASES_SHOWN {
        text.push_str(&format!(" and {} more", names.len() - MAX_ALIASES_SHOWN));
    }
    text
}

/// WSO2's `GatewayContentDTO`: a named Synapse configuration.
#[derive(Debug, Deserialize)]
struct GatewayContentDto {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    content: Option<String>,
}

/// Synapse's file name for an artifact called `name`: `\\/?*|:<> ` become `_`, then `.xml`.
/// Refuses a name that is empty, `.` or `..`, has control characters, is too long for a file
/// name, or that the sync engine would never write (editor and temp file patterns).
pub fn synapse_file_name(name: &str) -> Result<String, NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name == "." || name == ".." {
        return Err(NameError::NotAFileName);
    }
    if name.chars().any(char::is_control) {
        return Err(NameError::ControlCharacters);
    }
    let base: String = name
        .chars()
        .map(|c| {
            if SYNAPSE_NAME_REPLACED.contains(&c) {
                '_'
            } else {
                c
            }
        })
        .collect();
    let file = format!("{base}.xml");
    if file.len() > MAX_FILE_NAME_BYTES {
        return Err(NameError::TooLong {
            max: MAX_FILE_NAME_BYTES,
        });
    }
    Ok(file)
}

/// The `name` attribute of the root `<api>` element of a Synapse API definition.
fn api_name(definition: &str) -> Result<String, ApiNameError> {
    use quick_xml::events::Event as Xml;
    let mut reader = quick_xml::Reader::from_str(definition);
    loop {
        match reader.read_event() {
            Ok(Xml::Start(e)) | Ok(Xml::Empty(e)) => {
                if e.local_name().as_ref() != b"api" {
                    return Err(ApiNameError::NotApi(shown(&String::from_utf8_lossy(
                        e.local_name().as_ref(),
                    ))));
                }
                for attr in e.attributes() {
                    let attr = attr.map_err(|e| ApiNameError::Attribute(e.to_string()))?;
                    if attr.key.local_name().as_ref() == b"name" {
                        return attr
                            .unescape_value()
                            .map(|v| v.into_owned())
                            .map_err(|e| ApiNameError::NameAttribute(e.to_string()));
                    }
                }
                return Err(ApiNameError::NoName);
            }
            Ok(Xml::Eof) => return Err(ApiNameError::NoRoot),
            Ok(_) => {}
            Err(e) => {
                return Err(ApiNameError::Xml {
                    position: reader.error_position(),
                    problem: e.to_string(),
                });
            }
        }
    }
}

/// The local entry WSO2's gateway never replaces once deployed (`APIConstants.GA_CONF_KEY`),
/// which every HTTP API's `GatewayAPIDTO` carries.
pub const GA_CONFIG_KEY: &str = "ga-config-key";

/// One `ARTIFACT` rendered: its files, and the paths among them that never replace a file
/// another artifact put there (see [`crate::artifacts::owners`]): the `ga-config-key` local
/// entry always, and every sequence, endpoint and local entry when `override` is `false`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub bundle: Bundle,
    pub keep: Vec<String>,
    /// What the operator must provision by hand: endpoint credentials (WSO2's secure vault)
    /// and client certificates (its trust store), which artisync never installs.
    pub warnings: Vec<String>,
    /// `tenantDomain`, when the DTO names one.
    pub tenant: Option<String>,
}

/// [`render_dto`]'s files only.
pub fn render(artifact: &[u8]) -> Result<Bundle, RenderError> {
    render_dto(artifact).map(|r| r.bundle)
}

/// Renders one `ARTIFACT` (WSO2's `GatewayAPIDTO` JSON) into the files Synapse deploys, paths
/// relative to the `synapse-configs` folder, sorted:
///
/// - `apiDefinition` and `defaultAPIDefinition` go to `default/api/<name>.xml`, named by the
///   `name` attribute of their `<api>` element. Both are optional: WSO2 saves a WebSocket API
///   with sequences and no `apiDefinition`, and its gateway deploys just the sequences;
///   so does this (an artifact with no file at all fails);
/// - each entry of `sequenceToBeAdd`, `endpointEntriesToBeAdd` and `localEntriesToBeAdd` goes
///   to `default/{sequences,endpoints,local-entries}/<name>.xml`.
///
/// Every file must be well-formed XML: Synapse's hot deployer would fail on a broken one, so
/// the whole artifact fails instead and whatever was deployed before stays.
pub fn render_dto(artifact: &[u8]) -> Result<Rendered, RenderError> {
    // Long but flat: the per-file checks live in the `add` closure, and the rest is the list
    // of entry kinds in `GatewayAPIDTO`.
    let size = artifact.len() as u64;
    if size > MAX_BUNDLE_BYTES {
        return Err(RenderError::TooLarge {
            size,
            max: MAX_BUNDLE_BYTES,
        });
    }
    let dto: GatewayApiDto = serde_json::from_slice(artifact).map_err(|e| {
        // serde_json's own message can quote a value: only the kind and the position.
        let kind = match e.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "a field has the wrong type",
            serde_json::error::Category::Eof => "truncated",
        };
        RenderError::Json(format!(
            "{kind} at line {}, column {}",
            e.line(),
            e.column()
        ))
    })?;
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut keep: Vec<String> = Vec::new();
    let mut add = |field: &'static str, dir: &str, name: &str, content: String| {
        let bad_name = |problem: NameError| RenderError::Name {
            field,
            name: shown(name),
            problem,
        };
        let file = synapse_file_name(name).map_err(bad_name)?;
        let path = format!("{dir}/{file}");
        let rel = RelPath::new(&path).map_err(|e| bad_name(e.into()))?;
        if rel.as_str() != path || rel.file_name() != file {
            return Err(bad_name(NameError::LeavesDirectory));
        }
        if IGNORED.is_ignored(&rel) {
            return Err(bad_name(NameError::Ignored));
        }
        crate::fs::xml::check_well_formed(content.as_bytes()).map_err(|problem| {
            RenderError::NotXml {
                path: path.clone(),
                problem,
            }
        })?;
        if files.insert(path.clone(), content.into_bytes()).is_some() {
            return Err(RenderError::Duplicate { path });
        }
        Ok(())
    };
    let definitions = [
        ("apiDefinition", dto.api_definition),
        ("defaultAPIDefinition", dto.default_api_definition),
    ]
    .into_iter()
    .filter_map(|(field, d)| d.filter(|d| !d.trim().is_empty()).map(|d| (field, d)));
    for (field, xml) in definitions {
        crate::fs::xml::check_well_formed(xml.as_bytes()).map_err(|problem| {
            RenderError::NotXml {
                path: format!("{field} ({API_DIR})"),
                problem,
            }
        })?;
        let name = api_name(&xml).map_err(|problem| RenderError::Name {
            field,
            name: String::new(),
            problem: problem.into(),
        })?;
        add(field, API_DIR, &name, xml)?;
    }
    for (field, dir, entries) in [
        ("sequenceToBeAdd", SEQUENCES_DIR, dto.sequences),
        ("endpointEntriesToBeAdd", ENDPOINTS_DIR, dto.endpoints),
        ("localEntriesToBeAdd", LOCAL_ENTRIES_DIR, dto.local_entries),
    ] {
        for entry in entries.unwrap_or_default() {
            let name = entry.name.unwrap_or_default();
            let content = entry.content.ok_or_else(|| RenderError::Name {
                field,
                name: shown(&name),
                problem: NameError::NoContent,
            })?;
            add(field, dir, &name, content)?;
            if !dto.override_existing || (dir == LOCAL_ENTRIES_DIR && name == GA_CONFIG_KEY) {
                keep.push(format!(
                    "{dir}/{}",
                    synapse_file_name(&name).unwrap_or_default()
                ));
            }
        }
    }
    let files = files
        .into_iter()
        .map(|(path, data)| {
            RelPath::new(&path)
                .map(|path| BundleFile {
                    path,
                    mode: FILE_MODE,
                    data,
                })
                .map_err(|e| RenderError::Name {
                    field: "path",
                    name: shown(&path),
                    problem: e.into(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if files.is_empty() {
        return Err(RenderError::Empty);
    }
    keep.sort();
    keep.dedup();
    let mut warnings = Vec::new();
    if let Some(c) = dto.credentials.filter(|c| !c.is_empty()) {
        warnings.push(format!(
            "endpoint credentials not installed (aliases {}): add them to each gateway's secure vault as WSO2 would, or the endpoints fail authentication",
            alias_list(c.into_iter().map(|a| a.alias))
        ));
    }
    if let Some(c) = dto.client_certificates.filter(|c| !c.is_empty()) {
        warnings.push(format!(
            "client certificates not installed (aliases {}): import them into each gateway's client trust store, or mutual-TLS clients are refused",
            alias_list(c.into_iter().map(|n| n.name))
        ));
    }
    Ok(Rendered {
        bundle: Bundle { files },
        keep,
        warnings,
        tenant: dto.tenant_domain.filter(|t| !t.trim().is_empty()),
    })
}

static IGNORED: std::sync::LazyLock<crate::fs::ignore::Ignore> = std::sync::LazyLock::new(|| {
    crate::fs::ignore::Ignore::new(&[])
        .unwrap_or_else(|e| unreachable!("the built-in ignore patterns are valid globs: {e}"))
});

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;

    const API: &str = "6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c";
    const PIZZA: &str = "admin--PizzaShackAPI:v1.0.0";

    fn paths(b: &Bundle) -> Vec<&str> {
        b.files.iter().map(|f| f.path.as_str()).collect()
    }

    fn dto(value: serde_json::Value) -> Vec<u8> {
        value.to_string().into_bytes()
    }

    fn render_err(value: serde_json::Value) -> RenderError {
        match render(&dto(value.clone())) {
            Ok(b) => panic!("{value} should not render, got {:?}", paths(&b)),
            Err(e) => e,
        }
    }

    #[test]
    fn renders_every_entry_into_its_synapse_directory_and_file() {
        let b = render(&gateway_api_json(API, PIZZA, "t1")).expect("renders");
        let got: Vec<(String, String)> = b
            .files
            .iter()
            .map(|f| {
                (
                    f.path.to_string(),
                    String::from_utf8(f.data.clone()).expect("utf-8"),
                )
            })
            .collect();
        assert_eq!(got, rendered_files(API, PIZZA, "t1"));
        assert_eq!(
            paths(&b),
            vec![
                "default/api/admin--PizzaShackAPI_v1.0.0.xml",
                "default/endpoints/admin--PizzaShackAPI_v1.0.0_APIproductionEndpoint.xml",
                "default/local-entries/6f1c2a9e-3b1d-4c2e-9a8f-0d1e2f3a4b5c.xml",
                "default/local-entries/ga-config-key.xml",
                "default/sequences/admin--PizzaShackAPI_v1.0.0--In.xml",
            ]
        );
        assert!(
            String::from_utf8_lossy(&gateway_api_json(API, PIZZA, "t1")).contains("\\u003capi"),
            "the fixture is Gson-escaped, as WSO2 writes it"
        );
        assert!(b.files.iter().all(|f| f.mode == 0o640));
        let all: Vec<u8> = b.files.iter().flat_map(|f| f.data.clone()).collect();
        assert!(
            !String::from_utf8_lossy(&all).contains("s3cret-endpoint-password"),
            "credentials are not rendered"
        );
        // The same bytes render the same bundle (digest) every time.
        let again = render(&gateway_api_json(API, PIZZA, "t1")).expect("renders");
        assert_eq!(b.digest(), again.digest());
        assert_ne!(
            b.digest(),
            render(&gateway_api_json(API, PIZZA, "t2"))
                .expect("renders")
                .digest()
        );
    }

    #[test]
    fn ga_config_key_always_and_every_entry_without_override_never_replace_a_file() {
        let r = render_dto(&gateway_api_json(API, PIZZA, "t1")).expect("renders");
        assert_eq!(r.keep, vec!["default/local-entries/ga-config-key.xml"]);
        let entries = |over: Option<bool>| {
            let mut v = serde_json::json!({
                "apiDefinition": api_xml(PIZZA, "x"),
                "sequenceToBeAdd": [{"name": "s", "content": "<sequence/>"}],
                "endpointEntriesToBeAdd": [{"name": "e", "content": "<endpoint/>"}],
                "localEntriesToBeAdd": [{"name": "l", "content": "<localEntry/>"}],
            });
            if let Some(o) = over {
                v["override"] = serde_json::json!(o);
            }
            render_dto(&dto(v)).expect("renders").keep
        };
        let all = vec![
            "default/endpoints/e.xml",
            "default/local-entries/l.xml",
            "default/sequences/s.xml",
        ];
        assert_eq!(
            entries(Some(false)),
            all,
            "the API definition always replaces"
        );
        assert_eq!(entries(None), all, "absent is Java's false");
        assert!(entries(Some(true)).is_empty());
    }

    #[test]
    fn credentials_and_client_certificates_become_warnings_without_their_secrets() {
        let r = render_dto(&gateway_api_json(API, PIZZA, "t1")).expect("renders");
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        assert!(
            r.warnings[0].contains("secure vault")
                && r.warnings[0].contains("PizzaShackAPI--v1.0.0"),
            "{:?}",
            r.warnings
        );
        assert!(!format!("{:?}", r.warnings).contains("s3cret"));
        // Hostile aliases: control characters dropped, each cut short, the list bounded.
        let many: Vec<serde_json::Value> = (0..25)
            .map(|i| serde_json::json!({"name": format!("cert{i}\u{1b}[31m{}", "x".repeat(500)), "content": "PEM"}))
            .collect();
        let r = render_dto(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "clientCertificatesToBeAdd": many,
            "credentialsToBeAdd": [],
        })))
        .expect("renders");
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
        let w = &r.warnings[0];
        assert!(
            w.contains("trust store") && w.contains("and 15 more"),
            "{w}"
        );
        assert!(!w.contains('\u{1b}') && w.len() < 2000, "{w}");
        assert!(!w.contains("PEM"));
        // A list of the wrong shape is a bad artifact, not a panic.
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "credentialsToBeAdd": "s3cret",
        }));
        assert!(matches!(e, RenderError::Json(_)), "{e}");
    }

    #[test]
    fn the_default_version_definition_is_rendered_beside_the_api() {
        let b = render(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "defaultAPIDefinition": "<api xmlns=\"http://ws.apache.org/ns/synapse\" name=\"admin--PizzaShackAPI\" context=\"/pizzashack\"/>",
        })))
        .expect("renders");
        assert_eq!(
            paths(&b),
            vec![
                "default/api/admin--PizzaShackAPI.xml",
                "default/api/admin--PizzaShackAPI_v1.0.0.xml"
            ]
        );
    }

    #[test]
    fn synapse_names_replace_exactly_the_contract_characters() {
        assert_eq!(
            synapse_file_name("admin--PizzaShackAPI:v1.0.0").as_deref(),
            Ok("admin--PizzaShackAPI_v1.0.0.xml")
        );
        assert_eq!(
            synapse_file_name("a/b?c*d|e:f<g>h i").as_deref(),
            Ok("a_b_c_d_e_f_g_h_i.xml")
        );
        assert_eq!(
            synapse_file_name("keep-these_.@#&%+=,;'\"()[]{}é").as_deref(),
            Ok("keep-these_.@#&%+=,;'\"()[]{}é.xml")
        );
        // The backslash is in WSO2's set too (issue 14): `a\b`, `a:b` and `a_b` are one file.
        for name in ["a\\b", "a:b", "a_b", "a b"] {
            assert_eq!(
                synapse_file_name(name).as_deref(),
                Ok("a_b.xml"),
                "{name:?}"
            );
        }
        assert_eq!(
            synapse_file_name("..\\..\\x").as_deref(),
            Ok(".._.._x.xml"),
            "backslashes never make a path either"
        );
        assert_eq!(
            synapse_file_name("../../etc/passwd").as_deref(),
            Ok(".._.._etc_passwd.xml"),
            "slashes are replaced, so the file stays in its directory"
        );
        for bad in ["", ".", "..", "a\nb", "nul\0", &"x".repeat(252)] {
            assert!(synapse_file_name(bad).is_err(), "{bad:?}");
        }
        assert!(synapse_file_name(&"x".repeat(251)).is_ok(), "255 bytes fit");
    }

    #[test]
    fn entry_names_that_cannot_be_files_fail_the_artifact() {
        for name in ["", ".", "..", ".#lock", "a\u{7}b"] {
            let e = render_err(serde_json::json!({
                "apiDefinition": api_xml(PIZZA, "x"),
                "sequenceToBeAdd": [{"name": name, "content": "<sequence/>"}],
            }));
            assert!(
                matches!(
                    &e,
                    RenderError::Name {
                        field: "sequenceToBeAdd",
                        ..
                    }
                ),
                "{name:?}: {e}"
            );
        }
        // A name made of path pieces lands inside its directory.
        let b = render(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "localEntriesToBeAdd": [{"name": "../../../etc/cron.d/x", "content": "<localEntry key=\"x\"/>"}],
        })))
        .expect("renders");
        assert!(
            paths(&b).contains(&"default/local-entries/.._.._.._etc_cron.d_x.xml"),
            "{:?}",
            paths(&b)
        );
        // An API whose <api name> is unusable.
        for definition in [
            "<api context=\"/x\"/>",
            "<api name=\"..\"/>",
            "<api name=\"\"/>",
            "<sequence name=\"x\"/>",
        ] {
            let e = render_err(serde_json::json!({ "apiDefinition": definition }));
            assert!(
                matches!(
                    &e,
                    RenderError::Name {
                        field: "apiDefinition",
                        ..
                    }
                ),
                "{definition}: {e}"
            );
        }
    }

    #[test]
    fn a_websocket_api_without_api_definition_deploys_its_sequences() {
        // As WSO2 3.2 saves a WebSocket API: sequences, no apiDefinition.
        let ws = "admin--ChatWS:v1.0.0";
        let b = render(&gson(&serde_json::json!({
            "name": "ChatWS",
            "version": "1.0.0",
            "apiId": API,
            "override": true,
            "sequenceToBeAdd": [
                {"name": format!("{ws}--WS_In"), "content": format!("<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{ws}--WS_In\"><send><endpoint><http uri-template=\"ws://chat.example:8080\"/></endpoint></send></sequence>")},
                {"name": format!("{ws}--WS_Out"), "content": format!("<sequence xmlns=\"http://ws.apache.org/ns/synapse\" name=\"{ws}--WS_Out\"><send/></sequence>")},
            ],
            "localEntriesToBeAdd": [],
        })))
        .expect("renders without apiDefinition");
        assert_eq!(
            paths(&b),
            vec![
                "default/sequences/admin--ChatWS_v1.0.0--WS_In.xml",
                "default/sequences/admin--ChatWS_v1.0.0--WS_Out.xml"
            ]
        );
    }

    #[test]
    fn every_entry_kind_is_optional_but_one_file_is_needed() {
        let b = render(&dto(
            serde_json::json!({ "apiDefinition": api_xml(PIZZA, "x") }),
        ))
        .expect("renders");
        assert_eq!(
            paths(&b),
            vec!["default/api/admin--PizzaShackAPI_v1.0.0.xml"]
        );
        let b = render(&dto(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "defaultAPIDefinition": null,
            "sequenceToBeAdd": null,
            "endpointEntriesToBeAdd": [],
        })))
        .expect("nulls and empty lists are nothing");
        assert_eq!(b.files.len(), 1);
        for nothing in [
            serde_json::json!({}),
            serde_json::json!({ "apiDefinition": null }),
            serde_json::json!({ "apiDefinition": "  " }),
            serde_json::json!({ "name": "PizzaShackAPI", "sequenceToBeAdd": [] }),
        ] {
            assert_eq!(render_err(nothing), RenderError::Empty);
        }
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "endpointEntriesToBeAdd": [{"name": "ep"}],
        }));
        assert!(e.to_string().contains("has no content"), "{e}");
    }

    #[test]
    fn bad_json_fails_without_quoting_the_artifact() {
        let secret = "s3cret-endpoint-password";
        let bad: Vec<Vec<u8>> = vec![
            b"not json".to_vec(),
            b"".to_vec(),
            b"{\"apiDefinition\": \"<api name=\\\"a\\\"/>\"".to_vec(),
            vec![0xff, 0xfe, b'{', b'}'],
            dto(
                serde_json::json!({ "apiDefinition": api_xml(PIZZA, "x"), "sequenceToBeAdd": secret }),
            ),
            dto(serde_json::json!({ "apiDefinition": [secret] })),
            dto(serde_json::json!([{ "apiDefinition": secret }])),
        ];
        for artifact in bad {
            let e = render(&artifact).expect_err("refused");
            assert!(matches!(e, RenderError::Json(_)), "{e}");
            let text = e.to_string();
            assert!(text.contains("line"), "{text}");
            assert!(
                !text.contains(secret),
                "the error quotes the artifact: {text}"
            );
        }
    }

    #[test]
    fn content_that_is_not_well_formed_xml_fails_the_whole_artifact() {
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "sequenceToBeAdd": [
                {"name": "good", "content": "<sequence name=\"good\"/>"},
                {"name": "broken", "content": "<sequence name=\"broken\"><log>"},
            ],
        }));
        assert!(
            matches!(&e, RenderError::NotXml { path, .. } if path == "default/sequences/broken.xml"),
            "{e}"
        );
        let e =
            render_err(serde_json::json!({ "apiDefinition": "<api name=\"a\"><resource></api>" }));
        assert!(matches!(e, RenderError::NotXml { .. }), "{e}");
    }

    #[test]
    fn two_entries_for_one_file_fail_the_artifact() {
        let e = render_err(serde_json::json!({
            "apiDefinition": api_xml(PIZZA, "x"),
            "sequenceToBeAdd": [
                {"name": "a:b", "content": "<sequence/>"},
                {"name": "a_b", "content": "<sequence/>"},
            ],
        }));
        assert_eq!(
            e,
            RenderError::Duplicate {
                path: "default/sequences/a_b.xml".into()
            }
        );
    }
}
