// The request bodies ce serve takes, as valibot schemas: a malformed body is refused naming the field
// and what it must be, before anything runs.
import * as v from "valibot";
import { InputError } from "../base/errors";

/** Names travel in URLs and logs: letters, digits and . _ - @ (no slashes, no spaces). */
const name = v.pipe(v.string(), v.regex(/^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$/, "a name of letters, digits and . _ - @ (at most 128)"));
const count = v.pipe(v.number(), v.safeInteger("a whole number"), v.minValue(0, "at least 0"));

export const RegisterBody = v.object({
  name,
  path: v.pipe(v.string(), v.minLength(1, "a path")),
  version: v.optional(count, 1),
});

export const UpdateBody = v.pipe(
  v.object({
    checkpoint: v.optional(name),
    pool: v.optional(name),
    /** of a pool: default its newest published version */
    version: v.optional(count),
    verify: v.optional(v.boolean()),
    /** of a pool: after a failed update, put every engine back on the version it served */
    rollback: v.optional(v.boolean()),
    /** of a pool: true sends a delta from the serving version while it is resident, false every tensor whole (default: ce serve --delta) */
    delta: v.optional(v.boolean()),
    /** of a cluster's checkpoint: only these global ranks (whole hosts) update, reading it by P2P from the hosts that hold it */
    ranks: v.optional(v.pipe(v.array(count), v.minLength(1, "at least one rank"))),
  }),
  v.check((b) => (b.checkpoint === undefined) !== (b.pool === undefined), 'give exactly one of "checkpoint" and "pool"'),
  v.check((b) => b.ranks === undefined || b.checkpoint !== undefined, '"ranks" goes with "checkpoint"'),
);

const layoutTensor = v.object({ name: v.pipe(v.string(), v.minLength(1, "a tensor name")), dtype: v.string(), shape: v.array(count) });

export const PoolBody = v.pipe(
  v.object({
    name,
    /** the tensors in order, or a checkpoint whose headers give them */
    layout: v.optional(v.array(layoutTensor)),
    path: v.optional(v.pipe(v.string(), v.minLength(1, "a path"))),
    slots: v.optional(v.pipe(count, v.minValue(1, "at least 1"), v.maxValue(16, "at most 16")), 2),
  }),
  v.check((b) => (b.layout === undefined) !== (b.path === undefined), 'give exactly one of "layout" and "path"'),
);

export const VersionBody = v.object({
  version: count,
  /** fill the slot from these files (same layout) instead of a trainer's push */
  path: v.optional(v.pipe(v.string(), v.minLength(1, "a path"))),
  /** start updating the engines now, each bucket as soon as its bytes are written */
  update: v.optional(v.boolean(), false),
  verify: v.optional(v.boolean()),
});

export const WrittenBody = v.object({ bytes: count });

export const PublishBody = v.object({ update: v.optional(v.boolean(), false), verify: v.optional(v.boolean()), delta: v.optional(v.boolean()) });

/** The parsed body, or an InputError E_BAD_REQUEST naming each field that is wrong. */
export function parseBody<S extends v.GenericSchema>(schema: S, body: unknown): v.InferOutput<S> {
  const r = v.safeParse(schema, body);
  if (r.success) return r.output;
  const issues = r.issues.map((i) => {
    const path = v.getDotPath(i);
    return path ? `field "${path}": ${i.message}` : i.message;
  });
  throw new InputError("E_BAD_REQUEST", `the request body is not valid: ${issues.join("; ")}`);
}
