//! A recording stand-in for [`super::NetOps`]: remembers every call and fails the
//! ones it is told to, so launch and teardown are tested without root.

use std::sync::Mutex;

use super::{NetError, NetOps};

/// Records calls as `"create_netns NAME TAP"`, `"delete_netns NAME"`, `"ip [-n NS] ARGS"`,
/// `"sysctl NS|- KEY=VALUE"`, `"nft_apply table ip NAME"`,
/// `"nft_apply_in NS table ip NAME"`, `"nft_delete_table NAME"`,
/// `"delete_link NAME"`.
#[derive(Debug, Default)]
pub struct RecordingNet {
    calls: Mutex<Vec<String>>,
    fail: Mutex<Vec<String>>,
}

impl RecordingNet {
    /// Make the next call whose text starts with `prefix` fail (once).
    pub fn fail_once(&self, prefix: &str) {
        self.fail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(prefix.to_owned());
    }

    /// Calls so far, in order.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn call(&self, text: String, name: &str) -> Result<(), NetError> {
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(text.clone());
        let mut fail = self.fail.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = fail.iter().position(|f| text.starts_with(f.as_str())) {
            fail.remove(i);
            return Err(NetError::Step {
                step: "injected failure",
                name: name.to_owned(),
                source: std::io::Error::other("injected by the test"),
            });
        }
        Ok(())
    }
}

impl NetOps for RecordingNet {
    fn create_netns(
        &self,
        name: &str,
        tap: Option<&str>,
        tap_owner: Option<u32>,
    ) -> Result<(), NetError> {
        let owner = tap_owner.map(|u| format!(" owner={u}")).unwrap_or_default();
        self.call(
            format!("create_netns {name} {}{owner}", tap.unwrap_or("-")),
            name,
        )
    }
    fn delete_netns(&self, name: &str) -> Result<(), NetError> {
        self.call(format!("delete_netns {name}"), name)
    }
    fn ip(&self, netns: Option<&str>, args: &[&str]) -> Result<(), NetError> {
        let ns = netns.map(|n| format!("-n {n} ")).unwrap_or_default();
        self.call(format!("ip {ns}{}", args.join(" ")), netns.unwrap_or("-"))
    }
    /// Each command is recorded (and may fail) as an `ip` call of its own.
    fn ip_batch(&self, netns: Option<&str>, commands: &[Vec<String>]) -> Result<(), NetError> {
        for c in commands {
            let words: Vec<&str> = c.iter().map(String::as_str).collect();
            self.ip(netns, &words)?;
        }
        Ok(())
    }
    fn sysctl(&self, netns: Option<&str>, key: &str, value: &str) -> Result<(), NetError> {
        self.call(
            format!("sysctl {} {key}={value}", netns.unwrap_or("-")),
            netns.unwrap_or("-"),
        )
    }
    fn nft_apply(&self, ruleset: &str) -> Result<(), NetError> {
        let table = ruleset
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches(" {");
        self.call(format!("nft_apply {table}"), table)
    }
    fn nft_apply_in(&self, netns: &str, ruleset: &str) -> Result<(), NetError> {
        let table = ruleset
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end_matches(" {");
        self.call(format!("nft_apply_in {netns} {table}"), netns)
    }
    fn nft_delete_table(&self, name: &str) -> Result<(), NetError> {
        self.call(format!("nft_delete_table {name}"), name)
    }
    fn delete_link(&self, name: &str) -> Result<(), NetError> {
        self.call(format!("delete_link {name}"), name)
    }
}
