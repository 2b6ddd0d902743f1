//! The watch-stream decoder (prost + wire -> hub) on arbitrary bytes: never panics, and a
//! decoded object goes back to the wire and into the hub unchanged (the conversion is lossless).
#![no_main]

use consul_smi_api::SmiObject;
use consul_smi_grpc::smi::{HubWatchEvent, WatchChange};
use consul_smi_grpc::v1;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(event) = v1::WatchEvent::decode(data) else {
        return;
    };
    let Ok(hub) = HubWatchEvent::try_from(event) else {
        return;
    };
    if let WatchChange::Applied(object) = &hub.change {
        let wire = v1::SmiObject::from(object);
        let again = SmiObject::try_from(&wire).expect("the wire form of a hub object decodes");
        assert_eq!(&again, object);
    }
});
