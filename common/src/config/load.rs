//! From raw layers to one typed [`Config`]: defaults ← TOML file ←
//! `GANCLUSTER__SECTION__KEY` environment ← flags, later ones winning.
//!
//! Types are kept, not coerced: a TOML value must already have the key's
//! type (`steps = 1.5` is an error, not 2; `allow_http = "yes"` is not
//! true), and a text value from the environment or a flag is read as the
//! type of the key's default (an integer key takes an integer, a boolean
//! `true` or `false`). Every error names the key and where its value came
//! from, so a typo never silently falls back to a default.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use toml::{Table, Value};

use super::{Config, ConfigError};

/// Environment variable prefix; `GANCLUSTER__TRAIN__STEPS=10` sets `train.steps`.
pub const ENV_PREFIX: &str = "GANCLUSTER__";

/// Where a key's value came from, for error messages.
type Origins = BTreeMap<String, String>;

impl Config {
    /// Loads defaults ← `file` ← `GANCLUSTER__*` environment ← `overrides`,
    /// then validates the result.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> Result<Self, ConfigError> {
        Self::load_with_env(file, overrides, None)
    }

    /// As [`Config::load`] with an explicit environment (`None`: the
    /// process's), so tests do not have to mutate the process environment.
    pub fn load_with_env(
        file: Option<&Path>,
        overrides: &[(&str, String)],
        env: Option<HashMap<String, String>>,
    ) -> Result<Self, ConfigError> {
        let defaults = Table::try_from(Config::default()).map_err(ConfigError::Render)?;
        let mut merged = defaults.clone();
        let mut origins = Origins::new();
        if let Some(path) = file {
            let origin = format!("{}", path.display());
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::File {
                path: path.to_path_buf(),
                source,
            })?;
            let table: Table = text
                .parse()
                .map_err(|e: toml::de::Error| ConfigError::Syntax {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
            merge(&mut merged, table, "", &origin, &mut origins);
        }
        let env = env.unwrap_or_else(|| std::env::vars().collect());
        let mut variables: Vec<(String, String)> = env
            .into_iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        variables.sort();
        for (name, text) in variables {
            let key = name[ENV_PREFIX.len()..].replace("__", ".").to_lowercase();
            set(&mut merged, &defaults, &key, &text, &name, &mut origins)?;
        }
        for (key, text) in overrides {
            set(
                &mut merged,
                &defaults,
                key,
                text,
                "the command line",
                &mut origins,
            )?;
        }
        let config: Config = serde_path_to_error::deserialize(Value::Table(merged))
            .map_err(|e| typed_error(e, &origins))?;
        config.validate()?;
        Ok(config)
    }

    /// The configuration as TOML, for `--print-config` and for saving next
    /// to a run's artifacts.
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        toml::to_string_pretty(self).map_err(ConfigError::Render)
    }
}

/// Merges `layer` into `into`, table by table, remembering `origin` for
/// every key it sets.
fn merge(into: &mut Table, layer: Table, prefix: &str, origin: &str, origins: &mut Origins) {
    for (name, value) in layer {
        let key = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        match (into.get_mut(&name), value) {
            (Some(Value::Table(existing)), Value::Table(table)) => {
                merge(existing, table, &key, origin, origins)
            }
            (_, value) => {
                origins.insert(key, origin.to_string());
                into.insert(name, value);
            }
        }
    }
}

/// Sets dotted `key` to `text`, read as the type of the key's default.
fn set(
    merged: &mut Table,
    defaults: &Table,
    key: &str,
    text: &str,
    origin: &str,
    origins: &mut Origins,
) -> Result<(), ConfigError> {
    let value = typed(text, lookup(defaults, key)).map_err(|expected| ConfigError::Type {
        key: key.to_string(),
        origin: origin.to_string(),
        message: format!("{expected}, got {text:?}"),
    })?;
    let mut table = merged;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            table.insert(part.to_string(), value);
            break;
        }
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        let Value::Table(next) = entry else {
            return Err(ConfigError::Type {
                key: key.to_string(),
                origin: origin.to_string(),
                message: format!("`{part}` is a value, not a section"),
            });
        };
        table = next;
    }
    origins.insert(key.to_string(), origin.to_string());
    Ok(())
}

fn lookup<'a>(table: &'a Table, key: &str) -> Option<&'a Value> {
    let mut parts = key.split('.');
    let mut value = table.get(parts.next()?)?;
    for part in parts {
        value = value.as_table()?.get(part)?;
    }
    Some(value)
}

/// `text` as the type of `default`; keys without a default (optional
/// paths, secrets) and text keys take it as it is.
fn typed(text: &str, default: Option<&Value>) -> Result<Value, &'static str> {
    match default {
        Some(Value::Integer(_)) => text
            .trim()
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| "expected a whole number"),
        Some(Value::Float(_)) => text
            .trim()
            .parse::<f64>()
            .map(Value::Float)
            .map_err(|_| "expected a number"),
        Some(Value::Boolean(_)) => match text.trim() {
            "true" => Ok(Value::Boolean(true)),
            "false" => Ok(Value::Boolean(false)),
            _ => Err("expected true or false"),
        },
        _ => Ok(Value::String(text.to_string())),
    }
}

/// The error serde found, named by its key and the key's origin.
fn typed_error(err: serde_path_to_error::Error<toml::de::Error>, origins: &Origins) -> ConfigError {
    let key = err.path().to_string();
    let message = err.inner().message().to_string();
    // An unknown key is reported at its section: find the layer that set it.
    let origin = origins
        .get(&key)
        .or_else(|| {
            origins
                .iter()
                .find(|(k, _)| {
                    k.strip_prefix(&key)
                        .and_then(|rest| rest.strip_prefix('.'))
                        .is_some_and(|rest| message.contains(&format!("`{rest}`")))
                })
                .map(|(_, origin)| origin)
        })
        .cloned()
        .unwrap_or_else(|| "the defaults".into());
    ConfigError::Type {
        key,
        origin,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_read_as_the_defaults_type() {
        assert_eq!(typed("7", Some(&Value::Integer(1))), Ok(Value::Integer(7)));
        assert!(typed("1.5", Some(&Value::Integer(1))).is_err());
        assert!(typed("yes", Some(&Value::Boolean(false))).is_err());
        assert!(typed("1", Some(&Value::Boolean(false))).is_err());
        assert_eq!(
            typed("2e-4", Some(&Value::Float(0.1))),
            Ok(Value::Float(2e-4))
        );
        assert_eq!(
            typed("2024", Some(&Value::String("default".into()))),
            Ok(Value::String("2024".into())),
            "a run id of digits stays text"
        );
    }
}
