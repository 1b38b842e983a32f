//! Which kernel modules go into the initramfs, and in which order `insmod` must load them.
//!
//! Debian's kernel package ships no `modules.dep` (`depmod` makes it at install time), so the
//! dependencies are read from each module's own `.modinfo` section (`depends=`), the same data
//! `depmod` and `modinfo -F depends` use. Busybox `insmod` loads one file and resolves nothing, so
//! the order must be exact: dependencies first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// One module we ask for.
#[derive(Debug, Clone, Copy)]
pub struct Want {
    /// Module name (`_` or `-`, both are accepted).
    pub name: &'static str,
    /// Fail the run when it is missing (otherwise: a warning with `-v`).
    pub required: bool,
    /// Parameters for `insmod`.
    pub params: &'static str,
}

const fn req(name: &'static str) -> Want {
    Want {
        name,
        required: true,
        params: "",
    }
}

const fn opt(name: &'static str) -> Want {
    Want {
        name,
        required: false,
        params: "",
    }
}

/// The modules L1 loads. Order matters only among unrelated modules; dependencies are added
/// and ordered automatically. The crypto modules come first because btrfs and libcrc32c ask the
/// crypto API for them at load time (softdeps, not `depends=`), and there is no modprobe in L1
/// to answer such requests.
pub const WANTED: &[Want] = &[
    opt("crc32c_generic"),
    opt("crc32c_intel"),
    opt("xxhash_generic"),
    opt("blake2b_generic"),
    req("virtio_pci"),
    req("virtio_console"),
    req("virtio_blk"),
    opt("virtio_rng"),
    req("9pnet_virtio"),
    req("9p"),
    req("overlay"),
    req("kvm"),
    // npt=0: shadow paging in L1. With the emulated nested paging, concurrent L2 guests hang or
    // crash L1 (see the crate README); with npt=0, 42 of 42 concurrent guests passed.
    Want {
        name: "kvm_amd",
        required: true,
        params: "npt=0",
    },
    req("btrfs"),
    opt("loop"),
    opt("tun"),
    opt("fuse"),
    opt("ext4"),
    opt("veth"),
    opt("bridge"),
    opt("br_netfilter"),
    opt("nf_conntrack"),
    opt("nf_nat"),
    opt("nf_tables"),
    opt("nft_compat"),
    opt("nft_chain_nat"),
    opt("nft_ct"),
    opt("nft_masq"),
    opt("nft_nat"),
    opt("nft_redir"),
    opt("nft_reject"),
    opt("nft_reject_inet"),
    opt("nft_fib"),
    opt("nft_fib_inet"),
    opt("nft_fib_ipv4"),
    opt("x_tables"),
    opt("ip_tables"),
    opt("iptable_filter"),
    opt("iptable_nat"),
    opt("xt_MASQUERADE"),
    opt("xt_nat"),
    opt("xt_conntrack"),
    opt("xt_addrtype"),
    opt("xt_tcpudp"),
    opt("xt_comment"),
];

/// Modules the shell `/init` loads itself (with their dependencies), because it needs them to
/// reach the host's root filesystem and the control port. Everything else is loaded by the
/// runner, in parallel and without a fork+exec per module (busybox `insmod` costs ~60 ms of
/// emulated time each, before any work).
pub const BOOT: &[&str] = &[
    "virtio_pci",
    "virtio_console",
    "9pnet_virtio",
    "9p",
    "overlay",
];

/// One line of the initramfs' `/modules.list`:
/// `name required(0|1) stage(boot|late) deps(a,b|-) [params...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListLine {
    /// Normalized name; the file is `/lib/fcvm/<name>.ko`.
    pub name: String,
    /// Failing to load it is fatal.
    pub required: bool,
    /// Loaded by `/init` (true) or by the runner.
    pub boot: bool,
    /// Loadable dependencies.
    pub deps: Vec<String>,
    /// Module parameters.
    pub params: String,
}

impl ListLine {
    /// Formats the line.
    pub fn format(&self) -> String {
        let deps = if self.deps.is_empty() {
            "-".to_string()
        } else {
            self.deps.join(",")
        };
        format!(
            "{} {} {} {} {}",
            self.name,
            u8::from(self.required),
            if self.boot { "boot" } else { "late" },
            deps,
            self.params
        )
        .trim_end()
        .to_string()
    }

