//! Rendering an error for a person: its message and each cause once, joined by `: `.
//!
//! Error types in this crate never repeat their `#[source]` in their own message (Cloud
//! Hypervisor's rule), so the chain printed here (or by anyhow's `{:#}` in `main`) names
//! every cause exactly once.

use std::error::Error;

/// `message: cause: cause's cause`.
pub fn chain(err: &(dyn Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let part = cause.to_string();
        // A transparent wrapper shows its cause's message as its own: skip the repeat.
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open the store")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_cause_appears_once() {
        let e = Outer(std::io::Error::from_raw_os_error(2));
        let text = chain(&e);
        assert_eq!(text.matches("No such file").count(), 1, "{text}");
        assert!(text.starts_with("cannot open the store: "), "{text}");
    }
}
