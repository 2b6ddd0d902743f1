//! Making caller- and Consul-supplied text safe to log and to echo: the one place control
//! characters are escaped and long texts cut, so a name holding a newline cannot forge a log
//! line and a response body cannot smuggle a page of another endpoint into a message.

use std::borrow::Cow;

/// `value` with every control character escaped (`\n`, `\t`, `\u{1b}`, ...).
pub fn escape_control(value: &str) -> Cow<'_, str> {
    if !value.chars().any(char::is_control) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for c in value.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// At most `max_chars` characters of `value` (control characters escaped), marked with `…`
/// when cut.
pub fn excerpt(value: &str, max_chars: usize) -> String {
    let escaped = escape_control(value);
    match escaped.char_indices().nth(max_chars) {
        None => escaped.into_owned(),
        Some((cut, _)) => format!("{}…", &escaped[..cut]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_texts_cut() {
        assert_eq!(escape_control("plain"), "plain");
        assert_eq!(escape_control("a\nb\t\u{1b}"), "a\\nb\\t\\u{1b}");
        assert_eq!(excerpt("abcdef", 3), "abc…");
        assert_eq!(excerpt("ab", 3), "ab");
        assert_eq!(excerpt("é\né", 3), "é\\n…");
    }
}
