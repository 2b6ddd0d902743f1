//! Conversions between Consul state/commands (`consul_smi_core`) and their wire form
//! (`writer.proto`).
//!
//! Domain -> wire is infallible (`From`). Wire -> domain is `TryFrom`/`*_from_wire`: a wire
//! message can be missing a required sub-message, carry an unspecified enum or an empty
//! name; each [`WireError`] names the object and the field.

use consul_smi_core as core;

use crate::smi::WireError;
use crate::v1;

/// The largest Apply/Sync message, agreed by the translator (encoding) and the writer
/// (decoding): a Sync carries the whole desired state, which passes tonic's 4 MiB default at
/// about 10k intentions with long provenance descriptions.
pub const WRITER_MESSAGE_LIMIT: usize = 64 * 1024 * 1024;

fn wire_error(object: &str, field: &str, problem: impl Into<String>) -> WireError {
    WireError {
        object: object.to_string(),
        field: field.to_string(),
        problem: problem.into(),
    }
}

// ---- names and keys ----------------------------------------------------------------------

impl From<&core::ServiceName> for v1::ServiceName {
    fn from(service: &core::ServiceName) -> Self {
        v1::ServiceName {
            namespace: service.namespace.clone(),
            name: service.name.clone(),
        }
    }
}

/// Reads a required `ServiceName` field.
pub fn service_from_wire(
    service: Option<&v1::ServiceName>,
    object: &str,
    field: &str,
) -> Result<core::ServiceName, WireError> {
    let service = service.ok_or_else(|| wire_error(object, field, "missing"))?;
    if service.name.is_empty() {
        return Err(wire_error(
            object,
            &format!("{field}.name"),
            "empty service name",
        ));
    }
    Ok(core::ServiceName {
        namespace: service.namespace.clone(),
        name: service.name.clone(),
    })
}

impl From<&core::IntentionKey> for v1::IntentionKey {
    fn from(key: &core::IntentionKey) -> Self {
        v1::IntentionKey {
            source: Some((&key.source).into()),
            destination: Some((&key.destination).into()),
        }
    }
}

/// Reads a required `IntentionKey` field.
pub fn key_from_wire(
    key: Option<&v1::IntentionKey>,
    object: &str,
    field: &str,
) -> Result<core::IntentionKey, WireError> {
    let key = key.ok_or_else(|| wire_error(object, field, "missing"))?;
    Ok(core::IntentionKey {
        source: service_from_wire(key.source.as_ref(), object, &format!("{field}.source"))?,
        destination: service_from_wire(
            key.destination.as_ref(),
            object,
            &format!("{field}.destination"),
        )?,
    })
}

// ---- actions and permissions ---------------------------------------------------------------

impl From<core::Action> for v1::Action {
    fn from(action: core::Action) -> Self {
        match action {
            core::Action::Allow => v1::Action::Allow,
            core::Action::Deny => v1::Action::Deny,
        }
    }
}

/// Reads a wire `Action` (an `i32` in prost messages).
pub fn action_from_wire(action: i32, object: &str, field: &str) -> Result<core::Action, WireError> {
    match v1::Action::try_from(action) {
        Ok(v1::Action::Allow) => Ok(core::Action::Allow),
        Ok(v1::Action::Deny) => Ok(core::Action::Deny),
        Ok(v1::Action::Unspecified) => Err(wire_error(object, field, "action is unspecified")),
        Err(_) => Err(wire_error(
            object,
            field,
            format!("unknown action {action}"),
        )),
    }
}

impl From<&core::HeaderMatch> for v1::HeaderMatch {
    fn from(header: &core::HeaderMatch) -> Self {
        use v1::header_match::Match;
        let r#match = match &header.kind {
            core::HeaderMatchKind::Present => Match::Present(true),
            core::HeaderMatchKind::Exact(v) => Match::Exact(v.clone()),
            core::HeaderMatchKind::Prefix(v) => Match::Prefix(v.clone()),
            core::HeaderMatchKind::Suffix(v) => Match::Suffix(v.clone()),
            core::HeaderMatchKind::Regex(v) => Match::Regex(v.clone()),
        };
        v1::HeaderMatch {
            name: header.name.clone(),
            invert: header.invert,
            r#match: Some(r#match),
        }
    }
}

