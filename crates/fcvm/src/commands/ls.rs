//! `fcvm ls`: what is running.

use serde::Serialize;

use crate::state::{now_ms, VmRecord};

/// One row of `fcvm ls --json`: the record plus derived fields scripts want.
#[derive(Debug, Clone, Serialize)]
pub struct LsEntry {
    /// The record.
    #[serde(flatten)]
    pub record: VmRecord,
    /// The owner's pid.
    pub pid: u32,
    /// Whether the owner process is alive (always true after reaping).
    pub live: bool,
}

/// Rows for `records`, optionally only the one whose owner or VMM has `pid`.
pub fn entries(records: Vec<VmRecord>, pid: Option<u32>) -> Vec<LsEntry> {
    records
        .into_iter()
        .filter(|r| match pid {
            Some(p) => r.owner.pid == p || r.vmm.is_some_and(|v| v.pid == p),
            None => true,
        })
        .map(|record| LsEntry {
            pid: record.pid(),
            live: record.is_live(),
            record,
        })
        .collect()
}

/// Render rows as an aligned table.
pub fn table(entries: &[LsEntry]) -> String {
    let mut rows = vec![[
        "NAME".to_owned(),
        "ID".to_owned(),
        "PID".to_owned(),
        "KIND".to_owned(),
        "STATUS".to_owned(),
        "HEALTH".to_owned(),
        "CPU".to_owned(),
        "MEM".to_owned(),
        "AGE".to_owned(),
        "PORTS".to_owned(),
        "SOURCE".to_owned(),
    ]];
    let now = now_ms();
    for e in entries {
        let r = &e.record;
        let mut source = r
            .image
            .clone()
            .or_else(|| r.snapshot.clone().map(|s| format!("snapshot:{s}")))
            .or_else(|| r.kernel.as_ref().map(|k| k.display().to_string()))
            .unwrap_or_default();
        if let (Some(live), Some(pages)) = (r.served_live, r.served_pages) {
            source.push_str(&format!(" (serving {live} clone(s), {pages} pages copied)"));
        }
        if r.status == crate::state::VmStatus::Failed {
            if let Some(e) = &r.error {
                source.push_str(&format!(" FAILED: {e}"));
            }
        }
        rows.push([
            r.name.to_string(),
            r.id.clone(),
            e.pid.to_string(),
            json_word(&r.kind),
            json_word(&r.status),
            json_word(&r.health),
            if r.vcpus > 0 {
                r.vcpus.to_string()
            } else {
                "-".into()
            },
            if r.mem_mib > 0 {
                format!("{}M", r.mem_mib)
            } else {
                "-".into()
            },
            age(now.saturating_sub(r.created_at_ms)),
            ports(&r.network),
            source,
        ]);
    }
    align_columns(&rows)
}

/// Left-align cells into columns two spaces apart (the first row is the header).
pub fn align_columns<R: AsRef<[String]>>(rows: &[R]) -> String {
    let Some(first) = rows.first() else {
        return String::new();
    };
    let widths: Vec<usize> = (0..first.as_ref().len())
        .map(|c| rows.iter().map(|r| r.as_ref()[c].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .as_ref()
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Published ports, `8080->80/tcp,...`, or `-`.
fn ports(network: &crate::network::NetworkAttachment) -> String {
    match network {
        crate::network::NetworkAttachment::Bridged(b) if !b.publish.is_empty() => b
            .publish
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
        _ => "-".into(),
    }
}

fn json_word<T: Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// An age in the largest whole unit: `42s`, `3m`, `5h`, `2d`.
pub fn age(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86399 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::Name;
    use crate::state::{new_vm_id, VmKind};

    #[test]
    fn table_and_filter() {
        let mut a = VmRecord::new(
            new_vm_id(),
            Name::parse("alpha").unwrap(),
            VmKind::Raw,
            "/x".into(),
        );
        a.vcpus = 1;
        a.mem_mib = 128;
        let mut b = a.clone();
        b.name = Name::parse("beta").unwrap();
        b.owner.pid = 1;
        let all = entries(vec![a.clone(), b], None);
        assert_eq!(all.len(), 2);
        let text = table(&all);
        assert!(text.starts_with("NAME"));
        assert!(text.contains("alpha") && text.contains("128M") && text.contains("raw"));
        let only = entries(vec![a], Some(std::process::id()));
        assert_eq!(only.len(), 1);
        let json = serde_json::to_value(&only[0]).unwrap();
        assert_eq!(json["name"], "alpha");
        assert_eq!(json["pid"], std::process::id());
        assert_eq!(json["live"], true);
    }

    #[test]
    fn bridged_network_shows_in_table_and_json() {
        use crate::network::bridged::{parse_publish, BridgedNet};
        let id = new_vm_id();
        let mut a = VmRecord::new(
            id.clone(),
            Name::parse("web").unwrap(),
            VmKind::Container,
            "/x".into(),
        );
        a.network = crate::network::NetworkAttachment::Bridged(BridgedNet::new(
            &id,
            0,
            "tap0",
            vec![],
            parse_publish(&["8080:80,53:53/udp".into()]).unwrap(),
        ));
        let all = entries(vec![a], None);
        let text = table(&all);
        assert!(text.lines().next().unwrap().contains("PORTS"));
        assert!(text.contains("8080->80/tcp,53->53/udp"), "{text}");
        let json = serde_json::to_value(&all[0]).unwrap();
        let net = &json["network"];
        assert_eq!(net["mode"], "bridged");
        assert_eq!(net["host_addr"], "10.209.0.1");
        assert_eq!(net["guest_addr"], "10.209.0.6");
        assert_eq!(net["publish"][0]["host_port"], 8080);
        assert_eq!(net["publish"][1]["protocol"], "udp");
    }
}
