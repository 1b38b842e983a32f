//! The kernel config fragment: parsing it, and checking a finished `.config` against it
//! so that an option `olddefconfig` silently dropped is reported by name.

#[allow(unused_imports)]
use super::*;

/// One fragment line: an option and the value it must end up with (`None` = off).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigRequirement {
    /// `CONFIG_...`.
    pub name: String,
    /// Required value (`y`, `32`, `"-fcvm"`), or `None` for "not set".
    pub value: Option<String>,
}

/// An option whose final value differs from the requirement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigMismatch {
    /// `CONFIG_...`.
    pub name: String,
    /// Required value, `None` = off.
    pub wanted: Option<String>,
    /// Value found in `.config`, `None` = not set.
    pub found: Option<String>,
}

impl std::fmt::Display for ConfigMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "not set".into());
        match &self.wanted {
            Some(w) => write!(f, "{}={w} (found: {})", self.name, show(&self.found)),
            None => write!(
                f,
                "{} must be off (found: {})",
                self.name,
                show(&self.found)
            ),
        }
    }
}

pub(super) fn list_mismatches(list: &[ConfigMismatch]) -> String {
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parse a config fragment. Blank lines and comments are skipped, except the Kconfig form
/// `# CONFIG_X is not set`, which requires the option off.
pub fn parse_fragment(text: &str) -> Result<Vec<ConfigRequirement>, KernelError> {
    let mut out: Vec<ConfigRequirement> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let bad = |reason| KernelError::BadFragment {
            line_no: i + 1,
            line: raw.to_string(),
            reason,
        };
        let req = if let Some(name) = parse_not_set(line) {
            ConfigRequirement {
                name: name.to_string(),
                value: None,
            }
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else {
            let (name, value) = line
                .split_once('=')
                .ok_or_else(|| bad("expected CONFIG_NAME=value"))?;
            if !is_option_name(name) {
                return Err(bad("option names look like CONFIG_[A-Z0-9_]+"));
            }
            if value.is_empty() {
                return Err(bad("empty value"));
            }
            let value = (value != "n").then(|| value.to_string());
            ConfigRequirement {
                name: name.to_string(),
                value,
            }
        };
        if out.iter().any(|r| r.name == req.name) {
            return Err(bad("option given twice"));
        }
        out.push(req);
    }
    Ok(out)
}

/// The fragment's requirements plus fcvm's own ([`REQUIRED_OPTIONS`] as `=y`,
/// [`FORBIDDEN_OPTIONS`] off). A fragment that contradicts fcvm's list is an error.
pub fn requirements(fragment: &str) -> Result<Vec<ConfigRequirement>, KernelError> {
    let mut reqs = parse_fragment(fragment)?;
    let fixed = REQUIRED_OPTIONS
        .iter()
        .map(|n| (*n, Some("y")))
        .chain(FORBIDDEN_OPTIONS.iter().map(|n| (*n, None)));
    for (name, want) in fixed {
        match reqs.iter().find(|r| r.name == name) {
            Some(r) if r.value.as_deref() == want => {}
            Some(r) => {
                return Err(KernelError::FragmentConflict {
                    name: name.into(),
                    value: r.value.clone().unwrap_or_else(|| "n".into()),
                    required: want.unwrap_or("it off").into(),
                })
            }
            None => reqs.push(ConfigRequirement {
                name: name.into(),
                value: want.map(String::from),
            }),
        }
    }
    Ok(reqs)
}

/// The options set in a `.config` (`# ... is not set` lines and `=n` count as unset).
pub fn parse_config(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.trim().split_once('='))
        .filter(|(name, value)| is_option_name(name) && *value != "n")
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Check a `.config` against `reqs`; the error lists every option that differs.
pub fn check_config(config: &str, reqs: &[ConfigRequirement]) -> Result<(), KernelError> {
    let set = parse_config(config);
    let missing: Vec<ConfigMismatch> = reqs
        .iter()
        .filter_map(|req| {
            let found = set.get(&req.name).cloned();
            (found != req.value).then(|| ConfigMismatch {
                name: req.name.clone(),
                wanted: req.value.clone(),
                found,
            })
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(KernelError::MissingOptions(missing))
    }
}

fn parse_not_set(line: &str) -> Option<&str> {
    let name = line.strip_prefix("# ")?.strip_suffix(" is not set")?;
    is_option_name(name).then_some(name)
}

fn is_option_name(name: &str) -> bool {
    name.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_fragment_parses_and_covers_required_options() {
        let frag = parse_fragment(FRAGMENT).unwrap();
        for name in REQUIRED_OPTIONS {
            let found = frag.iter().find(|r| r.name == *name);
            assert_eq!(
                found.and_then(|r| r.value.as_deref()),
                Some("y"),
                "{name} should be =y in the fragment"
            );
        }
        for name in FORBIDDEN_OPTIONS {
            assert!(
                frag.iter().any(|r| r.name == *name && r.value.is_none()),
                "{name} should be off in the fragment"
            );
        }
        assert!(requirements(FRAGMENT).is_ok());
    }

    #[test]
    fn fragment_syntax() {
        let reqs = parse_fragment(
            "# comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"x y\"\nCONFIG_D=n\n",
        )
        .unwrap();
        let got: Vec<(&str, Option<&str>)> = reqs
            .iter()
            .map(|r| (r.name.as_str(), r.value.as_deref()))
            .collect();
        assert_eq!(
            got,
            [
                ("CONFIG_A", Some("y")),
                ("CONFIG_B", None),
                ("CONFIG_C", Some("\"x y\"")),
                ("CONFIG_D", None)
            ]
        );

        for (bad, line_no) in [
            ("CONFIG_A=y\nFOO=y\n", 2),
            ("CONFIG_A\n", 1),
            ("CONFIG_A=\n", 1),
            ("CONFIG_A=y\nCONFIG_A=n\n", 2),
        ] {
            match parse_fragment(bad) {
                Err(KernelError::BadFragment { line_no: n, .. }) => {
                    assert_eq!(n, line_no, "{bad:?}")
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn a_dropped_option_is_reported_by_name() {
        let reqs =
            parse_fragment("CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=32\n# CONFIG_M is not set\n").unwrap();
        let good = "CONFIG_A=y\nCONFIG_B=y\nCONFIG_N=32\n# CONFIG_M is not set\nCONFIG_OTHER=y\n";
        check_config(good, &reqs).unwrap();

        let dropped = "CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_N=64\nCONFIG_M=y\n";
        let Err(KernelError::MissingOptions(missing)) = check_config(dropped, &reqs) else {
            panic!("dropped options went unnoticed")
        };
        let names: Vec<&str> = missing.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["CONFIG_B", "CONFIG_N", "CONFIG_M"]);
        let msg = KernelError::MissingOptions(missing).to_string();
        assert!(msg.contains("CONFIG_B=y (found: not set)"), "{msg}");
        assert!(msg.contains("CONFIG_N=32 (found: 64)"), "{msg}");
        assert!(msg.contains("CONFIG_M must be off (found: y)"), "{msg}");
    }

    #[test]
    fn required_options_are_checked_even_when_the_fragment_omits_them() {
        let reqs = requirements("CONFIG_A=y\n").unwrap();
        let config = "CONFIG_A=y\n";
        let Err(KernelError::MissingOptions(missing)) = check_config(config, &reqs) else {
            panic!("required options not enforced")
        };
        assert!(missing.iter().any(|m| m.name == "CONFIG_VIRTIO_VSOCKETS"));
        assert!(
            !missing.iter().any(|m| m.name == "CONFIG_MODULES"),
            "absent means off"
        );
    }

    #[test]
    fn a_fragment_contradicting_fcvm_is_rejected() {
        let err = requirements("# CONFIG_OVERLAY_FS is not set\n").unwrap_err();
        assert!(
            matches!(&err, KernelError::FragmentConflict { name, .. } if name == "CONFIG_OVERLAY_FS"),
            "{err}"
        );
        let err = requirements("CONFIG_MODULES=y\n").unwrap_err();
        assert!(
            matches!(&err, KernelError::FragmentConflict { name, .. } if name == "CONFIG_MODULES"),
            "{err}"
        );
    }
}
