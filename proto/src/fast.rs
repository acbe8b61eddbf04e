//! Hand-written readers and writers for the messages every step carries
//! (the command, its ack or acks, its outcome), in the layout
//! [`crate::encode`] writes (the writers make the same bytes as serde).
//!
//! Through serde a command cost about 7,000 instructions to decode (every
//! key a string to validate and match, every name a `String` turned into an
//! `Arc<str>`); read here by position in the map, it costs a fraction of
//! that. These readers accept only what they are sure of: a key they do not
//! know, a key twice, a marker other than the one `encode` writes, bytes
//! left over — anything else and they answer `None`, and the message goes
//! through serde as before, which decodes it or names what is wrong. So they
//! change how fast a message is read, never what it reads as (the tests
//! check that against serde on every message and on damaged copies of them).

use std::sync::Arc;
use std::time::Duration;

use uuid::Uuid;

use crate::messages::{Ack, Acked, Acks, CommandKind, OutcomeResult, StepFailure};
use crate::{Payload, StepCommand, StepOutcome, StepOutput};

/// A MessagePack reader over a slice; every method consumes one value.
struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn map(&mut self) -> Option<u32> {
        rmp::decode::read_map_len(&mut self.0).ok()
    }

    fn array(&mut self) -> Option<u32> {
        rmp::decode::read_array_len(&mut self.0).ok()
    }

    /// A `str`'s bytes, not yet checked to be UTF-8 (rmp's own reader
    /// checks every one, keys included, at ~150 instructions a string).
    fn raw_str(&mut self) -> Option<&'a [u8]> {
        let (&marker, rest) = self.0.split_first()?;
        let (len, rest) = match marker {
            0xa0..=0xbf => (usize::from(marker & 0x1f), rest),
            0xd9 => (usize::from(*rest.first()?), rest.get(1..)?),
            0xda => {
                (usize::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)), rest.get(2..)?)
            }
            0xdb => {
                let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
                (usize::try_from(len).ok()?, rest.get(4..)?)
            }
            _ => return None,
        };
        if rest.len() < len {
            return None;
        }
        let (bytes, rest) = rest.split_at(len);
        self.0 = rest;
        Some(bytes)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.raw_str()?).ok()
    }

    fn u64(&mut self) -> Option<u64> {
        rmp::decode::read_int(&mut self.0).ok()
    }

    fn u32(&mut self) -> Option<u32> {
        u32::try_from(self.u64()?).ok()
    }

    fn bool(&mut self) -> Option<bool> {
        rmp::decode::read_bool(&mut self.0).ok()
    }

    /// Consumes a `nil` if one comes next.
    fn nil(&mut self) -> bool {
        match self.0.split_first() {
            Some((0xc0, rest)) => {
                self.0 = rest;
                true
            }
            _ => false,
        }
    }

    fn opt_u64(&mut self) -> Option<Option<u64>> {
        if self.nil() { Some(None) } else { self.u64().map(Some) }
    }

    fn uuid(&mut self) -> Option<Uuid> {
        // What `Uuid::parse_str` accepts, without the UTF-8 check first.
        Uuid::try_parse_ascii(self.raw_str()?).ok()
    }

    fn name(&mut self) -> Option<Arc<str>> {
        self.str().map(Arc::from)
    }

    fn payload(&mut self) -> Option<Payload> {
        let len = usize::try_from(rmp::decode::read_bin_len(&mut self.0).ok()?).ok()?;
        if self.0.len() < len {
            return None;
        }
        let (bytes, rest) = self.0.split_at(len);
        self.0 = rest;
        Some(Payload::from_bin(bytes))
    }

    fn kind(&mut self) -> Option<CommandKind> {
        match self.raw_str()? {
            b"execute" => Some(CommandKind::Execute),
            b"compensate" => Some(CommandKind::Compensate),
            _ => None,
        }
    }

    /// Reads a map of `n` entries whose keys are among `keys`, each at most
    /// once, handing each key's index to `field` to read its value.
    fn fields(
        &mut self,
        keys: &[&str],
        mut field: impl FnMut(&mut Self, usize) -> Option<()>,
    ) -> Option<()> {
        let n = self.map()?;
        let mut seen = 0u32;
        for _ in 0..n {
            // Compared as bytes: equal to an ASCII key, it is one.
            let key = self.raw_str()?;
            let i = keys.iter().position(|k| k.as_bytes() == key)?;
            if seen & (1 << i) != 0 {
                return None;
            }
            seen |= 1 << i;
            field(self, i)?;
        }
        Some(())
    }
}

