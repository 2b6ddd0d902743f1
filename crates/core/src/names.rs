//! The one rule for the names consul-smi writes into Consul, shared by the translator (which
//! drops what breaks it, with a diagnostic) and the writer (which refuses it at its gRPC
//! boundary and again where Consul API paths are built).
//!
//! A name is a Kubernetes DNS-1123 subdomain: lower-case letters, digits, `-` and `.`,
//! alphanumeric at both ends, no empty part between dots, at most 253 bytes. Anything else is
//! not a name Kubernetes can hold: `*` reads as "every service" in Consul (SMI has no
//! wildcards), and `/`, `?`, `%` or `..` change the meaning of the Consul API path a name ends
//! up in. `*` is allowed only in a deny intention (the managed default deny), never in an
//! allow or a config entry.

use std::fmt;

use crate::{Command, DesiredState, Intention, IntentionKey, IntentionRule, ServiceName};

/// Consul's "every service" (and, on Enterprise, "every namespace").
pub const WILDCARD: &str = "*";

/// Kubernetes' limit on a DNS-1123 subdomain.
pub const NAME_MAX: usize = 253;

/// Why `name` is not a Kubernetes name, if it is not.
pub fn name_problem(name: &str) -> Option<&'static str> {
    let alphanumeric = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    if name.is_empty() {
        return Some("is empty");
    }
    if name.len() > NAME_MAX {
        return Some("is longer than 253 bytes");
    }
    if !name
        .chars()
        .all(|c| alphanumeric(c) || c == '-' || c == '.')
    {
        return Some("may hold only lower-case letters, digits, '-' and '.' (RFC 1123 subdomain)");
    }
    if !name.starts_with(alphanumeric) || !name.ends_with(alphanumeric) {
        return Some("must start and end with a lower-case letter or digit");
    }
    if name.contains("..") {
        return Some("has an empty part between dots");
    }
    None
}

pub fn is_valid_name(name: &str) -> bool {
    name_problem(name).is_none()
}

/// A name or namespace the writer refuses, naming the object and the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidName {
    /// The object, e.g. `intention web -> api` (control characters escaped).
    pub object: String,
    /// The field, e.g. `source.name`.
    pub field: String,
    pub problem: &'static str,
    /// The offending value, control characters escaped and cut to 64 characters.
    pub value: String,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} \"{}\" {}",
            self.object, self.field, self.value, self.problem
        )
    }
}

impl std::error::Error for InvalidName {}

/// Where `*` may stand.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wildcard {
    Allowed,
    Refused,
}

fn check(
    object: &dyn Fn() -> String,
    field: &str,
    value: &str,
    wildcard: Wildcard,
) -> Result<(), InvalidName> {
    if wildcard == Wildcard::Allowed && value == WILDCARD {
        return Ok(());
    }
    let problem = match name_problem(value) {
        None => return Ok(()),
        Some(_) if value == WILDCARD => "is a wildcard, allowed only in a deny intention",
        Some(problem) => problem,
    };
    Err(InvalidName {
        object: object(),
        field: field.to_string(),
        problem,
        value: crate::text::excerpt(value, 64),
    })
}

fn check_service(
    object: &dyn Fn() -> String,
    field: &str,
    service: &ServiceName,
    wildcard: Wildcard,
) -> Result<(), InvalidName> {
    check(object, &format!("{field}.name"), &service.name, wildcard)?;
    match &service.namespace {
        Some(namespace) => check(object, &format!("{field}.namespace"), namespace, wildcard),
        None => Ok(()),
    }
}

fn check_key(
    object: &dyn Fn() -> String,
    key: &IntentionKey,
    wildcard: Wildcard,
) -> Result<(), InvalidName> {
    check_service(object, "source", &key.source, wildcard)?;
    check_service(object, "destination", &key.destination, wildcard)
}

impl Intention {
    /// Checks every name against [`name_problem`]; `*` only in an L4 deny.
    pub fn validate(&self) -> Result<(), InvalidName> {
        let wildcard = match self.rule {
            IntentionRule::L4(crate::Action::Deny) => Wildcard::Allowed,
            _ => Wildcard::Refused,
        };
        let object =
            || crate::text::escape_control(&format!("intention {}", self.key)).into_owned();
        check_key(&object, &self.key, wildcard)
    }
}

