/**
 * A small MessagePack writer with the canonical rules of the Orchestrix wire
 * protocol v2: map keys in insertion order, `undefined` entries omitted,
 * integers in their smallest encoding, other numbers as float64, `F64`
 * values always as float64 (the Rust side writes `f64` fields that way even
 * when they are integral, and the flow version hash depends on it), strings
 * as `str`, `Uint8Array` as `bin`.
 *
 * Reading uses `@msgpack/msgpack`, which accepts any valid encoding.
 */

/** A number that is always written as a MessagePack float64. */
export class F64 {
  constructor(readonly value: number) {}
}

export type Encodable =
  | null
  | undefined
  | boolean
  | number
  | bigint
  | string
  | Uint8Array
  | F64
  | readonly Encodable[]
  | { readonly [key: string]: Encodable };

export class EncodeError extends Error {
  override name = "EncodeError";
}

class Writer {
  private buf: Uint8Array = new Uint8Array(256);
  private view: DataView = new DataView(this.buf.buffer);
  private pos = 0;

  private ensure(n: number): void {
    if (this.pos + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.pos + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.pos));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }

  u8(b: number): void {
    this.ensure(1);
    this.buf[this.pos++] = b;
  }
  u16(n: number): void {
    this.ensure(2);
    this.view.setUint16(this.pos, n);
    this.pos += 2;
  }
  u32(n: number): void {
    this.ensure(4);
    this.view.setUint32(this.pos, n);
    this.pos += 4;
  }
  u64(n: bigint): void {
    this.ensure(8);
    this.view.setBigUint64(this.pos, n);
    this.pos += 8;
  }
  i64(n: bigint): void {
    this.ensure(8);
    this.view.setBigInt64(this.pos, n);
    this.pos += 8;
  }
  f64(n: number): void {
    this.ensure(9);
    this.buf[this.pos++] = 0xcb;
    this.view.setFloat64(this.pos, n);
    this.pos += 8;
  }
  bytes(b: Uint8Array): void {
    this.ensure(b.length);
    this.buf.set(b, this.pos);
    this.pos += b.length;
  }
  finish(): Uint8Array {
    return this.buf.slice(0, this.pos);
  }
}

const utf8 = new TextEncoder();

function writeInt(w: Writer, n: bigint): void {
  if (n >= 0n) {
    if (n < 128n) w.u8(Number(n));
    else if (n < 256n) {
      w.u8(0xcc);
      w.u8(Number(n));
    } else if (n < 65536n) {
      w.u8(0xcd);
      w.u16(Number(n));
    } else if (n < 4294967296n) {
      w.u8(0xce);
      w.u32(Number(n));
    } else if (n < 18446744073709551616n) {
      w.u8(0xcf);
      w.u64(n);
    } else throw new EncodeError(`integer ${n} does not fit in 64 bits`);
  } else {
    if (n >= -32n) w.u8(Number(n) & 0xff);
    else if (n >= -128n) {
      w.u8(0xd0);
      w.u8(Number(n) & 0xff);
    } else if (n >= -32768n) {
      w.u8(0xd1);
      w.u16(Number(n) & 0xffff);
    } else if (n >= -2147483648n) {
      w.u8(0xd2);
      w.u32(Number(n) >>> 0);
    } else if (n >= -9223372036854775808n) {
      w.u8(0xd3);
      w.i64(n);
    } else throw new EncodeError(`integer ${n} does not fit in 64 bits`);
  }
}

function writeStr(w: Writer, s: string): void {
  const b = utf8.encode(s);
  const n = b.length;
  if (n < 32) w.u8(0xa0 | n);
  else if (n < 256) {
    w.u8(0xd9);
    w.u8(n);
  } else if (n < 65536) {
    w.u8(0xda);
    w.u16(n);
  } else {
    w.u8(0xdb);
    w.u32(n);
  }
  w.bytes(b);
}

function writeValue(w: Writer, v: Encodable, path: string): void {
  if (v === null || v === undefined) return w.u8(0xc0);
  if (v === true) return w.u8(0xc3);
  if (v === false) return w.u8(0xc2);
  if (typeof v === "number") {
    if (Number.isSafeInteger(v)) return writeInt(w, BigInt(v));
    if (Number.isNaN(v) || !Number.isFinite(v) || !Number.isInteger(v)) return w.f64(v);
    // An integer beyond 2^53: exact as a bigint.
    return writeInt(w, BigInt(v));
  }
  if (typeof v === "bigint") return writeInt(w, v);
  if (typeof v === "string") return writeStr(w, v);
  if (v instanceof F64) return w.f64(v.value);
  if (v instanceof Uint8Array) {
    const n = v.length;
    if (n < 256) {
      w.u8(0xc4);
      w.u8(n);
    } else if (n < 65536) {
      w.u8(0xc5);
      w.u16(n);
    } else {
      w.u8(0xc6);
      w.u32(n);
    }
    return w.bytes(v);
  }
  if (Array.isArray(v)) {
    const n = v.length;
    if (n < 16) w.u8(0x90 | n);
    else if (n < 65536) {
      w.u8(0xdc);
      w.u16(n);
    } else {
      w.u8(0xdd);
      w.u32(n);
    }
    v.forEach((item, i) => writeValue(w, item as Encodable, `${path}[${i}]`));
    return;
  }
  if (typeof v === "object") {
    const entries = Object.entries(v as Record<string, Encodable>).filter(([, x]) => x !== undefined);
    const n = entries.length;
    if (n < 16) w.u8(0x80 | n);
    else if (n < 65536) {
      w.u8(0xde);
      w.u16(n);
    } else {
      w.u8(0xdf);
      w.u32(n);
    }
    for (const [k, x] of entries) {
      writeStr(w, k);
      writeValue(w, x, `${path}.${k}`);
    }
    return;
  }
  throw new EncodeError(`cannot encode ${typeof v} at ${path || "the top"}`);
}

/** Encodes `value` canonically (see the module's doc). */
export function encodeCanonical(value: Encodable): Uint8Array {
  const w = new Writer();
  writeValue(w, value, "");
  return w.finish();
}

/** FNV-1a 64 over `bytes`, as 16 lowercase hex digits. */
export function fnv1a64Hex(bytes: Uint8Array): string {
  let h = 0xcbf29ce484222325n;
  const prime = 0x100000001b3n;
  const mask = 0xffffffffffffffffn;
  for (const b of bytes) {
    h ^= BigInt(b);
    h = (h * prime) & mask;
  }
  return h.toString(16).padStart(16, "0");
}
