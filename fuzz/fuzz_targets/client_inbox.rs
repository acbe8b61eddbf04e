//! What a client decodes: run replies (reports included).
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrix_proto::{RunReply, decode};

fuzz_target!(|data: &[u8]| {
    if let Ok(RunReply::Report(report)) = decode::<RunReply>(data) {
        // A report read off the wire prints without panicking.
        let _ = report.to_string();
    }
});