fn header_from_wire(
    header: &v1::HeaderMatch,
    object: &str,
    field: &str,
) -> Result<core::HeaderMatch, WireError> {
    use v1::header_match::Match;
    let kind = match &header.r#match {
        Some(Match::Present(true)) => core::HeaderMatchKind::Present,
        Some(Match::Present(false)) => {
            return Err(wire_error(
                object,
                &format!("{field}.present"),
                "present must be true when set",
            ));
        }
        Some(Match::Exact(v)) => core::HeaderMatchKind::Exact(v.clone()),
        Some(Match::Prefix(v)) => core::HeaderMatchKind::Prefix(v.clone()),
        Some(Match::Suffix(v)) => core::HeaderMatchKind::Suffix(v.clone()),
        Some(Match::Regex(v)) => core::HeaderMatchKind::Regex(v.clone()),
        None => return Err(wire_error(object, &format!("{field}.match"), "missing")),
    };
    Ok(core::HeaderMatch {
        name: header.name.clone(),
        kind,
        invert: header.invert,
    })
}

impl From<&core::Permission> for v1::Permission {
    fn from(permission: &core::Permission) -> Self {
        use v1::http_permission::Path;
        let http = &permission.http;
        let path = http.path.as_ref().map(|p| match p {
            core::PathMatch::Exact(p) => Path::PathExact(p.clone()),
            core::PathMatch::Prefix(p) => Path::PathPrefix(p.clone()),
            core::PathMatch::Regex(p) => Path::PathRegex(p.clone()),
        });
        v1::Permission {
            action: v1::Action::from(permission.action) as i32,
            http: Some(v1::HttpPermission {
                methods: http.methods.clone(),
                headers: http.headers.iter().map(Into::into).collect(),
                path,
            }),
        }
    }
}

fn permission_from_wire(
    permission: &v1::Permission,
    object: &str,
    field: &str,
) -> Result<core::Permission, WireError> {
    use v1::http_permission::Path;
    let action = action_from_wire(permission.action, object, &format!("{field}.action"))?;
    let http = match &permission.http {
        None => core::HttpPermission::default(),
        Some(http) => core::HttpPermission {
            path: http.path.as_ref().map(|p| match p {
                Path::PathExact(p) => core::PathMatch::Exact(p.clone()),
                Path::PathPrefix(p) => core::PathMatch::Prefix(p.clone()),
                Path::PathRegex(p) => core::PathMatch::Regex(p.clone()),
            }),
            methods: http.methods.clone(),
            headers: http
                .headers
                .iter()
                .enumerate()
                .map(|(i, h)| header_from_wire(h, object, &format!("{field}.http.headers[{i}]")))
                .collect::<Result<_, _>>()?,
        },
    };
    Ok(core::Permission { action, http })
}

// ---- intentions, splitters, defaults -------------------------------------------------------

impl From<&core::Intention> for v1::Intention {
    fn from(intention: &core::Intention) -> Self {
        let rule = match &intention.rule {
            core::IntentionRule::L4(action) => {
                v1::intention::Rule::Action(v1::Action::from(*action) as i32)
            }
            core::IntentionRule::L7(permissions) => {
                v1::intention::Rule::Permissions(v1::Permissions {
                    permissions: permissions.iter().map(Into::into).collect(),
                })
            }
        };
        v1::Intention {
            key: Some((&intention.key).into()),
            description: intention.description.clone(),
            rule: Some(rule),
        }
    }
}

impl TryFrom<&v1::Intention> for core::Intention {
    type Error = WireError;

    fn try_from(intention: &v1::Intention) -> Result<Self, WireError> {
        let key = key_from_wire(intention.key.as_ref(), "intention", "key")?;
        let object = format!("intention {key}");
        let rule = match &intention.rule {
            Some(v1::intention::Rule::Action(action)) => {
                core::IntentionRule::L4(action_from_wire(*action, &object, "action")?)
            }
            Some(v1::intention::Rule::Permissions(p)) => core::IntentionRule::L7(
                p.permissions
                    .iter()
                    .enumerate()
                    .map(|(i, p)| permission_from_wire(p, &object, &format!("permissions[{i}]")))
                    .collect::<Result<_, _>>()?,
            ),
            None => {
                return Err(wire_error(
                    &object,
                    "rule",
                    "missing: set action or permissions",
                ));
            }
        };
        Ok(core::Intention {
            key,
            rule,
            description: intention.description.clone(),
        })
    }
}

