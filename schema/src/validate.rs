//! Errors that name the field, and decoding JSON into checked records.

use serde::de::DeserializeOwned;

/// A value that breaks a rule, before the caller says which field held it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(String);

impl Invalid {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// Attaches the field name.
    pub fn at(self, field: impl Into<String>) -> FieldError {
        FieldError {
            field: field.into(),
            message: self.0,
        }
    }
}

/// What is wrong with a spec or record, naming the field
/// (`ports[1].name: "web" listed twice`). The root is `.`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Rules that serde's types cannot express (ranges, uniqueness, relations).
pub trait Validate {
    fn validate(&self) -> Result<(), FieldError>;
}

/// Parses JSON into `T` and validates it. Unknown fields, wrong types and
/// broken rules all come back as a [`FieldError`] naming the field.
pub fn decode_json<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, FieldError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_eof() && field == "." {
            "empty or truncated JSON".to_string()
        } else {
            inner.to_string()
        };
        FieldError { field, message }
    })?;
    value.validate()?;
    Ok(value)
}

/// Checks `lo <= v <= hi`, naming `field` otherwise.
pub(crate) fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    v: T,
    lo: T,
    hi: T,
) -> Result<(), FieldError> {
    if v < lo || v > hi {
        return Err(FieldError::new(
            field,
            format!("{v} is out of range ({lo} to {hi})"),
        ));
    }
    Ok(())
}
