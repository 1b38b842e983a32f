//! The run plan: what the agent should do in this VM.
//!
//! The host stores it in Firecracker's MMDS before `InstanceStart`:
//!
//! ```text
//! PUT /mmds  {"latest": {"container-plan": <Plan as JSON>}}
//! ```
//!
//! and the agent reads it with MMDS V2 semantics: `PUT /latest/api/token` with header
//! `X-metadata-token-ttl-seconds`, then `GET /latest/container-plan` with `X-metadata-token` and
//! `Accept: application/json`, from [`MMDS_ADDR`] port 80.

use std::collections::BTreeMap;

use crate::frame::WindowSize;

/// Link-local address MMDS answers on.
pub const MMDS_ADDR: &str = "169.254.169.254";
/// Link-local address (with prefix) the agent gives the NIC when the host configured none.
/// Firecracker's MMDS answers ARP without it, but its TCP stack only talks to a guest that
/// has a source address on the interface: with none, connections to MMDS hang.
pub const MMDS_CLIENT_CIDR: &str = "169.254.1.2/16";
/// Top-level MMDS key.
pub const MMDS_ROOT_KEY: &str = "latest";
/// MMDS key of the plan under [`MMDS_ROOT_KEY`].
pub const MMDS_PLAN_KEY: &str = "container-plan";
/// Plan schema version the agent understands.
pub const PLAN_VERSION: u32 = 1;
/// Name of the container inside the VM (what `podman exec` targets).
pub const CONTAINER_NAME: &str = "fcvm-container";

/// Where the container image comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSource {
    /// `podman pull` by reference (needs a reachable registry).
    Registry {
        /// Image reference, e.g. `docker.io/library/alpine:3.20`.
        reference: String,
        /// Verify the registry's TLS certificate and refuse plain HTTP (podman's
        /// `--tls-verify`, default true); false for a registry without TLS.
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        tls_verify: bool,
    },
    /// `podman load` of an OCI or docker archive attached as a read-only raw drive.
    Archive {
        /// Guest block device holding the archive bytes, e.g. `/dev/vdb`.
        device: String,
        /// Reference the loaded image is run by (e.g. `localhost/busybox:latest`). When empty,
        /// the agent uses the name `podman load` reports.
        #[serde(default)]
        reference: String,
    },
}

fn yes() -> bool {
    true
}

fn is_true(b: &bool) -> bool {
    *b
}

impl ImageSource {
    /// A registry image pulled with TLS verification on (podman's default).
    pub fn registry(reference: impl Into<String>) -> Self {
        ImageSource::Registry {
            reference: reference.into(),
            tls_verify: true,
        }
    }
}

/// A host directory shared into the container: the host serves it over FUSE on
/// `vsock_port` (see `fcvm::volume`), the agent mounts it and bind-mounts it at `guest_path`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Mount point in the container.
    pub guest_path: String,
    /// Vsock port the file server listens on.
    pub vsock_port: u32,
    /// Mount read-only.
    #[serde(default)]
    pub read_only: bool,
}

/// Everything the agent needs to run the container.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Schema version; must equal [`PLAN_VERSION`].
    pub version: u32,
    /// The image.
    pub image: ImageSource,
    /// Command overriding the image's CMD; `None` keeps the image default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Entrypoint override; `None` keeps the image default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<String>,
    /// Environment variables for the container.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Keep stdin open (`podman run -i`); input arrives on the input port.
    #[serde(default)]
    pub interactive: bool,
    /// Allocate a terminal (`podman run -t`); input arrives on the input port.
    #[serde(default)]
    pub tty: bool,
    /// Initial terminal size (with `tty`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty_size: Option<WindowSize>,
    /// Guest hostname (also the container's, since it shares the VM's network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Working directory in the container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// User in the container (`podman run --user`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run an init process as the container's PID 1 (`podman run --init`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
    /// Labels on the container (`podman run --label`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Every capability and the VM's devices (`podman run --privileged`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub privileged: bool,
    /// Host directories shared into the container (`--map`, `-v`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Once the image is loaded, report [`crate::status::Status::ImageReady`] and wait for
    /// [`crate::status::Status::Proceed`], whose plan replaces this one (the host snapshots the
    /// VM in between for its image cache; a VM restored from that snapshot reconnects and
    /// gets its own run's plan).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub await_proceed: bool,
    /// The host's proxy settings ([`PROXY_VARIABLES`] that were set where fcvm ran): the
    /// agent gives them to the guest's podman, which uses them for pulls and, as podman does
    /// by default (`--http-proxy`), passes them into the container; a `-e` of the same name
    /// wins there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub proxy: BTreeMap<String, String>,
    /// The host's wall clock (`CLOCK_REALTIME`, nanoseconds since the Unix epoch) when it
    /// wrote this plan. In [`crate::status::Status::Proceed`] it is stamped just before the
    /// send and the agent sets the guest's clock to it: a VM restored from a snapshot (or
    /// paused while one was taken) wakes up with the clock of the snapshot. In the boot plan
    /// (MMDS) it is a lower bound: the agent only moves a clock that is behind it forward.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_time_ns: Option<u64>,
    /// Fresh random bytes from the host, sent only in [`crate::status::Status::Proceed`]
    /// (never in MMDS): the agent adds them to the guest kernel's entropy pool and reseeds
    /// its CRNG, so VMs restored from one snapshot do not share their random numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    /// `--health-check`: the agent checks the container with it and reports each change of
    /// state ([`crate::status::Status::Health`]); without it, the container is healthy once
    /// it has started ([`crate::status::Status::Ready`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<crate::health::HealthCheck>,
}

