//! What a coordinator decodes: worker replies, run and status requests.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrix_proto::{
    Ack, Acks, Heartbeat, RunRequest, StatusRequest, StepOutcome, WireError, decode, peek_kind,
};

fuzz_target!(|data: &[u8]| {
    let _ = peek_kind(data);
    let _ = decode::<Ack>(data);
    if let Ok(acks) = decode::<Acks>(data) {
        let _ = acks.acks().count();
    }
    let _ = decode::<Heartbeat>(data);
    let _ = decode::<StepOutcome>(data);
    let _ = decode::<WireError>(data);
    let _ = decode::<StatusRequest>(data);
    if let Ok(req) = decode::<RunRequest>(data) {
        // The input is opaque bytes; reading it as a value must not panic either.
        let _ = req.input.decode::<serde_json_free::Value>();
    }
});

/// A self-describing value without pulling serde_json into the fuzz build.
mod serde_json_free {
    use serde::de::{Deserialize, Deserializer, IgnoredAny};
    pub struct Value;
    impl<'de> Deserialize<'de> for Value {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            IgnoredAny::deserialize(d).map(|_| Value)
        }
    }
}
