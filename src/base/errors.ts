// Every failure ce reports is a CeError with a stable code. Modules throw; cli.ts and serve.ts
// catch once and decide how to show it.

export interface CeErrorOptions {
  hint?: string;
  cause?: unknown;
}

export class CeError extends Error {
  readonly code: string;
  readonly hint?: string;

  constructor(code: string, message: string, options: CeErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.hint = options.hint;
  }

  toJSON(): { code: string; message: string; hint?: string } {
    return { code: this.code, message: this.message, ...(this.hint ? { hint: this.hint } : {}) };
  }
}

/** Bad command line: exit 2 and show usage. */
export class UsageError extends CeError {
  constructor(message: string, options: CeErrorOptions = {}) {
    super("E_USAGE", message, options);
  }
}

/** Bad input from the user: a file, a checkpoint, a request body. */
export class InputError extends CeError {}

/** A libce or libzmq call failed; carries the library's own words. */
export class NativeError extends CeError {
  readonly status: number;
  readonly what: string;

  constructor(status: number, statusName: string, what: string, message: string, options: CeErrorOptions = {}) {
    super(statusName, `${what}: ${message}`, options);
    this.status = status;
    this.what = what;
  }
}

/** An inference worker refused an op, died, or never answered. */
export class WorkerError extends CeError {}

/** A deadline passed. */
export class TimeoutError extends CeError {
  constructor(message: string, options: CeErrorOptions = {}) {
    super("E_TIMEOUT", message, options);
  }
}

/** An operation was stopped on purpose (abort requested, another failure elsewhere). */
export class AbortedError extends CeError {
  constructor(message: string, options: CeErrorOptions = {}) {
    super("E_ABORTED", message, options);
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
