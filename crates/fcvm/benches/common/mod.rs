//! What the container benches share: the check that they can run here, and their median.

/// Whether the bench can run: root, and every one of `vars` set (the paths of the guest
/// artifacts). Prints the bench's SKIPPED line when it cannot.
pub fn can_run(bench: &str, vars: &[&str]) -> bool {
    let missing: Vec<&str> = vars
        .iter()
        .copied()
        .filter(|v| std::env::var_os(v).is_none())
        .collect();
    if !missing.is_empty() || !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {bench} bench: needs root and {missing:?} set");
        return false;
    }
    true
}

/// The median of `v` (sorted in place); NaN when it is empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}
