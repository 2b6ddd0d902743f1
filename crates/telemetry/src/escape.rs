//! Caller-provided text in log fields.

use std::borrow::Cow;
use std::fmt::Write;

/// `text` with control characters escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...), for logging
/// what a caller sent: the text log format writes string fields as they are, so a raw newline
/// would let an unauthenticated caller forge whole log lines, and escape sequences would
/// reach the operator's terminal. Borrowed when there is nothing to escape.
pub fn escape_control(text: &str) -> Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            // `escape_default` spells \n, \r, \t as such and the rest as \u{..}.
            let _ = write!(escaped, "{}", c.escape_default());
        } else {
            escaped.push(c);
        }
    }
    Cow::Owned(escaped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape_control("v1alpha3 ünï"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("a\nINFO forged\r\t\u{1b}[31m\u{7f}"),
            "a\\nINFO forged\\r\\t\\u{1b}[31m\\u{7f}"
        );
    }
}
