//! How an error reaches the user: one line, its causes joined with `: `, without a cause
//! the line already says (an `io::Error` wrapped by a `thiserror` type that prints its
//! source prints it twice otherwise, and a context often repeats its cause).

/// `e` and its causes as one line, dropping a cause whose text is already contained in
/// what was printed before it.
pub fn error_line(e: &anyhow::Error) -> String {
    join_causes(e.chain().map(|c| c.to_string()))
}

/// [`error_line`] over plain texts, outermost first.
pub fn join_causes(causes: impl IntoIterator<Item = String>) -> String {
    let mut line = String::new();
    for c in causes {
        let c = c.trim();
        if c.is_empty() || line.contains(c) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(c);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_causes_are_dropped() {
        let eacces = "Permission denied (os error 13)".to_string();
        assert_eq!(
            join_causes([
                format!("reading /x: {eacces}"),
                eacces.clone(),
                eacces.clone()
            ]),
            "reading /x: Permission denied (os error 13)"
        );
        assert_eq!(
            join_causes([
                "--ready bogus: invalid --ready \"bogus\"".into(),
                "invalid --ready".into()
            ]),
            "--ready bogus: invalid --ready \"bogus\""
        );
        assert_eq!(join_causes(["a".into(), "b".into(), "c".into()]), "a: b: c");
    }

    #[test]
    fn anyhow_chain() {
        let io = std::io::Error::from_raw_os_error(libc::EACCES);
        let e = anyhow::Error::new(io).context("opening /x");
        assert_eq!(
            error_line(&e),
            "opening /x: Permission denied (os error 13)"
        );
    }
}