/// Fewest random bytes a plan's [`Plan::entropy`] may carry (256 bits, what the kernel's
/// CRNG needs to be fully seeded).
pub const MIN_ENTROPY_BYTES: usize = 32;
/// Most random bytes a plan's [`Plan::entropy`] may carry.
pub const MAX_ENTROPY_BYTES: usize = 512;
/// How many random bytes the host sends.
pub const ENTROPY_BYTES: usize = 64;

/// Random bytes for the guest's kernel, written as lowercase hex in JSON. Its `Debug` shows
/// only the length, so a logged plan or status message never shows them.
#[derive(Clone, PartialEq, Eq)]
pub struct Entropy(Vec<u8>);

impl Entropy {
    /// Wraps `bytes` (checked by [`Plan::validate`]).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Entropy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Entropy(<{} bytes>)", self.0.len())
    }
}

impl serde::Serialize for Entropy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(&self.0))
    }
}

impl<'de> serde::Deserialize<'de> for Entropy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        hex::decode(text)
            .map(Self)
            .map_err(|e| serde::de::Error::custom(format!("entropy is not hex: {e}")))
    }
}

/// The proxy variables carried from the host to the guest, in both cases, as the original
/// tool and podman's `--http-proxy` handle them.
pub const PROXY_VARIABLES: [&str; 6] = [
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// The [`PROXY_VARIABLES`] among `vars` (for example `std::env::vars()`), empty ones dropped.
pub fn proxy_settings(
    vars: impl IntoIterator<Item = (String, String)>,
) -> BTreeMap<String, String> {
    vars.into_iter()
        .filter(|(k, v)| !v.is_empty() && PROXY_VARIABLES.contains(&k.as_str()))
        .collect()
}

/// Why a plan is invalid.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    /// A bad health check.
    #[error(transparent)]
    Health(#[from] crate::health::HealthCheckError),
    /// Version mismatch between host and agent.
    #[error(
        "Plan version {0} is not supported (agent speaks {PLAN_VERSION}); rebuild the agent initrd"
    )]
    Version(u32),
    /// Empty image reference.
    #[error("Plan has an empty image reference")]
    EmptyImage,
    /// The archive device is not a /dev path.
    #[error("Image archive device {0:?} must be a path under /dev/")]
    BadDevice(String),
    /// An empty command was given.
    #[error("Plan command is empty; omit it to use the image's default command")]
    EmptyCommand,
    /// An environment variable name is invalid.
    #[error("Environment variable name {0:?} is invalid: it must be non-empty and contain no '=' or NUL")]
    BadEnvName(String),
    /// An environment value contains NUL.
    #[error("Environment variable {0} has a value containing a NUL byte")]
    BadEnvValue(String),
    /// A string field contains NUL.
    #[error("Plan field {0} contains a NUL byte")]
    Nul(&'static str),
    /// A label with an empty key, or `=` or NUL in its key, or NUL in its value.
    #[error("Plan has a label with an empty key, '=' or NUL in its key, or NUL in its value")]
    BadLabel,
    /// A proxy setting that is not one of [`PROXY_VARIABLES`].
    #[error("Plan proxy setting {0:?} is not a proxy variable (http_proxy, https_proxy, no_proxy, in either case)")]
    NotProxy(String),
    /// A volume whose mount point is not absolute, is `/`, has `..`, `,` or `:` in it, or
    /// is another volume's too; or whose port is not a volume port.
    #[error("Plan volume {0:?} is invalid (mount point absolute, not /, no '..', ',' or ':', unique; port from VOLUME_PORT_BASE)")]
    BadVolume(String),
    /// The host time is zero or past what a `timespec` of nanoseconds holds (year 2262).
    #[error("Plan host time {0} ns is not a usable wall-clock time (it must be between 1 ns and {max} ns since the Unix epoch)", max = i64::MAX)]
    BadHostTime(u64),
    /// Too few or too many random bytes.
    #[error(
        "Plan entropy of {0} bytes is outside {MIN_ENTROPY_BYTES}..={MAX_ENTROPY_BYTES} bytes"
    )]
    BadEntropy(usize),
}

