//! Caller-provided text in log fields: the text log format writes string fields as they are,
//! so a raw newline would let an unauthenticated caller forge whole log lines, and escape
//! sequences would reach the operator's terminal. The rule lives in `consul_smi_core::text`,
//! which the writer uses for its messages too.

pub use consul_smi_core::text::escape_control;

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn control_characters_are_escaped_and_the_rest_kept() {
        assert!(matches!(escape_control("v1alpha3 ünï"), Cow::Borrowed(_)));
        assert_eq!(
            escape_control("a\nINFO forged\r\t\u{1b}[31m\u{7f}"),
            "a\\nINFO forged\\r\\t\\u{1b}[31m\\u{7f}"
        );
    }
}