impl Command {
    /// Checks every name the command would put into Consul (see the module docs).
    pub fn validate(&self) -> Result<(), InvalidName> {
        let object = || self.target();
        match self {
            Command::UpsertIntention(i) => i.validate(),
            // Deleting the managed deny names it; the writer deletes only what it owns.
            Command::DeleteIntention(k) => check_key(&object, k, Wildcard::Allowed),
            Command::UpsertSplitter(s) => {
                check_service(&object, "service", &s.service, Wildcard::Refused)?;
                for (i, split) in s.splits.iter().enumerate() {
                    check(
                        &object,
                        &format!("splits[{i}].service"),
                        &split.service,
                        Wildcard::Refused,
                    )?;
                    if let Some(namespace) = &split.namespace {
                        check(
                            &object,
                            &format!("splits[{i}].namespace"),
                            namespace,
                            Wildcard::Refused,
                        )?;
                    }
                }
                Ok(())
            }
            Command::UpsertServiceDefaults(d) => {
                check_service(&object, "service", &d.service, Wildcard::Refused)
            }
            Command::DeleteSplitter(s) | Command::DeleteServiceDefaults(s) => {
                check_service(&object, "service", s, Wildcard::Refused)
            }
        }
    }
}

impl DesiredState {
    /// Checks every object as [`Command::validate`] would, plus that each map key matches
    /// its object (a mismatch would let one name be checked and another written).
    pub fn validate(&self) -> Result<(), InvalidName> {
        let mismatch = |object: String, field: &str| InvalidName {
            object,
            field: field.to_string(),
            problem: "does not match the key it is stored under",
            value: String::new(),
        };
        for (key, intention) in &self.intentions {
            intention.validate()?;
            if *key != intention.key {
                let object = Command::DeleteIntention(intention.key.clone()).target();
                return Err(mismatch(object, "key"));
            }
        }
        for (service, splitter) in &self.splitters {
            Command::UpsertSplitter(splitter.clone()).validate()?;
            if *service != splitter.service {
                let object = Command::DeleteSplitter(splitter.service.clone()).target();
                return Err(mismatch(object, "service"));
            }
        }
        for (service, defaults) in &self.service_defaults {
            Command::UpsertServiceDefaults(defaults.clone()).validate()?;
            if *service != defaults.service {
                let object = Command::DeleteServiceDefaults(defaults.service.clone()).target();
                return Err(mismatch(object, "service"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Action, ServiceDefaults};

    fn intention(source: &str, destination: &str, action: Action) -> Intention {
        Intention {
            key: IntentionKey {
                source: ServiceName::new(source),
                destination: ServiceName::new(destination),
            },
            rule: IntentionRule::L4(action),
            description: String::new(),
        }
    }

    #[test]
    fn kubernetes_names_pass_and_path_tricks_do_not() {
        for good in ["api", "api-v1", "a.b", "0", &"a".repeat(253)] {
            assert_eq!(name_problem(good), None, "{good}");
        }
        for bad in [
            "",
            "Api",
            "a/b",
            "x/../api",
            "../../connect/intentions/1",
            "a..b",
            ".a",
            "a-",
            "a?b",
            "a%2F",
            "*",
            "web\nINFO forged",
            &"a".repeat(254),
        ] {
            assert!(name_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn wildcards_only_in_a_deny() {
        assert!(intention("*", "*", Action::Deny).validate().is_ok());
        let error = intention("*", "api", Action::Allow).validate().unwrap_err();
        assert_eq!(error.field, "source.name");
        assert!(intention("web", "*", Action::Allow).validate().is_err());
        let defaults = Command::UpsertServiceDefaults(ServiceDefaults {
            service: ServiceName::new("*"),
            protocol: "http".into(),
        });
        assert!(defaults.validate().is_err());
    }

    #[test]
    fn errors_name_object_and_field_and_escape_the_value() {
        let error = intention("web\nINFO x", "api", Action::Allow)
            .validate()
            .unwrap_err()
            .to_string();
        assert!(!error.contains('\n'), "{error}");
        assert!(error.contains("source.name"), "{error}");
        assert!(error.contains("web\\nINFO x"), "{error}");
    }

    #[test]
    fn a_state_key_must_match_its_object() {
        let mut state = DesiredState::default();
        let good = intention("web", "api", Action::Allow);
        let mut key = good.key.clone();
        key.source.name = "../x".into();
        state.intentions.insert(key, good);
        assert!(state.validate().is_err());
    }
}
