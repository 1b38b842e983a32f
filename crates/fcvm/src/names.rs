//! VM and snapshot names given by users.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest accepted name. Names appear in socket paths and network device names.
pub const MAX_NAME_LEN: usize = 48;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("the name is empty")]
    Empty,
    /// Too long.
    #[error("the name {name:?} is {len} characters long; the limit is {MAX_NAME_LEN}")]
    TooLong {
        /// The name.
        name: String,
        /// Its length.
        len: usize,
    },
    /// Bad character.
    #[error(
        "the name {name:?} contains {ch:?}; use letters, digits, '-', '_' and '.' (not leading)"
    )]
    BadChar {
        /// The name.
        name: String,
        /// The offending character.
        ch: char,
    },
    /// Bad first character.
    #[error("the name {0:?} must start with a letter or digit")]
    BadStart(String),
}

/// A validated name: `[A-Za-z0-9][A-Za-z0-9._-]*`, at most 48 characters, so it is safe as a
/// path component (no `/`, no `..`) and in shell output.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

impl Name {
    /// Validate `name`.
    pub fn parse(name: &str) -> Result<Name, NameError> {
        let first = name.chars().next().ok_or(NameError::Empty)?;
        let len = name.chars().count();
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong {
                name: name.to_owned(),
                len,
            });
        }
        if let Some(ch) = name
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
        {
            return Err(NameError::BadChar {
                name: name.to_owned(),
                ch,
            });
        }
        if !first.is_ascii_alphanumeric() {
            return Err(NameError::BadStart(name.to_owned()));
        }
        Ok(Name(name.to_owned()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Name {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Name::parse(s)
    }
}

impl TryFrom<String> for Name {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["web", "web-1", "a.b_c", "0abc", &"x".repeat(MAX_NAME_LEN)] {
            assert_eq!(Name::parse(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn refuses_path_tricks_and_junk() {
        assert_eq!(Name::parse(""), Err(NameError::Empty));
        assert!(matches!(
            Name::parse("a/b"),
            Err(NameError::BadChar { ch: '/', .. })
        ));
        assert!(matches!(Name::parse(".."), Err(NameError::BadStart(_))));
        assert!(matches!(
            Name::parse(".hidden"),
            Err(NameError::BadStart(_))
        ));
        assert!(matches!(Name::parse("-rf"), Err(NameError::BadStart(_))));
        assert!(matches!(
            Name::parse("a b"),
            Err(NameError::BadChar { ch: ' ', .. })
        ));
        assert!(matches!(Name::parse("é"), Err(NameError::BadChar { .. })));
        let long = "x".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            Name::parse(&long),
            Err(NameError::TooLong { len: 49, .. })
        ));
    }

    #[test]
    fn deserializing_validates() {
        assert!(serde_json::from_str::<Name>("\"ok\"").is_ok());
        assert!(serde_json::from_str::<Name>("\"../x\"").is_err());
    }
}
