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

export const UpdateBody = v.object({ checkpoint: name, verify: v.optional(v.boolean()) });

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
