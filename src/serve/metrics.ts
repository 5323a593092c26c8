// ce serve's /metrics: Prometheus text through prom-client (the format's escaping, types and HELP lines
// are the library's job, not ours). One registry per daemon, so tests can run several in one process.
import { Counter, Gauge, Histogram, Registry } from "prom-client";
import type { UpdateSummary } from "../core/report";

export class Metrics {
  readonly registry = new Registry();
  readonly #seconds = new Histogram({
    name: "ce_update_seconds",
    help: "Wall time of a successful update, start to every worker finished",
    buckets: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300],
    registers: [this.registry],
  });
  readonly #bytes = new Counter({ name: "ce_update_bytes_total", help: "Checkpoint bytes delivered by successful updates", registers: [this.registry] });
  readonly #updates = new Counter({ name: "ce_updates_total", help: "Successful updates", registers: [this.registry] });
  readonly #failures = new Counter({ name: "ce_update_failures_total", help: "Failed updates by error code", labelNames: ["code"], registers: [this.registry] });
  readonly #gbps = new Gauge({ name: "ce_update_gbps", help: "Throughput of the last successful update, GB/s (decimal)", registers: [this.registry] });
  readonly #phase = new Gauge({ name: "ce_update_phase_seconds", help: "Phases of the last successful update", labelNames: ["phase"], registers: [this.registry] });
  readonly #registered = new Gauge({ name: "ce_registered_bytes", help: "Bytes of registered checkpoints held in host memory", registers: [this.registry] });
  readonly #pinned = new Gauge({ name: "ce_pinned_bytes", help: "Host memory pinned for the GPUs (in place or copied)", registers: [this.registry] });
  readonly #device = new Gauge({ name: "ce_device_buffer_bytes", help: "Slot and staging buffers held on the devices", registers: [this.registry] });
  readonly #version = new Gauge({ name: "ce_checkpoint_version", help: "Version of each registered checkpoint", labelNames: ["checkpoint"], registers: [this.registry] });
  readonly #hosts = new Gauge({ name: "ce_hosts_up", help: "Hosts of the cluster that answer", registers: [this.registry] });
  readonly #poolBytes = new Gauge({ name: "ce_pool_host_bytes", help: "Pinned host memory of each resident pool (slots × slot size)", labelNames: ["pool"], registers: [this.registry] });
  readonly #poolServing = new Gauge({ name: "ce_pool_serving_version", help: "The version of each pool the engines hold", labelNames: ["pool"], registers: [this.registry] });

  updated(s: Omit<UpdateSummary, "trace">): void {
    this.#seconds.observe(s.seconds);
    this.#bytes.inc(s.bytes);
    this.#updates.inc();
    this.#gbps.set(s.gbps);
    for (const [phase, v] of Object.entries(s.phases)) this.#phase.set({ phase }, v);
  }

  failed(code: string): void {
    this.#failures.inc({ code });
  }

  /** The figures that are read, not counted: set just before each scrape. */
  state(s: {
    registeredBytes: number;
    pinnedBytes: number;
    deviceBytes: number;
    versions: Map<string, number>;
    hostsUp: number;
    pools: { name: string; hostBytes: number; serving: number | undefined }[];
  }): void {
    this.#registered.set(s.registeredBytes);
    this.#pinned.set(s.pinnedBytes);
    this.#device.set(s.deviceBytes);
    this.#version.reset();
    for (const [checkpoint, v] of s.versions) this.#version.set({ checkpoint }, v);
    this.#hosts.set(s.hostsUp);
    this.#poolBytes.reset();
    this.#poolServing.reset();
    for (const p of s.pools) {
      this.#poolBytes.set({ pool: p.name }, p.hostBytes);
      if (p.serving !== undefined) this.#poolServing.set({ pool: p.name }, p.serving);
    }
  }

  text(): Promise<string> {
    return this.registry.metrics();
  }

  get contentType(): string {
    return this.registry.contentType;
  }
}