/// The body of an envelope written by [`crate::encode`] for `kind` in this
/// protocol version: `{v, kind, body}` in that order, the body last.
fn body<'a>(bytes: &'a [u8], kind: &str) -> Option<Rd<'a>> {
    let mut rd = Rd(bytes);
    if rd.map()? != 3 || rd.raw_str()? != b"v" || rd.u64()? != u64::from(crate::PROTOCOL_VERSION) {
        return None;
    }
    if rd.raw_str()? != b"kind" || rd.raw_str()? != kind.as_bytes() || rd.raw_str()? != b"body" {
        return None;
    }
    Some(rd)
}

/// The whole input read, nothing left over.
fn done<T>(rd: &Rd<'_>, value: T) -> Option<T> {
    rd.0.is_empty().then_some(value)
}

pub(crate) fn step_command(bytes: &[u8]) -> Option<StepCommand> {
    let mut rd = body(bytes, <StepCommand as crate::Message>::KIND)?;
    const KEYS: [&str; 16] = [
        "commandId",
        "runId",
        "flow",
        "version",
        "step",
        "stepIndex",
        "kind",
        "attempt",
        "input",
        "outputs",
        "timeoutMs",
        "startByMs",
        "deadlineMs",
        "acks",
        "sampled",
        "traceparent",
    ];
    let (mut command_id, mut run_id, mut flow, mut step) = (None, None, None, None);
    let (mut step_index, mut kind, mut attempt, mut input, mut outputs) =
        (None, None, None, None, None);
    let mut version: Arc<str> = Arc::from("");
    let (mut timeout, mut start_by_ms, mut deadline_ms, mut acks) = (None, None, None, false);
    let (mut sampled, mut traceparent) = (None, None);
    rd.fields(&KEYS, |rd, i| {
        match i {
            0 => command_id = Some(rd.uuid()?),
            1 => run_id = Some(rd.uuid()?),
            2 => flow = Some(rd.name()?),
            3 => version = rd.name()?,
            4 => step = Some(rd.name()?),
            5 => step_index = Some(rd.u32()?),
            6 => kind = Some(rd.kind()?),
            7 => attempt = Some(rd.u32()?),
            8 => input = Some(rd.payload()?),
            9 => {
                let n = rd.array()?;
                let mut list = Vec::with_capacity(n.min(64) as usize);
                for _ in 0..n {
                    let (mut step, mut output) = (None, None);
                    rd.fields(&["step", "output"], |rd, i| {
                        match i {
                            0 => step = Some(rd.name()?),
                            _ => output = Some(rd.payload()?),
                        }
                        Some(())
                    })?;
                    list.push(StepOutput { step: step?, output: output? });
                }
                outputs = Some(list);
            }
            10 => timeout = rd.opt_u64()?.map(Duration::from_millis),
            11 => start_by_ms = rd.opt_u64()?,
            12 => deadline_ms = rd.opt_u64()?,
            13 => acks = !rd.nil() && rd.bool()?,
            14 => sampled = if rd.nil() { None } else { Some(rd.bool()?) },
            // Anything but a string or nil: the serde reader, which takes it as absent.
            _ => traceparent = if rd.nil() { None } else { Some(rd.str()?.to_owned()) },
        }
        Some(())
    })?;
    let cmd = StepCommand {
        command_id: command_id?,
        run_id: run_id?,
        flow: flow?,
        version,
        step: step?,
        step_index: step_index?,
        kind: kind?,
        attempt: attempt?,
        input: input?,
        outputs: outputs?,
        timeout,
        start_by_ms,
        deadline_ms,
        acks,
        sampled,
        traceparent,
    };
    done(&rd, cmd)
}

