import { describe, expect, test } from "bun:test";
import { type HostPart, clusterDigests } from "../../src/cluster/plan";

const part = (host: number, tensors: { name: string; digest?: string }[]): HostPart => ({
  host,
  firstRank: host,
  ndev: 1,
  freeBytes: 1 << 30,
  version: 1,
  files: [{ path: `/dev/shm/h${host}`, tensors: tensors.map((t, i) => ({ ...t, dtype: "BF16", shape: [2], nbytes: 4, offset: 8 * i })) }],
});

describe("clusterDigests", () => {
  test("gathers every host's tensors' digests into one map", () => {
    expect(clusterDigests([part(0, [{ name: "a", digest: "01" }]), part(1, [{ name: "b", digest: "02" }, { name: "c", digest: "03" }])])).toEqual({ a: "01", b: "02", c: "03" });
  });

  test("a host that registered without digests leaves nothing to verify against", () => {
    expect(clusterDigests([part(0, [{ name: "a", digest: "01" }]), part(1, [{ name: "b" }])])).toBeUndefined();
  });
});
