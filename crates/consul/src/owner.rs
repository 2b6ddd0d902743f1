//! How a writer marks what it wrote, and recognises it later.
//!
//! - Legacy intentions (< 1.9) and config entries carry `Meta`:
//!   `{"managed-by": "consul-smi", "consul-smi/owner": "<writer id>"}`.
//! - Inside a modern `service-intentions` entry (one per destination, possibly shared with
//!   an operator or another tool) ownership is per source. Consul rejects `LegacyMeta` on
//!   config-entry writes, so the mark is a prefix of the source's `Description`:
//!   `[consul-smi:<writer id>] <description>`. Sources migrated by Consul from our legacy
//!   intentions keep our `Meta` as `LegacyMeta`; those count as ours too.
//! - The entry's own `Meta` says who created the entry. Consul refuses an entry with no
//!   sources, so removing the last source deletes the entry whoever created it.

use std::collections::BTreeMap;

use crate::error::ConsulError;

pub const MANAGED_BY_KEY: &str = "managed-by";
pub const MANAGED_BY_VALUE: &str = "consul-smi";
pub const OWNER_KEY: &str = "consul-smi/owner";

/// Consul's limits on `Meta` values and on a legacy intention's `Description`.
pub const META_VALUE_MAX: usize = 512;
pub const DESCRIPTION_MAX: usize = 512;

/// Who wrote an object, judged from its metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ownership {
    /// Written by this writer.
    Ours,
    /// Written by another consul-smi writer (a different `--writer-id`).
    OtherWriter(String),
    /// Written by someone else (operator, consul-k8s, ...).
    Foreign,
}

impl Ownership {
    pub fn describe(&self) -> String {
        match self {
            Ownership::Ours => "managed by this writer".into(),
            Ownership::OtherWriter(id) => format!("managed by another consul-smi writer ({id:?})"),
            Ownership::Foreign => "not managed by consul-smi".into(),
        }
    }
}

/// This writer's identity (`--writer-id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    id: String,
}

impl Owner {
    /// `id`: 1..=512 bytes of `A-Z a-z 0-9 . _ - : /` (it goes into Meta values, into a
    /// `Description` tag and into a `?filter=` expression unescaped).
    pub fn new(id: impl Into<String>) -> Result<Self, ConsulError> {
        let id = id.into();
        let allowed = |c: char| c.is_ascii_alphanumeric() || "._-:/".contains(c);
        if id.is_empty() || id.len() > META_VALUE_MAX || !id.chars().all(allowed) {
            return Err(ConsulError::Config(format!(
                "writer id {id:?} must be 1..={META_VALUE_MAX} characters of A-Z a-z 0-9 . _ - : /"
            )));
        }
        Ok(Owner { id })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The `Meta` stamped on legacy intentions and on config entries this writer creates.
    pub fn meta(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            (MANAGED_BY_KEY.to_string(), MANAGED_BY_VALUE.to_string()),
            (OWNER_KEY.to_string(), self.id.clone()),
        ])
    }

    pub fn judge_meta(&self, meta: Option<&BTreeMap<String, String>>) -> Ownership {
        let Some(meta) = meta else {
            return Ownership::Foreign;
        };
        if meta.get(MANAGED_BY_KEY).map(String::as_str) != Some(MANAGED_BY_VALUE) {
            return Ownership::Foreign;
        }
        match meta.get(OWNER_KEY) {
            Some(owner) if *owner == self.id => Ownership::Ours,
            Some(owner) => Ownership::OtherWriter(owner.clone()),
            None => Ownership::OtherWriter(String::new()),
        }
    }

    fn tag(&self) -> String {
        format!("[{MANAGED_BY_VALUE}:{}]", self.id)
    }

    /// The `Description` of a source this writer owns inside a `service-intentions` entry.
    pub fn tag_description(&self, description: &str) -> String {
        if description.is_empty() {
            self.tag()
        } else {
            format!("{} {description}", self.tag())
        }
    }

    /// A source inside a `service-intentions` entry: our description tag, or (for a source
    /// Consul migrated from a 1.8 intention) our marks in its `LegacyMeta`. The entry's own
    /// `Meta` says nothing about a source (Consul's legacy list view copies it onto every
    /// source that has no `LegacyMeta`, so reading ownership from there mislabels operators').
    pub fn judge_source(
        &self,
        description: &str,
        legacy_meta: Option<&BTreeMap<String, String>>,
    ) -> Ownership {
        match self.judge_description(description) {
            Ownership::Foreign => self.judge_meta(legacy_meta),
            judged => judged,
        }
    }

    /// `description` without this writer's tag (as the translator produced it).
    pub fn untag_description<'d>(&self, description: &'d str) -> &'d str {
        description
            .strip_prefix(&self.tag())
            .map(|rest| rest.strip_prefix(' ').unwrap_or(rest))
            .unwrap_or(description)
    }

    pub fn judge_description(&self, description: &str) -> Ownership {
        let prefix = format!("[{MANAGED_BY_VALUE}:");
        let Some(rest) = description.strip_prefix(&prefix) else {
            return Ownership::Foreign;
        };
        let Some(end) = rest.find(']') else {
            return Ownership::Foreign;
        };
        let after = &rest[end + 1..];
        if !(after.is_empty() || after.starts_with(' ')) {
            return Ownership::Foreign;
        }
        let id = &rest[..end];
        if id == self.id {
            Ownership::Ours
        } else {
            Ownership::OtherWriter(id.to_string())
        }
    }
}