/// `commandId`, `runId`, `attempt` and, where `worker` is wanted, `worker`.
fn ack_fields(rd: &mut Rd<'_>, with_worker: bool) -> Option<(Uuid, Uuid, u32, Option<String>)> {
    let keys: &[&str] = if with_worker {
        &["commandId", "runId", "attempt", "worker"]
    } else {
        &["commandId", "runId", "attempt"]
    };
    let (mut command_id, mut run_id, mut attempt, mut worker) = (None, None, None, None);
    rd.fields(keys, |rd, i| {
        match i {
            0 => command_id = Some(rd.uuid()?),
            1 => run_id = Some(rd.uuid()?),
            2 => attempt = Some(rd.u32()?),
            _ => worker = Some(rd.str()?.to_owned()),
        }
        Some(())
    })?;
    if with_worker && worker.is_none() {
        return None;
    }
    Some((command_id?, run_id?, attempt?, worker))
}

pub(crate) fn ack(bytes: &[u8]) -> Option<Ack> {
    let mut rd = body(bytes, <Ack as crate::Message>::KIND)?;
    let (command_id, run_id, attempt, worker) = ack_fields(&mut rd, true)?;
    done(&rd, Ack { command_id, run_id, attempt, worker: worker? })
}

pub(crate) fn acks(bytes: &[u8]) -> Option<Acks> {
    let mut rd = body(bytes, <Acks as crate::Message>::KIND)?;
    let (mut worker, mut commands) = (None, None);
    rd.fields(&["worker", "commands"], |rd, i| {
        match i {
            0 => worker = Some(rd.str()?.to_owned()),
            _ => {
                let n = rd.array()?;
                let mut list = Vec::with_capacity(n.min(1024) as usize);
                for _ in 0..n {
                    let (command_id, run_id, attempt, _) = ack_fields(rd, false)?;
                    list.push(Acked { command_id, run_id, attempt });
                }
                commands = Some(list);
            }
        }
        Some(())
    })?;
    done(&rd, Acks { worker: worker?, commands: commands? })
}

pub(crate) fn step_outcome(bytes: &[u8]) -> Option<StepOutcome> {
    let mut rd = body(bytes, <StepOutcome as crate::Message>::KIND)?;
    let (mut command_id, mut run_id, mut attempt, mut kind, mut result) =
        (None, None, None, None, None);
    rd.fields(&["commandId", "runId", "attempt", "kind", "result"], |rd, i| {
        match i {
            0 => command_id = Some(rd.uuid()?),
            1 => run_id = Some(rd.uuid()?),
            2 => attempt = Some(rd.u32()?),
            3 => kind = Some(rd.kind()?),
            _ => result = Some(outcome_result(rd)?),
        }
        Some(())
    })?;
    let outcome = StepOutcome {
        command_id: command_id?,
        run_id: run_id?,
        attempt: attempt?,
        kind: kind?,
        result: result?,
    };
    done(&rd, outcome)
}

fn outcome_result(rd: &mut Rd<'_>) -> Option<OutcomeResult> {
    let (mut ty, mut output, mut message, mut retryable, mut maybe_done) =
        (None, None, None, None, None);
    rd.fields(&["type", "output", "message", "retryable", "maybeDone"], |rd, i| {
        match i {
            0 => ty = Some(rd.raw_str()?),
            1 => output = Some(rd.payload()?),
            2 => message = Some(rd.str()?.to_owned()),
            3 => retryable = Some(rd.bool()?),
            _ => maybe_done = Some(rd.bool()?),
        }
        Some(())
    })?;
    match ty? {
        b"completed" => Some(OutcomeResult::Completed { output: output? }),
        b"failed" => Some(OutcomeResult::Failed(StepFailure {
            message: message?,
            retryable: retryable?,
            maybe_done: maybe_done.unwrap_or(false),
        })),
        _ => None,
    }
}

