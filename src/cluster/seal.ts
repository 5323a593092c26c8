// Host-to-host messages are sealed with the cluster's shared secret: HMAC-SHA256 over every frame
// and a per-sender counter, so a process without the secret can neither speak for a host nor replay
// what one said. The secret never travels. (ZeroMQ CURVE would also encrypt; the libzmq ce loads is
// not always built with it, and the bytes on this channel are plans and summaries, not weights.)
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";
import { readFileSync, statSync } from "node:fs";
import { InputError } from "../base/errors";

const MAC_BYTES = 32;

export interface SealedHeader {
  /** who sent it: a node rank, or -1 for a client that is not a host */
  from: number;
  /** the sender's incarnation (random per process) and a counter that only grows within it */
  inc: string;
  seq: number;
  [field: string]: unknown;
}

/** The secret from CE_CLUSTER_SECRET, or a file of it (not readable by others). */
export function loadSecret(opts: { secret?: string; secretFile?: string }): Buffer {
  if (opts.secretFile) {
    const mode = statSync(opts.secretFile).mode & 0o077;
    if (mode !== 0) {
      throw new InputError("E_CLUSTER_SECRET", `${opts.secretFile} is readable by others (mode ${(statSync(opts.secretFile).mode & 0o777).toString(8)})`, {
        hint: `chmod 600 ${opts.secretFile}`,
      });
    }
    const s = readFileSync(opts.secretFile, "utf8").trim();
    if (s.length < 16) throw new InputError("E_CLUSTER_SECRET", `${opts.secretFile}: the secret must have at least 16 characters`);
    return Buffer.from(s);
  }
  if (!opts.secret || opts.secret.length < 16) {
    throw new InputError("E_CLUSTER_SECRET", "a cluster needs a shared secret of at least 16 characters", {
      hint: "set CE_CLUSTER_SECRET (the same on every host) or --secret-file FILE",
    });
  }
  return Buffer.from(opts.secret);
}

export class Sealer {
  readonly #key: Buffer;
  readonly #inc = randomBytes(8).toString("hex");
  #seq = 0;
  /** the last counter seen per sender incarnation */
  readonly #seen = new Map<string, number>();

  constructor(key: Buffer) {
    this.#key = key;
  }

  #mac(frames: Uint8Array[]): Buffer {
    const h = createHmac("sha256", this.#key);
    for (const f of frames) {
      const len = Buffer.alloc(8);
      len.writeBigUInt64LE(BigInt(f.byteLength));
      h.update(len);
      h.update(f);
    }
    return h.digest();
  }

  /** [header JSON, ...payload, MAC] */
  seal(from: number, header: Record<string, unknown>, payload: Uint8Array[] = []): Uint8Array[] {
    const frames = [Buffer.from(JSON.stringify({ ...header, from, inc: this.#inc, seq: ++this.#seq })), ...payload];
    return [...frames, this.#mac(frames)];
  }

  /** The header and payload of a sealed message, or undefined when its MAC is wrong or it is a replay. */
  open(frames: Uint8Array[]): { header: SealedHeader; payload: Uint8Array[] } | undefined {
    if (frames.length < 2) return undefined;
    const mac = frames.at(-1)!;
    const body = frames.slice(0, -1);
    if (mac.byteLength !== MAC_BYTES || !timingSafeEqual(Buffer.from(mac), this.#mac(body))) return undefined;
    let header: SealedHeader;
    try {
      header = JSON.parse(Buffer.from(body[0]!).toString("utf8")) as SealedHeader;
    } catch {
      return undefined;
    }
    const key = `${header.from}/${header.inc}`;
    if (!(header.seq > (this.#seen.get(key) ?? 0))) return undefined;
    this.#seen.set(key, header.seq);
    return { header, payload: body.slice(1) };
  }
}
