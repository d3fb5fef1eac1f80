//! Typed access to fields of a Kubernetes object held as JSON, each failure naming the
//! field's path. Objects stay `serde_json::Value`s so that every field Thaw does not own
//! passes through untouched, whatever the cluster's version adds.

use serde_json::{Map, Value};

use super::error::{InjectError, Location};

/// The path of a field for messages: `spec.containers[1].env`, or
/// `metadata.annotations["thaw.dev/target"]` for keys that are not plain words.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Path(String);

impl Path {
    pub fn root() -> Self {
        Self::default()
    }

    pub fn key(&self, key: &str) -> Self {
        let plain = !key.is_empty() && key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        Self(match (plain, self.0.is_empty()) {
            (true, true) => key.to_owned(),
            (true, false) => format!("{}.{key}", self.0),
            (false, _) => format!("{}[{key:?}]", self.0),
        })
    }

    pub fn index(&self, i: usize) -> Self {
        Self(format!("{}[{i}]", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// An error about the value at this path.
    pub fn error(&self, problem: impl Into<String>) -> InjectError {
        InjectError::Field {
            at: Location::default(),
            field: self.0.clone(),
            problem: problem.into(),
        }
    }

    /// The value at this path has the wrong type.
    pub fn wrong_type(&self, expected: &str, got: &Value) -> InjectError {
        self.error(format!("expected {expected}, got {}", kind_of(got)))
    }
}

/// What a value is, for messages.
pub(crate) fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}

/// Kubernetes treats an absent field and an explicit `null` alike.
pub(crate) fn present<'a>(m: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    m.get(key).filter(|v| !v.is_null())
}

pub(crate) fn object<'a>(v: &'a Value, at: &Path) -> Result<&'a Map<String, Value>, InjectError> {
    v.as_object().ok_or_else(|| at.wrong_type("a mapping", v))
}

pub(crate) fn object_mut<'a>(
    v: &'a mut Value,
    at: &Path,
) -> Result<&'a mut Map<String, Value>, InjectError> {
    match v {
        Value::Object(m) => Ok(m),
        other => Err(at.wrong_type("a mapping", other)),
    }
}

/// The mapping under `key`, created empty when absent or null.
pub(crate) fn child_object_mut<'a>(
    m: &'a mut Map<String, Value>,
    key: &str,
    at: &Path,
) -> Result<&'a mut Map<String, Value>, InjectError> {
    let slot = m.entry(key).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Object(Map::new());
    }
    object_mut(slot, &at.key(key))
}

/// The list under `key`; absent or null is an empty list.
pub(crate) fn list<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    at: &Path,
) -> Result<&'a [Value], InjectError> {
    match present(m, key) {
        None => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(other) => Err(at.key(key).wrong_type("a list", other)),
    }
}

/// The list under `key`, created empty when absent or null.
pub(crate) fn list_mut<'a>(
    m: &'a mut Map<String, Value>,
    key: &str,
    at: &Path,
) -> Result<&'a mut Vec<Value>, InjectError> {
    let slot = m.entry(key).or_insert(Value::Null);
    if slot.is_null() {
        *slot = Value::Array(Vec::new());
    }
    match slot {
        Value::Array(items) => Ok(items),
        other => Err(at.key(key).wrong_type("a list", other)),
    }
}

pub(crate) fn string<'a>(
    m: &'a Map<String, Value>,
    key: &str,
    at: &Path,
) -> Result<Option<&'a str>, InjectError> {
    match present(m, key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(at.key(key).wrong_type("a string", other)),
    }
}

/// A container port number, 1-65535.
pub(crate) fn port_number(v: &Value, at: &Path) -> Result<u16, InjectError> {
    match v.as_u64() {
        Some(n @ 1..=65535) => Ok(n as u16),
        _ => Err(at.error(format!("expected a port number 1-65535, got {}", shown(v)))),
    }
}

/// A value as a message shows it: scalars verbatim, containers by kind.
pub(crate) fn shown(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => kind_of(other).to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths_quote_keys_that_are_not_words() {
        let p = Path::root()
            .key("metadata")
            .key("annotations")
            .key("thaw.dev/target");
        assert_eq!(p.as_str(), "metadata.annotations[\"thaw.dev/target\"]");
        assert_eq!(
            Path::root()
                .key("spec")
                .key("containers")
                .index(2)
                .key("env")
                .as_str(),
            "spec.containers[2].env"
        );
    }

    #[test]
    fn typed_access_names_the_field() {
        let m = json!({"a": 3, "b": null, "ports": "x"});
        let m = m.as_object().unwrap();
        let at = Path::root().key("spec");
        assert_eq!(string(m, "b", &at).unwrap(), None);
        let e = string(m, "a", &at).unwrap_err();
        assert_eq!(e.to_string(), "spec.a: expected a string, got a number");
        let e = list(m, "ports", &at).unwrap_err();
        assert_eq!(e.to_string(), "spec.ports: expected a list, got a string");
        assert!(list(m, "missing", &at).unwrap().is_empty());
        for bad in [json!(0), json!(65536), json!(-1), json!("80"), json!(1.5)] {
            let e = port_number(&bad, &at).unwrap_err();
            assert!(
                e.to_string().starts_with("spec: expected a port number"),
                "{e}"
            );
        }
        assert_eq!(port_number(&json!(8080), &at).unwrap(), 8080);
    }
}