/// Checks environment variable names and values.
pub fn validate_env(env: &BTreeMap<String, String>) -> Result<(), PlanError> {
    for (k, v) in env {
        if k.is_empty() || k.contains(['=', '\0']) {
            return Err(PlanError::BadEnvName(k.clone()));
        }
        if v.contains('\0') {
            return Err(PlanError::BadEnvValue(k.clone()));
        }
    }
    Ok(())
}

impl Plan {
    /// A plan running `reference` with default settings.
    pub fn new(image: ImageSource) -> Self {
        Self {
            version: PLAN_VERSION,
            image,
            cmd: None,
            entrypoint: None,
            env: BTreeMap::new(),
            interactive: false,
            tty: false,
            tty_size: None,
            hostname: None,
            workdir: None,
            user: None,
            init: false,
            labels: BTreeMap::new(),
            privileged: false,
            volumes: Vec::new(),
            await_proceed: false,
            proxy: BTreeMap::new(),
            host_time_ns: None,
            entropy: None,
            health_check: None,
        }
    }

    /// Checks what deserialization cannot.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.version != PLAN_VERSION {
            return Err(PlanError::Version(self.version));
        }
        match &self.image {
            ImageSource::Registry { reference, .. } if reference.trim().is_empty() => {
                return Err(PlanError::EmptyImage)
            }
            ImageSource::Archive { device, .. }
                if !device.starts_with("/dev/") || device.contains("..") =>
            {
                return Err(PlanError::BadDevice(device.clone()))
            }
            _ => {}
        }
        if let Some(cmd) = &self.cmd {
            if cmd.is_empty() {
                return Err(PlanError::EmptyCommand);
            }
            if cmd.iter().any(|a| a.contains('\0')) {
                return Err(PlanError::Nul("cmd"));
            }
        }
        for (name, v) in [
            ("entrypoint", &self.entrypoint),
            ("hostname", &self.hostname),
            ("workdir", &self.workdir),
            ("user", &self.user),
        ] {
            if v.as_deref().is_some_and(|s| s.contains('\0')) {
                return Err(PlanError::Nul(name));
            }
        }
        validate_env(&self.env)?;
        validate_env(&self.proxy)?;
        if let Some(h) = &self.health_check {
            h.validate()?;
        }
        if let Some(k) = self
            .proxy
            .keys()
            .find(|k| !PROXY_VARIABLES.contains(&k.as_str()))
        {
            return Err(PlanError::NotProxy(k.clone()));
        }
        if self
            .labels
            .iter()
            .any(|(k, v)| k.is_empty() || k.contains(['=', '\0']) || v.contains('\0'))
        {
            return Err(PlanError::BadLabel);
        }
        for (i, v) in self.volumes.iter().enumerate() {
            let p = &v.guest_path;
            let bad = !p.starts_with('/')
                || p.trim_matches('/').is_empty()
                || p.contains(['\0', ',', ':'])
                || p.split('/').any(|c| c == "..")
                || v.vsock_port < crate::vsock::VOLUME_PORT_BASE
                || self.volumes[..i]
                    .iter()
                    .any(|o| o.guest_path == *p || o.vsock_port == v.vsock_port);
            if bad {
                return Err(PlanError::BadVolume(p.clone()));
            }
        }
        if let Some(t) = self.host_time_ns {
            if t == 0 || i64::try_from(t).is_err() {
                return Err(PlanError::BadHostTime(t));
            }
        }
        if let Some(e) = &self.entropy {
            if !(MIN_ENTROPY_BYTES..=MAX_ENTROPY_BYTES).contains(&e.bytes().len()) {
                return Err(PlanError::BadEntropy(e.bytes().len()));
            }
        }
        Ok(())
    }

    /// The JSON document to `PUT /mmds`.
    pub fn mmds_document(&self) -> serde_json::Value {
        serde_json::json!({ MMDS_ROOT_KEY: { MMDS_PLAN_KEY: self } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only the six proxy variables cross, empty ones do not; anything else in the proxy map
    /// is refused by the agent.
    #[test]
    fn proxy_settings_are_the_six_variables_and_nothing_else() {
        let host = [
            ("http_proxy", "http://10.0.0.1:3128"),
            ("HTTPS_PROXY", "http://10.0.0.1:3129"),
            ("no_proxy", "localhost,10.0.0.0/8"),
            ("NO_PROXY", ""),
            ("ftp_proxy", "http://x"),
            ("PATH", "/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let got = proxy_settings(host);
        assert_eq!(
            got.keys().map(String::as_str).collect::<Vec<_>>(),
            ["HTTPS_PROXY", "http_proxy", "no_proxy"]
        );
        let mut p = archive_plan();
        p.proxy = got;
        assert_eq!(p.validate(), Ok(()));
        p.proxy.insert("LD_PRELOAD".into(), "/x.so".into());
        assert_eq!(p.validate(), Err(PlanError::NotProxy("LD_PRELOAD".into())));
    }

    fn archive_plan() -> Plan {
        let mut p = Plan::new(ImageSource::Archive {
            device: "/dev/vdb".into(),
            reference: "localhost/busybox:latest".into(),
        });
        p.cmd = Some(vec!["sh".into(), "-c".into(), "echo hi".into()]);
        p.env.insert("FOO".into(), "bar baz".into());
        p.tty_size = Some(WindowSize { rows: 24, cols: 80 });
        p.init = true;
        p.privileged = true;
        p.labels.insert("app".into(), "web=1".into());
        p
    }

    #[test]
    fn json_roundtrip_and_mmds_shape() {
        let p = archive_plan();
        p.validate().unwrap();
        let doc = p.mmds_document();
        let back: Plan = serde_json::from_value(doc["latest"]["container-plan"].clone()).unwrap();
        assert_eq!(back, p);
        assert_eq!(doc["latest"]["container-plan"]["image"]["kind"], "archive");
    }

    #[test]
    fn minimal_json_gets_defaults() {
        // Flags left at their defaults are not written: the plan reads as before they existed.
        let doc = serde_json::to_value(Plan::new(ImageSource::registry("alpine"))).unwrap();
        for key in [
            "init",
            "privileged",
            "labels",
            "user",
            "workdir",
            "entrypoint",
        ] {
            assert!(doc.get(key).is_none(), "{key} in {doc}");
        }
        let p: Plan = serde_json::from_str(
            r#"{"version":1,"image":{"kind":"registry","reference":"alpine"}}"#,
        )
        .unwrap();
        assert_eq!(p, Plan::new(ImageSource::registry("alpine")));
        assert!(serde_json::from_str::<Plan>(r#"{"version":1,"image":{"kind":"ftp"}}"#).is_err());
        // TLS verification is on unless the plan turns it off, and only "off" is written.
        assert!(doc["image"].get("tls_verify").is_none(), "{doc}");
        let plain = ImageSource::Registry {
            reference: "10.0.0.1:5000/a:1".into(),
            tls_verify: false,
        };
        let json = serde_json::to_value(&plain).unwrap();
        assert_eq!(json["tls_verify"], false);
        assert_eq!(serde_json::from_value::<ImageSource>(json).unwrap(), plain);
        assert!(serde_json::from_str::<Plan>(
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"x":1}"#
        )
        .is_err());
    }

    #[test]
    fn validation_rejects_bad_plans() {
        let mut p = archive_plan();
        p.version = 2;
        assert_eq!(p.validate(), Err(PlanError::Version(2)));
        let p = Plan::new(ImageSource::registry(" "));
        assert_eq!(p.validate(), Err(PlanError::EmptyImage));
        let p = Plan::new(ImageSource::Archive {
            device: "/etc/passwd".into(),
            reference: String::new(),
        });
        assert!(matches!(p.validate(), Err(PlanError::BadDevice(_))));
        let mut p = archive_plan();
        p.cmd = Some(vec![]);
        assert_eq!(p.validate(), Err(PlanError::EmptyCommand));
        let mut p = archive_plan();
        p.env.insert("A=B".into(), "x".into());
        assert!(matches!(p.validate(), Err(PlanError::BadEnvName(_))));
        let mut p = archive_plan();
        p.env.insert(String::new(), "x".into());
        assert!(matches!(p.validate(), Err(PlanError::BadEnvName(_))));
        let mut p = archive_plan();
        p.hostname = Some("a\0".into());
        assert_eq!(p.validate(), Err(PlanError::Nul("hostname")));
        let mut p = archive_plan();
        p.labels.insert(String::new(), "v".into());
        assert_eq!(p.validate(), Err(PlanError::BadLabel));
        let vol = |path: &str, port: u32| Volume {
            guest_path: path.into(),
            vsock_port: port,
            read_only: false,
        };
        let base = crate::vsock::VOLUME_PORT_BASE;
        let mut p = archive_plan();
        p.volumes = vec![vol("/data", base), vol("/logs/x", base + 1)];
        assert_eq!(p.validate(), Ok(()));
        for bad in [
            vec![vol("data", base)],
            vec![vol("/", base)],
            vec![vol("//", base)],
            vec![vol("/a/../b", base)],
            vec![vol("/a,b", base)],
            vec![vol("/a:b", base)],
            vec![vol("/a", base - 1)],
            vec![vol("/a", base), vol("/a", base + 1)],
            vec![vol("/a", base), vol("/b", base)],
        ] {
            let path = bad.last().unwrap().guest_path.clone();
            let mut p = archive_plan();
            p.volumes = bad;
            assert_eq!(p.validate(), Err(PlanError::BadVolume(path)));
        }
    }

    #[test]
    fn host_time_must_fit_a_timespec() {
        let mut p = archive_plan();
        for ok in [1, 1_764_000_000_000_000_000, i64::MAX as u64] {
            p.host_time_ns = Some(ok);
            assert_eq!(p.validate(), Ok(()), "{ok}");
        }
        for bad in [0, i64::MAX as u64 + 1, u64::MAX] {
            p.host_time_ns = Some(bad);
            assert_eq!(p.validate(), Err(PlanError::BadHostTime(bad)));
        }
        // A JSON number too large for u64, or negative, is refused when read.
        for doc in [
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"host_time_ns":-1}"#,
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"host_time_ns":1e30}"#,
        ] {
            assert!(serde_json::from_str::<Plan>(doc).is_err(), "{doc}");
        }
    }

    #[test]
    fn entropy_is_hex_in_json_bounded_and_never_shown_by_debug() {
        let mut p = archive_plan();
        p.host_time_ns = Some(1_764_000_000_123_456_789);
        let bytes: Vec<u8> = (0..ENTROPY_BYTES as u8)
            .map(|i| i.wrapping_mul(37))
            .collect();
        p.entropy = Some(Entropy::new(bytes.clone()));
        assert_eq!(p.validate(), Ok(()));
        let json = serde_json::to_value(&p).unwrap();
        let hex = json["entropy"].as_str().unwrap();
        assert_eq!(hex.len(), 2 * ENTROPY_BYTES);
        assert!(hex.starts_with("00254a6f94b9de"), "{hex}");
        assert_eq!(json["host_time_ns"], 1_764_000_000_123_456_789u64);
        let back: Plan = serde_json::from_value(json).unwrap();
        assert_eq!(back, p);
        assert_eq!(back.entropy.as_ref().unwrap().bytes(), &bytes[..]);

        let shown = format!("{p:?}");
        assert!(shown.contains("Entropy(<64 bytes>)"), "{shown}");
        assert!(!shown.contains("37, 74"), "{shown}");

        for (n, ok) in [
            (0, false),
            (MIN_ENTROPY_BYTES - 1, false),
            (MIN_ENTROPY_BYTES, true),
            (MAX_ENTROPY_BYTES, true),
            (MAX_ENTROPY_BYTES + 1, false),
        ] {
            p.entropy = Some(Entropy::new(vec![7; n]));
            let want = if ok {
                Ok(())
            } else {
                Err(PlanError::BadEntropy(n))
            };
            assert_eq!(p.validate(), want, "{n} bytes");
        }
        for doc in [
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"entropy":"abc"}"#,
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"entropy":"zz"}"#,
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"entropy":[1,2]}"#,
        ] {
            assert!(serde_json::from_str::<Plan>(doc).is_err(), "{doc}");
        }
        // Upper-case digits are read too.
        let p: Plan = serde_json::from_str(
            r#"{"version":1,"image":{"kind":"registry","reference":"a"},"entropy":"FF0a"}"#,
        )
        .unwrap();
        assert_eq!(p.entropy.unwrap().bytes(), [0xff, 0x0a]);
    }
}
