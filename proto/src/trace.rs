//! W3C trace context (`traceparent`), carried in step commands (and, from
//! older coordinators and on start requests, in NATS headers).
//!
//! A coordinator that traces a run carries its context on the run's
//! commands; one that does not sends none, and a worker that traces then
//! derives the run's trace id from its run id ([`TraceParent::for_run`]), so
//! that a run's spans still share one trace.

use uuid::Uuid;

/// A parsed `traceparent`: version 00, trace id, parent span id, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    /// 16-byte trace id (never all zero).
    pub trace_id: [u8; 16],
    /// 8-byte id of the parent span (never all zero).
    pub span_id: [u8; 8],
    /// Whether the parent was sampled.
    pub sampled: bool,
}

impl TraceParent {
    /// The context of a run: trace id = run id, span id from `span`.
    pub fn for_run(run_id: Uuid, span: u64) -> Self {
        TraceParent {
            trace_id: *run_id.as_bytes(),
            span_id: span.max(1).to_be_bytes(),
            sampled: true,
        }
    }

    /// Parses a `traceparent` header value; `None` if it is not valid version-00 syntax.
    pub fn parse(value: &str) -> Option<Self> {
        // Version 00 has one layout, `00-{32 hex}-{16 hex}-{2 hex}`: read by
        // position (this runs for every command a worker takes).
        let b = value.trim().as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let mut trace_id = [0u8; 16];
        let mut span_id = [0u8; 8];
        let mut flags = [0u8; 1];
        hex_into(&b[3..35], &mut trace_id)?;
        hex_into(&b[36..52], &mut span_id)?;
        hex_into(&b[53..55], &mut flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceParent { trace_id, span_id, sampled: flags[0] & 1 == 1 })
    }
}

impl TraceParent {
    /// The header value, `00-{trace id}-{span id}-{flags}` (55 characters).
    pub fn to_header(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        // Hand-rolled: this runs for every command sent, and `core::fmt` showed in profiles.
        let mut out = Vec::with_capacity(55);
        out.extend_from_slice(b"00-");
        let hex = |out: &mut Vec<u8>, bytes: &[u8]| {
            for b in bytes {
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
        };
        hex(&mut out, &self.trace_id);
        out.push(b'-');
        hex(&mut out, &self.span_id);
        out.extend_from_slice(if self.sampled { b"-01" } else { b"-00" });
        String::from_utf8(out).unwrap_or_default()
    }
}

impl std::fmt::Display for TraceParent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_header())
    }
}

/// Lowercase hex digits into bytes (`hex` is twice as long as `out`).
fn hex_into(hex: &[u8], out: &mut [u8]) -> Option<()> {
    /// Each byte's value as a lowercase hex digit, 0xff if it is not one:
    /// a lookup a digit, and one test for the whole field at the end
    /// (this runs for every command a worker takes).
    const DIGITS: [u8; 256] = {
        let mut t = [0xffu8; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (DIGITS[usize::from(pair[0])], DIGITS[usize::from(pair[1])]);
        bad |= hi | lo;
        *byte = (hi << 4) | lo;
    }
    // A valid digit is below 16; 0xff sets the high bits.
    (bad < 16).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_rejects() {
        let run = Uuid::new_v4();
        let tp = TraceParent::for_run(run, 42);
        let s = tp.to_string();
        assert_eq!(s.len(), 55);
        assert_eq!(TraceParent::parse(&s), Some(tp));
        let unsampled = TraceParent { sampled: false, ..tp };
        assert_eq!(TraceParent::parse(&unsampled.to_header()), Some(unsampled));
        assert_eq!(TraceParent::parse(&format!(" {s} ")), Some(tp), "surrounding blanks");
        assert!(s.starts_with(&format!("00-{}", run.simple())));
        for bad in [
            "",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",
            "00-0af7651916cd43dd8448eb211c8031é-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331--1",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }

    /// A digit pair decodes to its byte when both are lowercase hex
    /// digits, and is refused for any other byte, in either place: all 256
    /// byte values (non-ASCII and NUL included), beside every digit.
    #[test]
    fn each_hex_digit_is_checked() {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for c in 0..=255u8 {
            let value = HEX.iter().position(|&d| d == c);
            for (i, &d) in HEX.iter().enumerate() {
                for (pair, byte) in
                    [([c, d], value.map(|v| v * 16 + i)), ([d, c], value.map(|v| i * 16 + v))]
                {
                    let mut out = [0u8; 1];
                    let got = hex_into(&pair, &mut out).map(|()| usize::from(out[0]));
                    assert_eq!(got, byte, "{pair:?}");
                }
            }
        }
        // And through `parse`: a wrong byte anywhere in the ids or the flags.
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        for at in (3..35).chain(36..52).chain(53..55) {
            let mut b = good.as_bytes().to_vec();
            b[at] = b'g';
            assert_eq!(TraceParent::parse(&String::from_utf8_lossy(&b)), None, "at {at}");
        }
    }
}
