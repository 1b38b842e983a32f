//! `fcvm ps`, `fcvm inspect` and `fcvm rm`: the container VMs as podman lists, shows and
//! removes containers. `fcvm ls` stays the listing of every VM (raw VMs, clones, page servers).
//!
//! A container VM's record outlives the VM unless the run said `--rm`, so `ps -a` adds the
//! exited ones (with their exit codes) and failed ones to `ps`, until `fcvm rm`.

use std::time::Duration;

use serde::Serialize;

use crate::cleanup::Disposition;
use crate::state::{now_ms, Health, Store, StoreError, VmRecord, VmStatus};
use crate::vm::StopReport;

/// One row of `fcvm ps --format json`, with podman's key names where one applies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct PsEntry {
    /// The VM id.
    pub id: String,
    /// Its name (podman lists names as an array).
    pub names: Vec<String>,
    /// The image.
    pub image: String,
    /// `created`, `running`, `stopping`, `exited` or `failed`.
    pub state: &'static str,
    /// Human status: `Up 3m (healthy)`, `Exited (1)`, `Failed: ...`.
    pub status: String,
    /// The container's exit code, once known.
    pub exit_code: Option<i32>,
    /// Seconds since the Unix epoch.
    pub created: u64,
    /// The owning process (foreground fcvm).
    pub pid: u32,
}

/// The container VMs among `records`: live ones, or with `all` also failed and exited ones.
pub fn entries(records: &[VmRecord], all: bool) -> Vec<PsEntry> {
    let now = now_ms();
    records
        .iter()
        .filter(|r| r.runs_container())
        .map(|r| entry(r, now))
        .filter(|e| all || matches!(e.state, "created" | "running" | "stopping"))
        .collect()
}

fn entry(r: &VmRecord, now: u64) -> PsEntry {
    let up = super::ls::age(now.saturating_sub(r.created_at_ms));
    let (state, status) = match (r.status, r.exit_code) {
        (VmStatus::Failed, _) => (
            "failed",
            match &r.error {
                Some(e) => format!("Failed: {e}"),
                None => "Failed".to_owned(),
            },
        ),
        (_, Some(code)) => ("exited", format!("Exited ({code})")),
        (VmStatus::Exited, None) => ("exited", "Exited".to_owned()),
        (VmStatus::Starting, None) => ("created", "Created".to_owned()),
        (VmStatus::Stopping, None) => ("stopping", format!("Stopping, up {up}")),
        (_, None) => (
            "running",
            match r.health {
                Health::Healthy => format!("Up {up} (healthy)"),
                Health::Unhealthy => format!("Up {up} (unhealthy)"),
                Health::Unknown | Health::Starting => format!("Up {up} (starting)"),
            },
        ),
    };
    PsEntry {
        id: r.id.clone(),
        names: vec![r.name.to_string()],
        image: r.image.clone().unwrap_or_default(),
        state,
        status,
        exit_code: r.exit_code,
        created: r.created_at_ms / 1000,
        pid: r.pid(),
    }
}

/// `fcvm ps` as a table.
pub fn table(entries: &[PsEntry]) -> String {
    let mut rows = vec![["ID", "IMAGE", "STATUS", "NAMES"].map(String::from)];
    for e in entries {
        rows.push([
            e.id.clone(),
            e.image.clone(),
            e.status.clone(),
            e.names.join(","),
        ]);
    }
    super::ls::align_columns(&rows)
}

/// Why `fcvm rm` refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RmError {
    /// No such VM, or the store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Not a container VM.
    #[error("{0} is not a container VM (kind {1}); stop it with `fcvm stop {0}`")]
    NotContainer(String, String),
    /// Running, and no `-f`.
    #[error("cannot remove container VM {0}: it is running; stop it first (`fcvm stop {0}`) or use `fcvm rm -f {0}`")]
    Running(String),
}

/// Remove the container VM `name`: a failed or exited one at once; a running one only with
/// `force`, stopped first (the guest gets `grace`, then the VMM is killed).
pub async fn rm(
    store: &Store,
    name: &str,
    force: bool,
    grace: Duration,
) -> Result<StopReport, RmError> {
    let record = store.find_by_name(name)?;
    if !record.runs_container() {
        let kind = serde_json::to_value(record.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        return Err(RmError::NotContainer(name.to_owned(), kind));
    }
    let ended = record.container_ended();
    if !ended && !force {
        return Err(RmError::Running(name.to_owned()));
    }
    let mut report = if ended {
        StopReport::default()
    } else {
        crate::vm::stop::stop_vm(store, &record, grace).await?
    };
    // Stopped, the record may be kept as exited: removing is what rm is for.
    let removed = crate::cleanup::teardown(store, &record.id, Disposition::Forget)?;
    report.teardown.failures.extend(removed.failures);
    report.teardown.removed = removed.removed;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Name;
    use crate::state::{new_vm_id, VmKind};

    fn container(name: &str, status: VmStatus) -> VmRecord {
        let mut r = VmRecord::new(
            new_vm_id(),
            Name::parse(name).unwrap(),
            VmKind::Container,
            "/r".into(),
        );
        r.status = status;
        r.image = Some("localhost/bb:1".into());
        r
    }

    #[test]
    fn ps_lists_running_containers_and_with_all_the_ended_ones() {
        let mut healthy = container("web", VmStatus::Running);
        healthy.health = Health::Healthy;
        let mut failed = container("broken", VmStatus::Failed);
        failed.error = Some("no kernel".into());
        let mut exited = container("done", VmStatus::Running);
        exited.exit_code = Some(3);
        let raw = VmRecord::new(
            new_vm_id(),
            Name::parse("raw").unwrap(),
            VmKind::Raw,
            "/r".into(),
        );
        let records = vec![healthy, failed, exited, raw];
        let running = entries(&records, false);
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].names, ["web"]);
        assert_eq!(running[0].state, "running");
        assert!(running[0].status.ends_with("(healthy)"), "{running:?}");
        let all = entries(&records, true);
        let states: Vec<(&str, &str, Option<i32>)> = all
            .iter()
            .map(|e| (e.names[0].as_str(), e.state, e.exit_code))
            .collect();
        assert_eq!(
            states,
            [
                ("web", "running", None),
                ("broken", "failed", None),
                ("done", "exited", Some(3))
            ]
        );
        assert_eq!(all[1].status, "Failed: no kernel");
        assert_eq!(all[2].status, "Exited (3)");
        let text = table(&all);
        assert!(text.starts_with("ID "), "{text}");
        assert!(
            text.contains("Exited (3)") && text.contains("localhost/bb:1"),
            "{text}"
        );
        let json = serde_json::to_value(&all[2]).unwrap();
        assert_eq!(json["Names"][0], "done");
        assert_eq!(json["ExitCode"], 3);
        assert_eq!(json["State"], "exited");
    }
}
