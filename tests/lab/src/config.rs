//! Checks that a reference config file (deploy/*.toml) names every field.

use std::collections::BTreeSet;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Dotted keys of a TOML table (`etcd_tls.ca_file`).
fn keys(table: &toml::Table, prefix: &str, out: &mut BTreeSet<String>) {
    for (k, v) in table {
        let key = format!("{prefix}{k}");
        match v {
            toml::Value::Table(t) => keys(t, &format!("{key}."), out),
            _ => {
                out.insert(key);
            }
        }
    }
}

/// Parses `text` as `T` (a config with `deny_unknown_fields`, so a misspelt
/// field fails here) and returns the fields `T` has that `text` does not
/// set: a field missing from the file takes its default and shows up when
/// the parsed config is written back.
pub fn fields_not_in<T: Serialize + DeserializeOwned>(text: &str) -> Result<Vec<String>, String> {
    let parsed: T = toml::from_str(text).map_err(|e| e.to_string())?;
    let written = toml::Table::try_from(&parsed).map_err(|e| e.to_string())?;
    let given: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let (mut all, mut set) = (BTreeSet::new(), BTreeSet::new());
    keys(&written, "", &mut all);
    keys(&given, "", &mut set);
    Ok(all.difference(&set).cloned().collect())
}
