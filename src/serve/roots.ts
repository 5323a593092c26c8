// ce serve registers only files under its roots (--root, default /dev/shm): an API caller must not be
// able to make ce read, pin or describe any file the daemon's user can read.
import { realpathSync } from "node:fs";
import { sep } from "node:path";
import { InputError } from "../base/errors";

export function checkUnderRoots(path: string, roots: string[]): void {
  let real: string;
  try {
    // Symbolic links are followed first: a link under a root to a file elsewhere is elsewhere.
    real = realpathSync(path);
  } catch (err) {
    throw new InputError("E_PATH", `${path}: ${(err as Error).message}`);
  }
  const inside = roots.some((root) => {
    let r: string;
    try {
      r = realpathSync(root);
    } catch {
      return false;
    }
    return real === r || real.startsWith(r.endsWith(sep) ? r : r + sep);
  });
  if (!inside) {
    throw new InputError("E_PATH_OUTSIDE_ROOTS", `${path} is outside the roots this daemon serves (${roots.join(", ")})`, {
      hint: "start ce serve with --root naming the directory that holds your checkpoints",
    });
  }
}
