//! Differences between desired states, as commands in an order Consul accepts.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use consul_smi_core::{Command, DesiredState};

/// The commands that turn `previous` into `next`.
///
/// Order (deterministic; keys ascending within each step), chosen so that every write is
/// valid at the moment Consul receives it:
/// 1. upsert service-defaults: L7 intentions and splitters require `protocol = http` first;
/// 2. upsert splitters;
/// 3. intention upserts and deletes, interleaved in key order;
/// 4. delete splitters;
/// 5. delete service-defaults: only once nothing that needs http is left.
pub fn diff(previous: &DesiredState, next: &DesiredState) -> Vec<Command> {
    let mut commands = Vec::new();

    for (key, defaults) in &next.service_defaults {
        if previous.service_defaults.get(key) != Some(defaults) {
            commands.push(Command::UpsertServiceDefaults(defaults.clone()));
        }
    }
    for (key, splitter) in &next.splitters {
        if previous.splitters.get(key) != Some(splitter) {
            commands.push(Command::UpsertSplitter(splitter.clone()));
        }
    }
    merge_join(
        &previous.intentions,
        &next.intentions,
        |key, old, new| match (old, new) {
            (Some(_), None) => commands.push(Command::DeleteIntention(key.clone())),
            (old, Some(new)) if old != Some(new) => {
                commands.push(Command::UpsertIntention(new.clone()))
            }
            _ => {}
        },
    );
    for key in previous.splitters.keys() {
        if !next.splitters.contains_key(key) {
            commands.push(Command::DeleteSplitter(key.clone()));
        }
    }
    for key in previous.service_defaults.keys() {
        if !next.service_defaults.contains_key(key) {
            commands.push(Command::DeleteServiceDefaults(key.clone()));
        }
    }
    commands
}

/// Visit the union of both maps' keys in order.
fn merge_join<K: Ord, V>(
    left: &BTreeMap<K, V>,
    right: &BTreeMap<K, V>,
    mut visit: impl FnMut(&K, Option<&V>, Option<&V>),
) {
    let mut left = left.iter().peekable();
    let mut right = right.iter().peekable();
    loop {
        match (left.peek(), right.peek()) {
            (None, None) => break,
            (Some((k, v)), None) => {
                visit(k, Some(v), None);
                left.next();
            }
            (None, Some((k, v))) => {
                visit(k, None, Some(v));
                right.next();
            }
            (Some((lk, lv)), Some((rk, rv))) => match lk.cmp(rk) {
                Ordering::Less => {
                    visit(lk, Some(lv), None);
                    left.next();
                }
                Ordering::Greater => {
                    visit(rk, None, Some(rv));
                    right.next();
                }
                Ordering::Equal => {
                    visit(lk, Some(lv), Some(rv));
                    left.next();
                    right.next();
                }
            },
        }
    }
}

/// Apply `commands` to `state` as a Consul that accepts every command would.
pub fn apply_commands(state: &mut DesiredState, commands: &[Command]) {
    for command in commands {
        match command {
            Command::UpsertIntention(intention) => {
                state
                    .intentions
                    .insert(intention.key.clone(), intention.clone());
            }
            Command::DeleteIntention(key) => {
                state.intentions.remove(key);
            }
            Command::UpsertSplitter(splitter) => {
                state
                    .splitters
                    .insert(splitter.service.clone(), splitter.clone());
            }
            Command::DeleteSplitter(service) => {
                state.splitters.remove(service);
            }
            Command::UpsertServiceDefaults(defaults) => {
                state
                    .service_defaults
                    .insert(defaults.service.clone(), defaults.clone());
            }
            Command::DeleteServiceDefaults(service) => {
                state.service_defaults.remove(service);
            }
        }
    }
}
