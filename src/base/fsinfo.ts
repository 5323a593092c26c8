// What the file system under a path is and has free: read by sizing, registration and scratch space.
import { statfsSync } from "node:fs";

/** statfs f_type of tmpfs and ramfs: files there are already in RAM, so pinning them in place copies nothing. */
const RAM_FS_TYPES = new Set([0x01021994, 0x858458f6]);

export function onRamFs(path: string): boolean {
  try {
    return RAM_FS_TYPES.has(Number(statfsSync(path).type));
  } catch {
    return false;
  }
}

/** Bytes free for us in the file system holding dir; undefined when it cannot be read. */
export function freeBytesIn(dir: string): number | undefined {
  try {
    const st = statfsSync(dir);
    return Number(st.bavail) * Number(st.bsize);
  } catch {
    return undefined;
  }
}