    /// Parses a line; `None` for a malformed one.
    pub fn parse(line: &str) -> Option<ListLine> {
        let mut it = line.splitn(5, ' ');
        let name = it.next().filter(|n| !n.is_empty())?.to_string();
        let required = match it.next()? {
            "0" => false,
            "1" => true,
            _ => return None,
        };
        let boot = match it.next()? {
            "boot" => true,
            "late" => false,
            _ => return None,
        };
        let deps = match it.next()? {
            "-" => Vec::new(),
            d => d.split(',').map(str::to_string).collect(),
        };
        let params = it.next().unwrap_or("").trim().to_string();
        Some(ListLine {
            name,
            required,
            boot,
            deps,
            params,
        })
    }
}

/// Turns a plan into list lines, marking the boot closure.
pub fn list_lines(plan: &Plan, wanted: &[Want]) -> Vec<ListLine> {
    let required: HashSet<String> = wanted
        .iter()
        .filter(|w| w.required)
        .map(|w| normalize(w.name))
        .collect();
    let by_name: HashMap<&str, &Load> = plan.order.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut boot: HashSet<String> = HashSet::new();
    let mut stack: Vec<String> = BOOT.iter().map(|b| normalize(b)).collect();
    while let Some(n) = stack.pop() {
        if let Some(l) = by_name.get(n.as_str()) {
            if boot.insert(n.clone()) {
                stack.extend(l.deps.iter().cloned());
            }
        }
    }
    plan.order
        .iter()
        .map(|l| ListLine {
            name: l.name.clone(),
            // Only modules asked for as required are fatal: a failed dependency makes the
            // required module that needs it fail anyway.
            required: required.contains(&l.name),
            boot: boot.contains(&l.name),
            deps: l.deps.clone(),
            params: l.params.clone(),
        })
        .collect()
}

/// Module names compare with `-` and `_` equal, as the kernel does.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// Every `.ko` under a `lib/modules/<release>` tree, by normalized name, plus the built-in set.
#[derive(Debug, Default)]
pub struct Index {
    /// Loadable modules.
    pub files: HashMap<String, PathBuf>,
    /// Modules compiled into the kernel (nothing to load).
    pub builtin: HashSet<String>,
}

impl Index {
    /// Scans `modules_dir` (`lib/modules/<release>`).
    pub fn scan(modules_dir: &Path) -> Result<Index> {
        let mut idx = Index::default();
        let mut stack = vec![modules_dir.join("kernel")];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).map_err(Error::io("listing", &dir))? {
                let e = e.map_err(Error::io("listing", &dir))?;
                let p = e.path();
                let ft = e.file_type().map_err(Error::io("stat", &p))?;
                if ft.is_dir() {
                    stack.push(p);
                    continue;
                }
                let fname = e.file_name().to_string_lossy().into_owned();
                if let Some(stem) = fname.strip_suffix(".ko") {
                    idx.files.insert(normalize(stem), p);
                } else if let Some((stem, _)) = fname
                    .split_once(".ko.")
                    .filter(|(_, ext)| matches!(*ext, "xz" | "zst" | "gz"))
                {
                    // Compressed modules (other Debian releases): busybox insmod cannot read
                    // them and we carry no decompressor, so say so instead of failing in L1.
                    idx.files.entry(normalize(stem)).or_insert(p);
                }
            }
        }
        if let Ok(s) = fs::read_to_string(modules_dir.join("modules.builtin")) {
            for line in s.lines() {
                if let Some(f) = line.rsplit('/').next().and_then(|f| f.strip_suffix(".ko")) {
                    idx.builtin.insert(normalize(f));
                }
            }
        }
        Ok(idx)
    }
}

/// The `depends=` list from a module's `.modinfo` section.
pub fn depends_of(ko: &Path) -> Result<Vec<String>> {
    use object::{Object, ObjectSection};
    let bad = |why: String| Error::BadFile {
        path: ko.to_path_buf(),
        why,
    };
    if ko.extension().is_none_or(|x| x != "ko") {
        return Err(bad(
            "compressed kernel modules are not supported (busybox insmod cannot load them)".into(),
        ));
    }
    let data = fs::read(ko).map_err(Error::io("reading", ko))?;
    let file = object::File::parse(&*data).map_err(|e| bad(format!("not an ELF file: {e}")))?;
    let Some(sec) = file.section_by_name(".modinfo") else {
        return Ok(Vec::new());
    };
    let info = sec
        .data()
        .map_err(|e| bad(format!("reading .modinfo: {e}")))?;
    Ok(parse_modinfo_depends(info))
}

