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

/// Adjectives of generated names.
const ADJECTIVES: &[&str] = &[
    "able", "agile", "amber", "brave", "bright", "brisk", "calm", "clever", "cosy", "crisp",
    "eager", "early", "fair", "fancy", "fast", "fond", "gentle", "glad", "golden", "grand",
    "happy", "hardy", "jolly", "keen", "kind", "lively", "lucky", "merry", "mighty", "neat",
    "nimble", "noble", "plucky", "polite", "proud", "quick", "quiet", "rapid", "ready", "shiny",
    "silent", "smart", "snappy", "steady", "sunny", "swift", "tidy", "vivid", "warm", "witty",
];

/// Nouns of generated names.
const NOUNS: &[&str] = &[
    "badger", "beacon", "bison", "canyon", "cedar", "comet", "condor", "coral", "crane", "delta",
    "dune", "eagle", "ember", "falcon", "fjord", "gecko", "glacier", "harbor", "heron", "island",
    "jaguar", "kestrel", "lagoon", "lynx", "maple", "meadow", "meteor", "otter", "panda", "pebble",
    "pine", "planet", "quartz", "raven", "reef", "river", "robin", "salmon", "sparrow", "summit",
    "tiger", "tundra", "valley", "walrus", "willow", "wombat", "yak", "zebra", "orca", "osprey",
];

/// A fresh name for a VM given none: `adjective_noun_xxxx` (4 random hex digits), as podman
/// names containers `adjective_surname`. 160 million of them, so two concurrent runs rarely
/// draw the same; the state store refuses the second one atomically and it draws again.
pub fn generate() -> Name {
    let id = crate::state::new_vm_id();
    let n = u64::from_str_radix(&id, 16).unwrap_or(0);
    // 48 random bits: the suffix is the low 16, the words come from the 32 above them.
    let adjective = ADJECTIVES[((n >> 16 & 0xffff) % ADJECTIVES.len() as u64) as usize];
    let noun = NOUNS[((n >> 32 & 0xffff) % NOUNS.len() as u64) as usize];
    let name = format!("{adjective}_{noun}_{}", &id[id.len() - 4..]);
    Name::parse(&name).expect("generated names use only letters, digits and '_'")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_valid_and_vary() {
        let names: std::collections::BTreeSet<String> =
            (0..200).map(|_| generate().as_str().to_owned()).collect();
        // 200 draws out of 160 million: a repeat would mean the randomness is broken.
        assert_eq!(names.len(), 200);
        for n in &names {
            let parts: Vec<&str> = n.split('_').collect();
            assert_eq!(parts.len(), 3, "{n}");
            assert!(
                ADJECTIVES.contains(&parts[0]) && NOUNS.contains(&parts[1]),
                "{n}"
            );
            assert!(
                parts[2].len() == 4 && parts[2].chars().all(|c| c.is_ascii_hexdigit()),
                "{n}"
            );
        }
    }

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
