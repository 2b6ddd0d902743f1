//! The writer's request decoders (prost + wire -> Consul commands/state) on arbitrary bytes:
//! never panic, and whatever decodes goes back to the wire and into the domain unchanged.
//!
//! Equality is checked on the Debug form: split weights are `f32`, and the wire accepts NaN
//! (NaN != NaN, yet it round-trips exactly). That NaN, infinite or negative weights decode at
//! all is a validation gap of `consul-smi-grpc` (`TryFrom<&v1::ServiceSplitter>`), not
//! something this target asserts.
#![no_main]

use consul_smi_core::{Command, DesiredState};
use consul_smi_grpc::v1;
use consul_smi_grpc::writer::command_to_wire;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = v1::ApplyRequest::decode(data) {
        for wire in &request.commands {
            if let Ok(command) = Command::try_from(wire) {
                let again = Command::try_from(&command_to_wire(wire.id.clone(), &command))
                    .expect("the wire form of a command decodes");
                assert_eq!(format!("{again:?}"), format!("{command:?}"));
            }
        }
    }
    // The same bytes as a Sync request: the whole desired state in one message.
    if let Ok(request) = v1::SyncRequest::decode(data)
        && let Some(wire) = &request.state
        && let Ok(state) = DesiredState::try_from(wire)
    {
        let again = DesiredState::try_from(&v1::DesiredState::from(&state))
            .expect("the wire form of a state decodes");
        assert_eq!(format!("{again:?}"), format!("{state:?}"));
    }
});
