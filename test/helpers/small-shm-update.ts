// Runs one CPU-backend update whose slot buffers live in CE_SHM_DIR (a small tmpfs the test
// mounted) while the session is told memory is plentiful, so allocating the planned slots fails
// and the update must fall back to fewer. Prints the summary as JSON.
//   bun small-shm-update.ts CHECKPOINT_DIR BUCKET_BYTES
import { openCheckpoint } from "../../src/checkpoint/checkpoint";
import { WorkersEngine } from "../../src/engines/workers";
import { Ctx } from "../../src/native/ce";
import { register, unregister } from "../../src/checkpoint/registry";
import { UpdateSession } from "../../src/core/update";

const [dir, bucket] = process.argv.slice(2);
const ctx = Ctx.create("cpu", [0]);
const devices = [{ index: 0, ordinal: 0, uuid: "CPU-small-shm-0", name: "cpu", freeBytes: 8 * 1024 ** 3 }];
const engine = new WorkersEngine("ref", "cpu", devices);
const session = new UpdateSession({ ctx, devices, engine, opTimeoutMs: 60_000, verify: true });
try {
  await engine.start(session.endpoints);
  const reg = await register(ctx, await openCheckpoint(dir!), { name: "small-shm", version: 1 });
  const s = await session.update({ reg, bucketBytes: Number(bucket), slots: 3, timeoutMs: 60_000 });
  await unregister(ctx, reg);
  process.stdout.write(`${JSON.stringify({ slots: s.slots, buckets: s.buckets, tensors: s.tensors, fallbacks: s.fallbacks })}\n`);
} finally {
  await session.close();
  ctx.close();
}
