//! Configuration errors: every problem, each with the place it was found.

use std::fmt;
use std::path::PathBuf;

/// What kind of problem a configuration error is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigErrorKind {
    /// The file could not be read.
    Io,
    /// The file is not valid YAML.
    Syntax,
    /// A key that the schema does not have.
    UnknownKey,
    /// A required key is missing.
    MissingKey,
    /// A value has the wrong type (a string where a list belongs, ...).
    WrongType,
    /// A value has the right type but is not allowed.
    InvalidValue,
    /// A name refers to something that does not exist.
    UnknownReference,
    /// A name is defined twice.
    Duplicate,
    /// A key from an old Nodepool version that was replaced.
    Removed,
    /// Keys that may not be used together, or a required one-of is missing.
    Conflict,
    /// An old spelling that is still read, with its modern meaning (a
    /// warning: [`Config::warnings`](super::Config::warnings)).
    Deprecated,
    /// A `%(NODEPOOL_x)` reference to a variable that is not set: the text
    /// stays as written, as in Python Nodepool (a warning for the daemons,
    /// an error for `nodepool config-validate`).
    UnsetVariable,
    /// The file holds no configuration at all (a warning for the daemons,
    /// an error for `nodepool config-validate`).
    Empty,
}

impl ConfigErrorKind {
    /// Whether `nodepool config-validate` fails on a warning of this kind
    /// (the daemons only log warnings): a deprecated spelling works, but
    /// an unset variable or an empty file is almost surely a mistake.
    pub fn fails_validation(self) -> bool {
        matches!(
            self,
            ConfigErrorKind::UnsetVariable | ConfigErrorKind::Empty
        )
    }
}

/// One configuration problem.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// Where: `providers[0].pools[1].labels[2].diskimage`, or `(file)`.
    pub path: String,
    /// What kind of problem.
    pub kind: ConfigErrorKind,
    /// A sentence for the operator.
    pub message: String,
}

impl ConfigError {
    /// Creates an error.
    pub fn new(path: impl Into<String>, kind: ConfigErrorKind, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.into(),
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one configuration (never empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    /// The file the errors are about, when there is one.
    pub file: Option<PathBuf>,
    /// The problems, in the order they were found.
    pub errors: Vec<ConfigError>,
}

impl ConfigErrors {
    /// A single error.
    pub fn one(error: ConfigError) -> Self {
        ConfigErrors {
            file: None,
            errors: vec![error],
        }
    }

    /// Attaches the file name.
    pub fn in_file(mut self, file: impl Into<PathBuf>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// Whether an error of this kind at this path was reported.
    pub fn has(&self, path: &str, kind: ConfigErrorKind) -> bool {
        self.errors.iter().any(|e| e.path == path && e.kind == kind)
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        match &self.file {
            Some(file) => writeln!(
                f,
                "{}: {n} configuration error{}:",
                file.display(),
                if n == 1 { "" } else { "s" }
            )?,
            None => writeln!(
                f,
                "{n} configuration error{}:",
                if n == 1 { "" } else { "s" }
            )?,
        }
        for (i, e) in self.errors.iter().enumerate() {
            if i + 1 < n {
                writeln!(f, "  {e}")?;
            } else {
                write!(f, "  {e}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
