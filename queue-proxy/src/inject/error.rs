//! What can go wrong while injecting, and where: the document of the stream, the object
//! in it, and the field, so that a user can find the fault in a long generated manifest.

use std::fmt;

use thaw_shared::annotations::AnnotationError;

/// Where an error sits in a YAML stream. Empty when injecting into a single object.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Location {
    /// 1 for the stream's first non-empty document (empty documents are not counted).
    pub document: Option<usize>,
    /// `Deployment web`, or `items[2] (Deployment web)` inside a `List`.
    pub object: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.document, &self.object) {
            (Some(d), Some(o)) => write!(f, "document {d} ({o}): "),
            (Some(d), None) => write!(f, "document {d}: "),
            (None, Some(o)) => write!(f, "{o}: "),
            (None, None) => Ok(()),
        }
    }
}

/// Why an object (or a stream) could not be injected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The stream is not YAML.
    #[error("invalid YAML: {0}")]
    Yaml(String),
    /// One field cannot be used; `field` is its path in the object
    /// (`spec.template.spec.containers[0].ports[0].containerPort`).
    #[error("{at}{field}: {problem}")]
    Field {
        at: Location,
        field: String,
        problem: String,
    },
    /// A `thaw.dev/*` annotation is bad; the inner error names it and its value.
    #[error("{at}{field}: {source}")]
    Annotation {
        at: Location,
        field: String,
        #[source]
        source: Box<AnnotationError>,
    },
    /// The output could not be written as YAML.
    #[error("cannot write YAML: {0}")]
    Write(String),
}

impl InjectError {
    /// The 1-based document of the stream at fault, if the error came from a stream.
    pub fn document(&self) -> Option<usize> {
        match self {
            Self::Field { at, .. } | Self::Annotation { at, .. } => at.document,
            Self::Yaml(_) | Self::Write(_) => None,
        }
    }

    /// The path of the field at fault within its object.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Field { field, .. } | Self::Annotation { field, .. } => Some(field),
            Self::Yaml(_) | Self::Write(_) => None,
        }
    }

    /// Puts the error in its place in the stream (kept if already placed).
    pub(crate) fn located(mut self, location: &Location) -> Self {
        if let Self::Field { at, .. } | Self::Annotation { at, .. } = &mut self {
            if *at == Location::default() {
                *at = location.clone();
            }
        }
        self
    }

    /// Prefixes the field path: an error inside a pod template becomes one inside the
    /// Deployment holding it (`spec.template.` + `spec.containers`).
    pub(crate) fn under(mut self, prefix: &str) -> Self {
        if let Self::Field { field, .. } | Self::Annotation { field, .. } = &mut self {
            *field = if prefix.is_empty() {
                std::mem::take(field)
            } else if field.is_empty() {
                prefix.to_owned()
            } else if field.starts_with('[') {
                format!("{prefix}{field}")
            } else {
                format!("{prefix}.{field}")
            };
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_document_object_and_field() {
        let e = InjectError::Field {
            at: Location::default(),
            field: "spec.containers".into(),
            problem: "missing".into(),
        };
        assert_eq!(e.to_string(), "spec.containers: missing");
        let at = Location {
            document: Some(2),
            object: Some("Deployment web".into()),
        };
        let e = e.under("spec.template").located(&at);
        assert_eq!(
            e.to_string(),
            "document 2 (Deployment web): spec.template.spec.containers: missing"
        );
        assert_eq!(e.document(), Some(2));
        assert_eq!(e.field(), Some("spec.template.spec.containers"));
        // A located error keeps its place when passed up again.
        let other = Location {
            document: Some(9),
            object: None,
        };
        assert_eq!(e.clone().located(&other), e);
    }
}
