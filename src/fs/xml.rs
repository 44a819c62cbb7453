//! The validation gate: a `*.xml` artifact is shipped only when it is well-formed, so a
//! half-written or broken API definition is never deployed on the other nodes.

use quick_xml::events::Event;

/// True when `path` is subject to the gate.
pub fn is_gated(path: &str) -> bool {
    path.rsplit('/')
        .next()
        .and_then(|n| n.rsplit_once('.'))
        .is_some_and(|(_, ext)| ext.eq_ignore_ascii_case("xml"))
}

/// Checks well-formedness: parses to the end, end tags match start tags, exactly one root
/// element. Returns the problem when it is not.
pub fn check_well_formed(bytes: &[u8]) -> Result<(), String> {
    let mut reader = quick_xml::Reader::from_reader(bytes);
    reader.config_mut().check_end_names = true;
    let mut buf = Vec::new();
    let mut depth: usize = 0;
    let mut roots = 0;
    loop {
        match reader.read_event_into(&mut buf) {
            Ok(Event::Start(_)) => {
                if depth == 0 {
                    roots += 1;
                }
                depth += 1;
            }
            Ok(Event::End(_)) => depth = depth.saturating_sub(1),
            Ok(Event::Empty(_)) => {
                if depth == 0 {
                    roots += 1;
                }
            }
            Ok(Event::Text(t)) if depth == 0 => {
                if !t.iter().all(|b| b.is_ascii_whitespace()) {
                    return Err(format!(
                        "text outside the root element at byte {}",
                        reader.buffer_position()
                    ));
                }
            }
            Ok(Event::Eof) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("at byte {}: {e}", reader.error_position())),
        }
        buf.clear();
    }
    match (depth, roots) {
        (0, 1) => Ok(()),
        (0, 0) => Err("no root element".into()),
        (0, _) => Err("more than one root element".into()),
        (d, _) => Err(format!("document ends with {d} unclosed element(s)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_applies_to_xml_only() {
        assert!(is_gated("default/api/a.xml"));
        assert!(is_gated("A.XML"));
        assert!(!is_gated("plans/a.siddhiql"));
        assert!(!is_gated("xml"));
    }

    #[test]
    fn well_formed_documents_pass() {
        let api = br#"<?xml version="1.0" encoding="UTF-8"?>
<api xmlns="http://ws.apache.org/ns/synapse" name="PizzaShackAPI" context="/pizzashack/1.0.0">
  <resource methods="GET" uri-template="/menu"><inSequence><send/></inSequence></resource>
</api>
"#;
        assert_eq!(check_well_formed(api), Ok(()));
        assert_eq!(check_well_formed(b"<a/>"), Ok(()));
    }

    #[test]
    fn broken_or_truncated_documents_fail() {
        for doc in [
            &b""[..],
            b"<api><resource>",
            b"<api></resource>",
            b"<api/><api/>",
            b"<api name=\"x></api>",
            b"garbage",
            b"<api><a></a>",
        ] {
            assert!(
                check_well_formed(doc).is_err(),
                "{:?}",
                String::from_utf8_lossy(doc)
            );
        }
    }
}