impl From<&core::ServiceSplitter> for v1::ServiceSplitter {
    fn from(splitter: &core::ServiceSplitter) -> Self {
        v1::ServiceSplitter {
            service: Some((&splitter.service).into()),
            splits: splitter
                .splits
                .iter()
                .map(|s| v1::Split {
                    weight: s.weight,
                    service: s.service.clone(),
                    namespace: s.namespace.clone(),
                })
                .collect(),
        }
    }
}

impl TryFrom<&v1::ServiceSplitter> for core::ServiceSplitter {
    type Error = WireError;

    fn try_from(splitter: &v1::ServiceSplitter) -> Result<Self, WireError> {
        let service = service_from_wire(splitter.service.as_ref(), "service-splitter", "service")?;
        let object = format!("service-splitter/{}", service.name);
        let splits = splitter
            .splits
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // Weights are percentages; NaN would reach Consul as `null` (serde_json).
                if !s.weight.is_finite() || !(0.0..=100.0).contains(&s.weight) {
                    return Err(WireError::new(
                        &object,
                        &format!("splits[{i}].weight"),
                        format!("{} is not a percentage between 0 and 100", s.weight),
                    ));
                }
                if s.service.is_empty() {
                    return Err(WireError::new(
                        &object,
                        &format!("splits[{i}].service"),
                        "empty service name",
                    ));
                }
                Ok(core::Split {
                    weight: s.weight,
                    service: s.service.clone(),
                    namespace: s.namespace.clone(),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(core::ServiceSplitter { service, splits })
    }
}

impl From<&core::ServiceDefaults> for v1::ServiceDefaults {
    fn from(defaults: &core::ServiceDefaults) -> Self {
        v1::ServiceDefaults {
            service: Some((&defaults.service).into()),
            protocol: defaults.protocol.clone(),
        }
    }
}

impl TryFrom<&v1::ServiceDefaults> for core::ServiceDefaults {
    type Error = WireError;

    fn try_from(defaults: &v1::ServiceDefaults) -> Result<Self, WireError> {
        let service = service_from_wire(defaults.service.as_ref(), "service-defaults", "service")?;
        if defaults.protocol.is_empty() {
            return Err(wire_error(
                &format!("service-defaults {service}"),
                "protocol",
                "empty",
            ));
        }
        Ok(core::ServiceDefaults {
            service,
            protocol: defaults.protocol.clone(),
        })
    }
}

// ---- commands and states -------------------------------------------------------------------

impl From<&core::Command> for v1::command::Command {
    fn from(command: &core::Command) -> Self {
        use v1::command::Command as W;
        match command {
            core::Command::UpsertIntention(i) => W::UpsertIntention(i.into()),
            core::Command::DeleteIntention(k) => W::DeleteIntention(k.into()),
            core::Command::UpsertSplitter(s) => W::UpsertSplitter(s.into()),
            core::Command::DeleteSplitter(s) => W::DeleteSplitter(s.into()),
            core::Command::UpsertServiceDefaults(d) => W::UpsertServiceDefaults(d.into()),
            core::Command::DeleteServiceDefaults(s) => W::DeleteServiceDefaults(s.into()),
        }
    }
}

/// A wire command with the sender's id (and no trace context; set `trace` afterwards).
pub fn command_to_wire(id: impl Into<String>, command: &core::Command) -> v1::Command {
    v1::Command {
        id: id.into(),
        trace: None,
        command: Some(command.into()),
        ..Default::default()
    }
}

impl TryFrom<&v1::Command> for core::Command {
    type Error = WireError;

    fn try_from(command: &v1::Command) -> Result<Self, WireError> {
        use v1::command::Command as W;
        let object = format!("command {:?}", command.id);
        let prefix = |e: WireError| WireError {
            object: format!("{object}: {}", e.object),
            ..e
        };
        Ok(match &command.command {
            Some(W::UpsertIntention(i)) => {
                core::Command::UpsertIntention(i.try_into().map_err(prefix)?)
            }
            Some(W::DeleteIntention(k)) => {
                core::Command::DeleteIntention(key_from_wire(Some(k), &object, "delete_intention")?)
            }
            Some(W::UpsertSplitter(s)) => {
                core::Command::UpsertSplitter(s.try_into().map_err(prefix)?)
            }
            Some(W::DeleteSplitter(s)) => core::Command::DeleteSplitter(service_from_wire(
                Some(s),
                &object,
                "delete_splitter",
            )?),
            Some(W::UpsertServiceDefaults(d)) => {
                core::Command::UpsertServiceDefaults(d.try_into().map_err(prefix)?)
            }
            Some(W::DeleteServiceDefaults(s)) => core::Command::DeleteServiceDefaults(
                service_from_wire(Some(s), &object, "delete_service_defaults")?,
            ),
            None => return Err(wire_error(&object, "command", "missing")),
        })
    }
}

impl From<&core::DesiredState> for v1::DesiredState {
    fn from(state: &core::DesiredState) -> Self {
        v1::DesiredState {
            intentions: state.intentions.values().map(Into::into).collect(),
            splitters: state.splitters.values().map(Into::into).collect(),
            service_defaults: state.service_defaults.values().map(Into::into).collect(),
        }
    }
}

/// Duplicate keys are an error: the sender's state would be ambiguous.
impl TryFrom<&v1::DesiredState> for core::DesiredState {
    type Error = WireError;

    fn try_from(state: &v1::DesiredState) -> Result<Self, WireError> {
        let mut out = core::DesiredState::default();
        for (i, wire) in state.intentions.iter().enumerate() {
            let intention = core::Intention::try_from(wire).map_err(|e| WireError {
                field: format!("intentions[{i}].{}", e.field),
                ..e
            })?;
            let object = format!("intention {}", intention.key);
            if out
                .intentions
                .insert(intention.key.clone(), intention)
                .is_some()
            {
                return Err(wire_error(
                    &object,
                    &format!("intentions[{i}]"),
                    "duplicate key in desired state",
                ));
            }
        }
        for (i, wire) in state.splitters.iter().enumerate() {
            let splitter = core::ServiceSplitter::try_from(wire).map_err(|e| WireError {
                field: format!("splitters[{i}].{}", e.field),
                ..e
            })?;
            let object = format!("service-splitter {}", splitter.service);
            if out
                .splitters
                .insert(splitter.service.clone(), splitter)
                .is_some()
            {
                return Err(wire_error(
                    &object,
                    &format!("splitters[{i}]"),
                    "duplicate service in desired state",
                ));
            }
        }
        for (i, wire) in state.service_defaults.iter().enumerate() {
            let defaults = core::ServiceDefaults::try_from(wire).map_err(|e| WireError {
                field: format!("service_defaults[{i}].{}", e.field),
                ..e
            })?;
            let object = format!("service-defaults {}", defaults.service);
            if out
                .service_defaults
                .insert(defaults.service.clone(), defaults)
                .is_some()
            {
                return Err(wire_error(
                    &object,
                    &format!("service_defaults[{i}]"),
                    "duplicate service in desired state",
                ));
            }
        }
        Ok(out)
    }
}

// ---- outcomes ------------------------------------------------------------------------------

impl From<core::Outcome> for v1::Outcome {
    fn from(outcome: core::Outcome) -> Self {
        match outcome {
            core::Outcome::Applied => v1::Outcome::Applied,
            core::Outcome::Unchanged => v1::Outcome::Unchanged,
            core::Outcome::Conflict => v1::Outcome::Conflict,
            core::Outcome::Rejected => v1::Outcome::Rejected,
            core::Outcome::Failed => v1::Outcome::Failed,
        }
    }
}

/// Reads a wire `Outcome`; `None` for unspecified or unknown values.
pub fn outcome_from_wire(outcome: i32) -> Option<core::Outcome> {
    match v1::Outcome::try_from(outcome).ok()? {
        v1::Outcome::Applied => Some(core::Outcome::Applied),
        v1::Outcome::Unchanged => Some(core::Outcome::Unchanged),
        v1::Outcome::Conflict => Some(core::Outcome::Conflict),
        v1::Outcome::Rejected => Some(core::Outcome::Rejected),
        v1::Outcome::Failed => Some(core::Outcome::Failed),
        v1::Outcome::Unspecified => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_state() -> core::DesiredState {
        let key = core::IntentionKey {
            source: core::ServiceName::in_namespace("team-a", "web"),
            destination: core::ServiceName::new("api"),
        };
        let l7 = core::Intention {
            key: key.clone(),
            rule: core::IntentionRule::L7(vec![core::Permission {
                action: core::Action::Allow,
                http: core::HttpPermission {
                    path: Some(core::PathMatch::Prefix("/v1".into())),
                    methods: vec!["GET".into()],
                    headers: vec![
                        core::HeaderMatch {
                            name: "x-a".into(),
                            kind: core::HeaderMatchKind::Present,
                            invert: false,
                        },
                        core::HeaderMatch {
                            name: "x-b".into(),
                            kind: core::HeaderMatchKind::Regex("a.*".into()),
                            invert: true,
                        },
                    ],
                },
            }]),
            description: "tt/a".into(),
        };
        let l4_key = core::IntentionKey {
            source: core::ServiceName::new("*"),
            destination: core::ServiceName::new("db"),
        };
        let l4 = core::Intention {
            key: l4_key.clone(),
            rule: core::IntentionRule::L4(core::Action::Deny),
            description: String::new(),
        };
        let mut state = core::DesiredState::default();
        state.intentions.insert(key, l7);
        state.intentions.insert(l4_key, l4);
        let web = core::ServiceName::new("web");
        state.splitters.insert(
            web.clone(),
            core::ServiceSplitter {
                service: web.clone(),
                splits: vec![
                    core::Split {
                        weight: 33.3,
                        service: "web-v1".into(),
                        namespace: None,
                    },
                    core::Split {
                        weight: 66.7,
                        service: "web-v2".into(),
                        namespace: Some("ns".into()),
                    },
                ],
            },
        );
        state.service_defaults.insert(
            web.clone(),
            core::ServiceDefaults {
                service: web,
                protocol: "http".into(),
            },
        );
        state
    }

    #[test]
    fn desired_state_round_trips() {
        let state = sample_state();
        let wire = v1::DesiredState::from(&state);
        assert_eq!(core::DesiredState::try_from(&wire).unwrap(), state);
    }

    #[test]
    fn commands_round_trip() {
        let state = sample_state();
        let mut commands: Vec<core::Command> = state
            .intentions
            .values()
            .cloned()
            .map(core::Command::UpsertIntention)
            .collect();
        commands.extend(
            state
                .intentions
                .keys()
                .cloned()
                .map(core::Command::DeleteIntention),
        );
        commands.extend(
            state
                .splitters
                .values()
                .cloned()
                .map(core::Command::UpsertSplitter),
        );
        commands.extend(
            state
                .splitters
                .keys()
                .cloned()
                .map(core::Command::DeleteSplitter),
        );
        commands.extend(
            state
                .service_defaults
                .values()
                .cloned()
                .map(core::Command::UpsertServiceDefaults),
        );
        commands.extend(
            state
                .service_defaults
                .keys()
                .cloned()
                .map(core::Command::DeleteServiceDefaults),
        );
        for (i, command) in commands.iter().enumerate() {
            let wire = command_to_wire(format!("c{i}"), command);
            assert_eq!(&core::Command::try_from(&wire).unwrap(), command);
        }
    }

    #[test]
    fn bad_wire_messages_name_the_field() {
        let wire = v1::Command {
            id: "c7".into(),
            trace: None,
            command: None,
            ..Default::default()
        };
        let err = core::Command::try_from(&wire).unwrap_err();
        assert_eq!(err.field, "command");
        assert!(err.object.contains("c7"));

        let mut intention = v1::Intention::from(sample_state().intentions.values().next().unwrap());
        intention.rule = Some(v1::intention::Rule::Action(0));
        let err = core::Intention::try_from(&intention).unwrap_err();
        assert_eq!(err.field, "action");
        assert!(err.to_string().contains("unspecified"), "{err}");

        intention.key.as_mut().unwrap().destination = None;
        let err = core::Intention::try_from(&intention).unwrap_err();
        assert_eq!(err.field, "key.destination");

        let mut state = v1::DesiredState::from(&sample_state());
        state.intentions.push(state.intentions[0].clone());
        let err = core::DesiredState::try_from(&state).unwrap_err();
        assert!(err.problem.contains("duplicate"), "{err}");
    }

    #[test]
    fn outcomes_round_trip() {
        for outcome in [
            core::Outcome::Applied,
            core::Outcome::Unchanged,
            core::Outcome::Conflict,
            core::Outcome::Rejected,
            core::Outcome::Failed,
        ] {
            assert_eq!(
                outcome_from_wire(v1::Outcome::from(outcome) as i32),
                Some(outcome)
            );
        }
        assert_eq!(outcome_from_wire(0), None);
    }
}