/// A MessagePack writer into a `Vec`, with rmp's own primitives so that
/// the bytes are those serde's `write_named` makes (a `Vec` never fails a
/// write, hence the discarded results).
struct Wr<'a>(&'a mut Vec<u8>);

impl Wr<'_> {
    fn map(&mut self, len: u32) {
        let _ = rmp::encode::write_map_len(self.0, len);
    }

    fn array(&mut self, len: u32) {
        let _ = rmp::encode::write_array_len(self.0, len);
    }

    fn str(&mut self, s: &str) {
        let _ = rmp::encode::write_str(self.0, s);
    }

    fn uint(&mut self, v: u64) {
        let _ = rmp::encode::write_uint(self.0, v);
    }

    fn opt_uint(&mut self, v: Option<u64>) {
        match v {
            Some(v) => self.uint(v),
            None => {
                let _ = rmp::encode::write_nil(self.0);
            }
        }
    }

    fn bool(&mut self, v: bool) {
        let _ = rmp::encode::write_bool(self.0, v);
    }

    fn bin(&mut self, v: &[u8]) {
        let _ = rmp::encode::write_bin(self.0, v);
    }

    fn uuid(&mut self, id: &Uuid) {
        let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.str(id.hyphenated().encode_lower(&mut buf));
    }

    /// `{v, kind, body: …}`, up to the body.
    fn envelope(&mut self, kind: &str) {
        self.map(3);
        self.str("v");
        self.uint(u64::from(crate::PROTOCOL_VERSION));
        self.str("kind");
        self.str(kind);
        self.str("body");
    }

    fn ids(&mut self, command_id: &Uuid, run_id: &Uuid, attempt: u32) {
        self.str("commandId");
        self.uuid(command_id);
        self.str("runId");
        self.uuid(run_id);
        self.str("attempt");
        self.uint(u64::from(attempt));
    }
}

fn len(n: usize) -> Option<u32> {
    u32::try_from(n).ok()
}

pub(crate) fn write_step_command(c: &StepCommand, buf: &mut Vec<u8>) -> Option<()> {
    let outputs = len(c.outputs.len())?;
    let mut w = Wr(buf);
    w.envelope(<StepCommand as crate::Message>::KIND);
    w.map(
        13 + u32::from(c.acks)
            + u32::from(c.sampled.is_some())
            + u32::from(c.traceparent.is_some()),
    );
    w.str("commandId");
    w.uuid(&c.command_id);
    w.str("runId");
    w.uuid(&c.run_id);
    w.str("flow");
    w.str(&c.flow);
    w.str("version");
    w.str(&c.version);
    w.str("step");
    w.str(&c.step);
    w.str("stepIndex");
    w.uint(u64::from(c.step_index));
    w.str("kind");
    w.str(c.kind.as_str());
    w.str("attempt");
    w.uint(u64::from(c.attempt));
    w.str("input");
    w.bin(c.input.as_bytes());
    w.str("outputs");
    w.array(outputs);
    for o in &c.outputs {
        w.map(2);
        w.str("step");
        w.str(&o.step);
        w.str("output");
        w.bin(o.output.as_bytes());
    }
    w.str("timeoutMs");
    w.opt_uint(c.timeout.map(|d| d.as_millis() as u64));
    w.str("startByMs");
    w.opt_uint(c.start_by_ms);
    w.str("deadlineMs");
    w.opt_uint(c.deadline_ms);
    if c.acks {
        w.str("acks");
        w.bool(true);
    }
    if let Some(sampled) = c.sampled {
        w.str("sampled");
        w.bool(sampled);
    }
    if let Some(tp) = &c.traceparent {
        w.str("traceparent");
        w.str(tp);
    }
    Some(())
}

pub(crate) fn write_ack(a: &Ack, buf: &mut Vec<u8>) -> Option<()> {
    let mut w = Wr(buf);
    w.envelope(<Ack as crate::Message>::KIND);
    w.map(4);
    w.ids(&a.command_id, &a.run_id, a.attempt);
    w.str("worker");
    w.str(&a.worker);
    Some(())
}

