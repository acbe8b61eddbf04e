//! The `traceparent` header, which any publisher can set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use orchestrix_proto::TraceParent;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data)
        && let Some(tp) = TraceParent::parse(s)
    {
        assert_eq!(TraceParent::parse(&tp.to_string()), Some(tp));
    }
});