/// Parses `.modinfo` (NUL-separated `key=value`) for `depends=`.
pub fn parse_modinfo_depends(info: &[u8]) -> Vec<String> {
    info.split(|b| *b == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(normalize)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One module to load, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    /// Normalized name.
    pub name: String,
    /// `insmod` parameters.
    pub params: String,
    /// Its loadable dependencies (built-in ones left out).
    pub deps: Vec<String>,
}

/// The resolved plan.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Modules in load order: every module after all of its dependencies.
    pub order: Vec<Load>,
    /// Optional modules (or their dependencies) that are absent: warnings.
    pub missing_optional: Vec<String>,
}

/// Orders `wanted` and their dependencies. `lookup(name)` returns `Some(deps)` for a loadable
/// module, `None` if there is no such module; built-in modules are skipped by the caller's
/// `is_builtin`. A required module that is missing (or whose dependency is) is an error.
pub fn resolve(
    wanted: &[Want],
    is_builtin: impl Fn(&str) -> bool,
    mut lookup: impl FnMut(&str) -> Result<Option<Vec<String>>>,
) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut done: HashSet<String> = HashSet::new();
    let mut deps_cache: BTreeMap<String, Option<Vec<String>>> = BTreeMap::new();
    for w in wanted {
        let name = normalize(w.name);
        // Resolve into a scratch list first so that an optional module with a missing
        // dependency adds nothing.
        let mut order = Vec::new();
        let mut visiting = Vec::new();
        let mut seen = done.clone();
        match visit(
            &name,
            &is_builtin,
            &mut lookup,
            &mut deps_cache,
            &mut seen,
            &mut visiting,
            &mut order,
        )? {
            Ok(()) => {
                for n in order {
                    let params = if n == name { w.params } else { "" };
                    let deps = deps_cache
                        .get(&n)
                        .cloned()
                        .flatten()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|d| !is_builtin(d))
                        .collect();
                    done.insert(n.clone());
                    plan.order.push(Load {
                        name: n,
                        params: params.to_string(),
                        deps,
                    });
                }
            }
            Err(missing) if w.required => {
                return Err(Error::MissingModule(if missing == name {
                    name
                } else {
                    format!("{missing} (needed by {name})")
                }))
            }
            Err(missing) => plan.missing_optional.push(if missing == name {
                name
            } else {
                format!("{name} (needs missing {missing})")
            }),
        }
    }
    Ok(plan)
}