pub(crate) fn write_acks(a: &Acks, buf: &mut Vec<u8>) -> Option<()> {
    let commands = len(a.commands.len())?;
    let mut w = Wr(buf);
    w.envelope(<Acks as crate::Message>::KIND);
    w.map(2);
    w.str("worker");
    w.str(&a.worker);
    w.str("commands");
    w.array(commands);
    for c in &a.commands {
        w.map(3);
        w.ids(&c.command_id, &c.run_id, c.attempt);
    }
    Some(())
}

pub(crate) fn write_step_outcome(o: &StepOutcome, buf: &mut Vec<u8>) -> Option<()> {
    let mut w = Wr(buf);
    w.envelope(<StepOutcome as crate::Message>::KIND);
    w.map(5);
    w.ids(&o.command_id, &o.run_id, o.attempt);
    w.str("kind");
    w.str(o.kind.as_str());
    w.str("result");
    match &o.result {
        OutcomeResult::Completed { output } => {
            w.map(2);
            w.str("type");
            w.str("completed");
            w.str("output");
            w.bin(output.as_bytes());
        }
        OutcomeResult::Failed(f) => {
            w.map(3 + u32::from(f.maybe_done));
            w.str("type");
            w.str("failed");
            w.str("message");
            w.str(&f.message);
            w.str("retryable");
            w.bool(f.retryable);
            if f.maybe_done {
                w.str("maybeDone");
                w.bool(true);
            }
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use super::*;
    use crate::codec::decode_serde;
    use crate::{Message, encode};

    fn command(kind: CommandKind, outputs: usize, timeouts: bool) -> StepCommand {
        StepCommand {
            command_id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            flow: "checkout".into(),
            version: if timeouts { "v2".into() } else { "".into() },
            step: "charge-card".into(),
            step_index: 2,
            kind,
            attempt: 3,
            input: Payload::encode(&("order-1", 4200u64)).unwrap(),
            outputs: (0..outputs)
                .map(|i| StepOutput {
                    step: format!("step-{i}").into(),
                    output: if i == 0 { Payload::nil() } else { Payload::encode(&i).unwrap() },
                })
                .collect(),
            timeout: timeouts.then(|| Duration::from_millis(1500)),
            start_by_ms: timeouts.then_some(1_790_000_000_000),
            deadline_ms: timeouts.then_some(1_790_000_001_500),
            acks: timeouts,
            sampled: (!timeouts).then_some(false),
            traceparent: timeouts
                .then(|| "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        }
    }

    fn outcome(result: OutcomeResult) -> StepOutcome {
        StepOutcome {
            command_id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            attempt: 1,
            kind: CommandKind::Compensate,
            result,
        }
    }

    /// Read fast, the message is itself; and any damaged copy the fast
    /// reader accepts, serde reads the same (the fast reader may refuse
    /// more, never read otherwise).
    fn agrees<M: Message + PartialEq + Debug>(msg: &M) {
        let bytes = encode(msg).unwrap();
        // Written by hand, the bytes serde writes.
        let mut serde_bytes = Vec::new();
        rmp_serde::encode::write_named(&mut serde_bytes, &crate::codec::EnvelopeOut::of(msg))
            .unwrap();
        assert_eq!(bytes, serde_bytes, "{}: written differently", M::KIND);
        let mut fast = Vec::new();
        assert!(
            msg.encode_fast(&mut fast).is_some() && fast == bytes,
            "{}: not written by hand",
            M::KIND
        );
        assert_eq!(M::decode_fast(&bytes).as_ref(), Some(msg), "{}", M::KIND);
        assert_eq!(decode_serde::<M>(&bytes).ok().as_ref(), Some(msg));
        let mut damaged = bytes.clone();
        for i in 0..bytes.len() {
            for b in [0x00, 0xc0, 0xff, 0x7f, bytes[i] ^ 1, bytes[i] ^ 0x80, bytes[i] ^ 0x10] {
                damaged[i] = b;
                if let Some(fast) = M::decode_fast(&damaged) {
                    let slow = decode_serde::<M>(&damaged);
                    assert_eq!(slow.ok().as_ref(), Some(&fast), "{} byte {i} = {b:#x}", M::KIND);
                }
            }
            damaged[i] = bytes[i];
        }
        for len in 0..bytes.len() {
            assert!(M::decode_fast(&bytes[..len]).is_none(), "{} cut at {len}", M::KIND);
        }
        let mut longer = bytes.clone();
        longer.push(0xc0);
        assert!(M::decode_fast(&longer).is_none(), "{}: a byte left over", M::KIND);
    }

    #[test]
    fn fast_readers_agree_with_serde() {
        for kind in [CommandKind::Execute, CommandKind::Compensate] {
            for outputs in [0, 1, 3] {
                for timeouts in [false, true] {
                    agrees(&command(kind, outputs, timeouts));
                }
            }
        }
        let (c, r) = (Uuid::now_v7(), Uuid::now_v7());
        agrees(&Ack { command_id: c, run_id: r, attempt: 2, worker: "host-1.4242".into() });
        for n in [0, 1, 5] {
            let commands = (0..n)
                .map(|i| Acked { command_id: Uuid::now_v7(), run_id: r, attempt: i + 1 })
                .collect();
            agrees(&Acks { worker: "w".into(), commands });
        }
        agrees(&outcome(OutcomeResult::Completed { output: Payload::nil() }));
        let output = Payload::encode(&vec!["a"; 40]).unwrap();
        agrees(&outcome(OutcomeResult::Completed { output }));
        for maybe_done in [false, true] {
            let failure =
                StepFailure { message: "card declined".into(), retryable: true, maybe_done };
            agrees(&outcome(OutcomeResult::Failed(failure)));
        }
    }

    #[test]
    fn acks_nil_reads_as_false_both_ways() {
        let mut cmd = command(CommandKind::Execute, 0, true);
        (cmd.sampled, cmd.traceparent) = (None, None);
        let mut bytes = encode(&cmd).unwrap();
        // `acks` is last, written `true` (0xc3): make it nil.
        assert_eq!(bytes.pop(), Some(0xc3));
        bytes.push(0xc0);
        cmd.acks = false;
        assert_eq!(StepCommand::decode_fast(&bytes).as_ref(), Some(&cmd));
        assert_eq!(decode_serde::<StepCommand>(&bytes).ok().as_ref(), Some(&cmd));
    }

    #[test]
    fn what_the_fast_readers_leave_to_serde() {
        let cmd = command(CommandKind::Execute, 1, true);
        // Another protocol version, another kind: serde names the error.
        let mut bytes = encode(&cmd).unwrap();
        assert_eq!(&bytes[1..3], b"\xa1v");
        bytes[3] = 1;
        assert!(StepCommand::decode_fast(&bytes).is_none());
        assert!(matches!(
            crate::decode::<StepCommand>(&bytes),
            Err(crate::CodecError::UnsupportedVersion { found: 1, .. })
        ));
        let outcome_bytes = encode(&outcome(OutcomeResult::Completed { output: Payload::nil() }));
        assert!(StepCommand::decode_fast(&outcome_bytes.unwrap()).is_none());
        // A field this build does not know (a newer peer's): serde skips it.
        #[derive(serde::Serialize)]
        #[serde(rename_all = "camelCase")]
        struct Newer<'a> {
            #[serde(flatten)]
            cmd: &'a StepCommand,
            priority: u8,
        }
        #[derive(serde::Serialize)]
        struct Env<'a> {
            v: u16,
            kind: &'a str,
            body: Newer<'a>,
        }
        let env = Env {
            v: crate::PROTOCOL_VERSION,
            kind: "step.command",
            body: Newer { cmd: &cmd, priority: 1 },
        };
        let newer = rmp_serde::to_vec_named(&env).unwrap();
        assert!(StepCommand::decode_fast(&newer).is_none());
        assert_eq!(crate::decode::<StepCommand>(&newer).unwrap(), cmd);
    }
}
