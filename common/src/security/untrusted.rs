//! Text a peer sent, made safe to print.
//!
//! A host name, a member id or a reason string arrives from the network
//! and may hold newlines (a forged log line), terminal escapes, or
//! megabytes. Wrapped in [`Untrusted`], it prints escaped (as Rust's
//! `escape_debug` does: `\n`, `\u{1b}`) and cut to a bounded length, with
//! the original length said, so a log line can never be split, coloured or
//! flooded by what a peer chose to send.

use std::fmt;

/// Characters of a peer's name or id shown before it is cut.
pub const SHOWN_CHARS: usize = 80;

/// Characters of a peer's message (an error it reports, a reason) shown
/// before it is cut: enough for any honest explanation.
pub const MESSAGE_CHARS: usize = 2000;

/// Peer-supplied text; `Display` escapes it and shows at most `limit` characters.
#[derive(Clone, Copy)]
pub struct Untrusted<'a> {
    text: &'a str,
    limit: usize,
}

impl<'a> Untrusted<'a> {
    /// A name or an id: [`SHOWN_CHARS`] at most.
    pub fn name(text: &'a str) -> Self {
        Self {
            text,
            limit: SHOWN_CHARS,
        }
    }

    /// A message: [`MESSAGE_CHARS`] at most.
    pub fn message(text: &'a str) -> Self {
        Self {
            text,
            limit: MESSAGE_CHARS,
        }
    }
}

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.text.chars();
        f.write_str("\"")?;
        for c in chars.by_ref().take(self.limit) {
            // Apostrophes are harmless inside the double quotes we add.
            match c {
                '\'' => f.write_str("'")?,
                c => write!(f, "{}", c.escape_debug())?,
            }
        }
        f.write_str("\"")?;
        if chars.next().is_some() {
            write!(f, "… ({} bytes in all)", self.text.len())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An owned [`Untrusted::name`] rendering, for error values.
pub fn shown(text: &str) -> String {
    Untrusted::name(text).to_string()
}

/// An owned [`Untrusted::message`] rendering, for error values.
pub fn shown_message(text: &str) -> String {
    Untrusted::message(text).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_so_a_line_cannot_be_forged() {
        let shown = shown("node-1\n2026-11-27 INFO training finished\u{1b}[31m");
        assert!(
            !shown.contains('\n') && !shown.contains('\u{1b}'),
            "{shown}"
        );
        assert!(
            shown.contains("\\n2026") && shown.contains("\\u{1b}"),
            "{shown}"
        );
    }

    #[test]
    fn long_text_is_cut_and_its_length_said() {
        let long = "x".repeat(60 << 20);
        let shown = shown(&long);
        assert!(shown.len() < 200, "{} bytes", shown.len());
        assert!(
            shown.ends_with(&format!("({} bytes in all)", long.len())),
            "{shown}"
        );
    }

    #[test]
    fn readable_text_stays_readable() {
        assert_eq!(shown("CelebA's naïve"), "\"CelebA's naïve\"");
        assert_eq!(
            shown("a\u{202e}b"),
            "\"a\\u{202e}b\"",
            "a bidi override is escaped"
        );
    }

    #[test]
    fn short_text_is_shown_whole() {
        assert_eq!(shown("worker-0"), "\"worker-0\"");
    }

    #[test]
    fn messages_may_be_longer_than_names() {
        let reason = "r".repeat(500);
        assert!(!shown(&reason).contains(&reason));
        assert!(shown_message(&reason).contains(&reason));
    }
}
