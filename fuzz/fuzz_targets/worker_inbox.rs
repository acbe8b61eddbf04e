//! What a worker decodes: step commands.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrix_proto::{StepCommand, decode, decode_with_limit, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(cmd) = decode::<StepCommand>(data) {
        // Whatever decodes re-encodes and decodes to the same value.
        let again = encode(&cmd).expect("a decoded command encodes");
        assert_eq!(decode::<StepCommand>(&again).expect("round trip"), cmd);
    }
    let _ = decode_with_limit::<StepCommand>(data, 64);
});