/// Depth-first post-order. Outer `Err`: I/O; inner `Err(name)`: a module that does not exist.
#[allow(clippy::too_many_arguments)]
fn visit(
    name: &str,
    is_builtin: &impl Fn(&str) -> bool,
    lookup: &mut impl FnMut(&str) -> Result<Option<Vec<String>>>,
    cache: &mut BTreeMap<String, Option<Vec<String>>>,
    seen: &mut HashSet<String>,
    visiting: &mut Vec<String>,
    order: &mut Vec<String>,
) -> Result<std::result::Result<(), String>> {
    if seen.contains(name) || is_builtin(name) {
        return Ok(Ok(()));
    }
    if visiting.iter().any(|v| v == name) {
        // A dependency cycle cannot be loaded by anyone; modules.dep never has one.
        return Err(Error::BadFile {
            path: PathBuf::from(name),
            why: format!("dependency cycle: {} -> {name}", visiting.join(" -> ")),
        });
    }
    let deps = match cache.get(name) {
        Some(d) => d.clone(),
        None => {
            let d = lookup(name)?;
            cache.insert(name.to_string(), d.clone());
            d
        }
    };
    let Some(deps) = deps else {
        return Ok(Err(name.to_string()));
    };
    visiting.push(name.to_string());
    for d in &deps {
        if let Err(m) = visit(d, is_builtin, lookup, cache, seen, visiting, order)? {
            visiting.pop();
            return Ok(Err(m));
        }
    }
    visiting.pop();
    seen.insert(name.to_string());
    order.push(name.to_string());
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> HashMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(n, d)| (n.to_string(), d.iter().map(|s| s.to_string()).collect()))
            .collect()
    }

    fn run(g: &HashMap<String, Vec<String>>, wanted: &[Want]) -> Result<Plan> {
        resolve(wanted, |n| n == "builtin_one", |n| Ok(g.get(n).cloned()))
    }

    fn names(p: &Plan) -> Vec<&str> {
        p.order.iter().map(|l| l.name.as_str()).collect()
    }

    #[test]
    fn dependencies_come_first_and_once() {
        let g = graph(&[
            ("kvm_amd", &["kvm", "ccp"]),
            ("kvm", &["irqbypass"]),
            ("irqbypass", &[]),
            ("ccp", &["builtin_one"]),
            ("9p", &["9pnet", "netfs", "fscache"]),
            ("9pnet", &[]),
            ("9pnet_virtio", &["9pnet", "virtio_ring", "virtio"]),
            ("virtio", &[]),
            ("virtio_ring", &[]),
            ("netfs", &[]),
            ("fscache", &["netfs"]),
        ]);
        let wanted = [
            req("9pnet_virtio"),
            req("9p"),
            req("kvm"),
            Want {
                name: "kvm-amd",
                required: true,
                params: "npt=0",
            },
        ];
        let p = run(&g, &wanted).unwrap();
        assert_eq!(
            names(&p),
            [
                "9pnet",
                "virtio_ring",
                "virtio",
                "9pnet_virtio",
                "netfs",
                "fscache",
                "9p",
                "irqbypass",
                "kvm",
                "ccp",
                "kvm_amd"
            ]
        );
        assert_eq!(p.order.last().unwrap().params, "npt=0");
        assert!(p.order[..p.order.len() - 1]
            .iter()
            .all(|l| l.params.is_empty()));
        // Every module after each of its dependencies.
        for (i, l) in p.order.iter().enumerate() {
            for d in &g[&l.name] {
                if d != "builtin_one" {
                    assert!(
                        names(&p)[..i].contains(&d.as_str()),
                        "{d} before {}",
                        l.name
                    );
                }
            }
        }
    }

    #[test]
    fn missing_optional_is_a_warning_and_adds_nothing() {
        let g = graph(&[("a", &["shared", "gone"]), ("shared", &[]), ("b", &[])]);
        let p = run(&g, &[opt("a"), opt("nothere"), req("b")]).unwrap();
        assert_eq!(names(&p), ["b"]);
        assert_eq!(p.missing_optional, ["a (needs missing gone)", "nothere"]);
    }

    #[test]
    fn missing_required_fails() {
        let g = graph(&[("kvm", &[])]);
        let e = run(&g, &[req("kvm_amd")]).unwrap_err();
        assert!(
            matches!(e, Error::MissingModule(ref m) if m == "kvm_amd"),
            "{e}"
        );
        let g = graph(&[("kvm_amd", &["kvm"])]);
        let e = run(&g, &[req("kvm_amd")]).unwrap_err();
        assert!(e.to_string().contains("kvm (needed by kvm_amd)"), "{e}");
    }

    #[test]
    fn builtin_is_skipped_and_cycle_is_an_error() {
        let g = graph(&[("x", &["builtin_one"])]);
        assert_eq!(
            names(&run(&g, &[req("builtin_one"), req("x")]).unwrap()),
            ["x"]
        );
        let g = graph(&[("a", &["b"]), ("b", &["a"])]);
        assert!(run(&g, &[req("a")]).is_err());
    }

    #[test]
    fn list_lines_round_trip_and_boot_closure() {
        let g = graph(&[
            ("virtio_pci", &["virtio", "virtio_ring"]),
            ("virtio", &[]),
            ("virtio_ring", &[]),
            ("kvm", &[]),
            ("kvm_amd", &["kvm"]),
        ]);
        let wanted = [
            req("virtio_pci"),
            Want {
                name: "kvm_amd",
                required: true,
                params: "npt=0 nested=1",
            },
        ];
        let p = run(&g, &wanted).unwrap();
        let lines = list_lines(&p, &wanted);
        let boot: Vec<_> = lines
            .iter()
            .filter(|l| l.boot)
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(boot, ["virtio", "virtio_ring", "virtio_pci"]);
        let amd = lines.iter().find(|l| l.name == "kvm_amd").unwrap();
        assert_eq!(amd.format(), "kvm_amd 1 late kvm npt=0 nested=1");
        assert_eq!(
            lines.iter().find(|l| l.name == "kvm").unwrap().format(),
            "kvm 0 late -"
        );
        for l in &lines {
            assert_eq!(ListLine::parse(&l.format()).as_ref(), Some(l));
        }
        assert_eq!(ListLine::parse("x 2 late -"), None);
        assert_eq!(ListLine::parse("x 1 early -"), None);
        assert_eq!(ListLine::parse("x 1"), None);
    }

    #[test]
    fn modinfo_parsing() {
        let info = b"license=GPL\0depends=kvm,ccp\0intree=Y\0name=kvm_amd\0";
        assert_eq!(parse_modinfo_depends(info), ["kvm", "ccp"]);
        assert!(parse_modinfo_depends(b"depends=\0name=x\0").is_empty());
        assert_eq!(parse_modinfo_depends(b"depends=nf-nat\0"), ["nf_nat"]);
    }
}