/// Cuts `text` to at most `max` bytes on a char boundary (Consul counts bytes).
pub fn truncate_bytes(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_judged_by_its_tag_or_its_legacy_meta_never_by_the_entry() {
        let me = Owner::new("w1").unwrap();
        let tagged = me.tag_description("rg/api");
        assert_eq!(me.judge_source(&tagged, None), Ownership::Ours);
        assert_eq!(me.untag_description(&tagged), "rg/api");
        assert_eq!(me.untag_description("operator note"), "operator note");
        assert_eq!(me.judge_source("operator", None), Ownership::Foreign);
        // Migrated from a 1.8 intention this writer made.
        assert_eq!(me.judge_source("", Some(&me.meta())), Ownership::Ours);
    }

    #[test]
    fn meta_ownership() {
        let me = Owner::new("w1").unwrap();
        assert_eq!(me.judge_meta(Some(&me.meta())), Ownership::Ours);
        let other = Owner::new("w2").unwrap();
        assert_eq!(
            me.judge_meta(Some(&other.meta())),
            Ownership::OtherWriter("w2".into())
        );
        assert_eq!(me.judge_meta(None), Ownership::Foreign);
        let operator = BTreeMap::from([("team".to_string(), "ops".to_string())]);
        assert_eq!(me.judge_meta(Some(&operator)), Ownership::Foreign);
    }

    #[test]
    fn description_ownership() {
        let me = Owner::new("w1").unwrap();
        assert_eq!(
            me.judge_description(&me.tag_description("from tt/a")),
            Ownership::Ours
        );
        assert_eq!(
            me.judge_description(&me.tag_description("")),
            Ownership::Ours
        );
        assert_eq!(
            me.judge_description("[consul-smi:w2] x"),
            Ownership::OtherWriter("w2".into())
        );
        assert_eq!(me.judge_description("[consul-smi:w1]x"), Ownership::Foreign);
        assert_eq!(me.judge_description("operator rule"), Ownership::Foreign);
    }

    #[test]
    fn bad_writer_ids_are_refused() {
        assert!(Owner::new("").is_err());
        assert!(Owner::new("a b").is_err());
        assert!(Owner::new("a]").is_err());
        assert!(Owner::new("a\"b").is_err());
        assert!(Owner::new("cluster-a.prod/writer_1").is_ok());
        assert!(Owner::new("x".repeat(513)).is_err());
    }

    #[test]
    fn truncation_respects_char_boundaries() {
        assert_eq!(truncate_bytes("héllo", 2), "h");
        assert_eq!(truncate_bytes("abc", 10), "abc");
    }
}
