//! docs/configuration.md and the schema name the same keys: a key added to
//! the code without a row, or a row left behind by a removed key, fails.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::{Config, TlsConfig};

/// Every dotted key the schema has: what a fully set configuration
/// serialises to, plus the S3 secret, which is never written out.
fn schema_keys() -> BTreeSet<String> {
    let path = || Some(PathBuf::from("x"));
    // No `..Default::default()`: a new TLS key will not compile until it
    // is listed here (an unset option does not serialise).
    let tls = TlsConfig {
        server_cert: path(),
        server_key: path(),
        client_ca: path(),
        ca: path(),
        client_cert: path(),
        client_key: path(),
        server_name: Some("x".into()),
    };
    let cfg = Config {
        tls,
        ..Config::default()
    };
    let value = toml::Value::try_from(&cfg).expect("the configuration serialises");
    let mut keys = BTreeSet::new();
    flatten("", &value, &mut keys);
    keys.insert("checkpoint.s3.secret_access_key".into());
    keys
}

fn flatten(prefix: &str, value: &toml::Value, keys: &mut BTreeSet<String>) {
    match value {
        toml::Value::Table(table) => {
            for (name, inner) in table {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                flatten(&key, inner, keys);
            }
        }
        _ => {
            keys.insert(prefix.to_string());
        }
    }
}

/// The keys in the first column of the document's table. A cell may name
/// several (`model.ngf` / `model.ndf`); a name without a section takes the
/// section of the cell's first key (`checkpoint.s3.access_key_id` /
/// `secret_access_key`).
fn documented_keys(doc: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    for line in doc.lines().filter(|l| l.starts_with("| `")) {
        let cell = line.split('|').nth(1).expect("a table row has cells");
        let mut section = String::new();
        for name in cell.split('`').skip(1).step_by(2) {
            match name.rsplit_once('.') {
                Some((head, _)) => {
                    section = head.to_string();
                    keys.insert(name.to_string());
                }
                None => {
                    assert!(!section.is_empty(), "`{name}` in `{cell}` has no section");
                    keys.insert(format!("{section}.{name}"));
                }
            }
        }
    }
    keys
}

#[test]
fn every_key_is_documented_and_every_documented_key_exists() {
    let doc = include_str!("../../../docs/configuration.md");
    let documented = documented_keys(doc);
    let schema = schema_keys();
    let missing: Vec<_> = schema.difference(&documented).collect();
    let stale: Vec<_> = documented.difference(&schema).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/configuration.md is out of step with the schema: \
         keys without a row {missing:?}, rows without a key {stale:?}"
    );
}

#[test]
fn a_row_with_several_keys_names_each() {
    let keys = documented_keys("| `a.b.c` / `d` | 1 |\n| `e.f`, `e.g` | 2 |\n| text |\n");
    let expected: BTreeSet<String> = ["a.b.c", "a.b.d", "e.f", "e.g"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(keys, expected);
}
