//! The committed event catalog (`libs/events/asyncapi.json`) is exactly what the payload types
//! generate, so the document product teams read cannot drift from what services publish. After
//! changing a payload, `cargo xtask catalog` rewrites it (and the diff shows the contract change).

use serde_json::Value;

#[test]
fn the_committed_catalog_matches_the_payload_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/asyncapi.json");
    let committed: Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("libs/events/asyncapi.json"))
            .expect("the catalog is JSON");
    assert!(
        committed == events::catalog::asyncapi(),
        "libs/events/asyncapi.json differs from the payload types: run `cargo xtask catalog` and review the diff"
    );
}

#[test]
fn every_reference_in_the_catalog_resolves() {
    let catalog = events::catalog::asyncapi();
    let mut refs = Vec::new();
    collect_refs(&catalog, &mut refs);
    assert!(refs.len() > 20, "too few references: {refs:?}");
    for reference in refs {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("not a local reference: {reference}"));
        assert!(
            catalog.pointer(pointer).is_some(),
            "{reference} points nowhere"
        );
    }
}

#[test]
fn every_topic_has_a_channel_and_a_dead_letter_channel() {
    let catalog = events::catalog::asyncapi();
    let addresses: Vec<&str> = catalog["channels"]
        .as_object()
        .unwrap()
        .values()
        .map(|channel| channel["address"].as_str().unwrap())
        .collect();
    for topic in events::catalog::TOPICS {
        assert!(addresses.contains(&topic.name), "{}", topic.name);
        assert!(
            addresses.contains(&events::catalog::dead_letter_topic(topic.name).as_str()),
            "{}.dlq",
            topic.name
        );
    }
}

fn collect_refs(value: &Value, refs: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) => refs.push(reference.clone()),
                    _ => collect_refs(value, refs),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, refs)),
        _ => {}
    }
}
