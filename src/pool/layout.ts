// A pool's layout: tensor names, dtypes and shapes, each placed at a 256-aligned offset of one slot
// (largest first). Every version of the pool keeps it. Pure: plain data in, plain data out.
import { InputError } from "../base/errors";
import { formatShape, tensorBytes } from "../checkpoint/safetensors";

export interface LayoutTensor {
  name: string;
  dtype: string;
  shape: number[];
}

export interface PlacedTensor extends LayoutTensor {
  /** bytes from the start of the slot */
  offset: number;
  nbytes: number;
}

export interface Layout {
  tensors: PlacedTensor[];
  /** a slot's size: the last tensor's end, aligned */
  bytes: number;
}

/** Tensors start 256-aligned, as in buckets: a trainer's D2H and ce's H2D both get aligned addresses. */
export const LAYOUT_ALIGN = 256;

/**
 * Places tensors largest first, ties in the order given, and lists them in that order (their
 * offsets ascend). A push writes a slot in offset order and the update streams behind it, so what
 * arrives last is the update's tail: its H2D and its digests wait for nothing else. Qwen3-8B's
 * lm_head (1.2 GB) last in a state dict would make that tail a whole bucket's; placed first, the
 * tail is a few small tensors. Refuses an empty list, a duplicate name, an unknown dtype or a bad shape.
 */
export function placeLayout(tensors: LayoutTensor[]): Layout {
  if (tensors.length === 0) throw new InputError("E_POOL_LAYOUT", "the layout holds no tensors");
  const seen = new Set<string>();
  const sized: { t: LayoutTensor; nbytes: number }[] = [];
  for (const [i, t] of tensors.entries()) {
    if (typeof t.name !== "string" || t.name === "") throw new InputError("E_POOL_LAYOUT", `layout tensor ${i} has no name`);
    if (seen.has(t.name)) throw new InputError("E_POOL_LAYOUT", `tensor ${t.name} is in the layout twice`);
    seen.add(t.name);
    const nbytes = Array.isArray(t.shape) && t.shape.every((d) => Number.isSafeInteger(d) && d >= 0) ? tensorBytes(t.dtype, t.shape) : undefined;
    if (nbytes === undefined) {
      throw new InputError("E_POOL_LAYOUT", `tensor ${t.name}: dtype ${JSON.stringify(t.dtype)} with shape ${JSON.stringify(t.shape)} is not a tensor ce can hold`, {
        hint: "dtypes are safetensors' names (BF16, F16, F32, F8_E4M3, I64, ...); shapes are lists of whole numbers",
      });
    }
    sized.push({ t, nbytes });
  }
  const placed: PlacedTensor[] = [];
  let at = 0;
  for (const { t, nbytes } of sized.sort((a, b) => b.nbytes - a.nbytes)) {
    placed.push({ name: t.name, dtype: t.dtype, shape: [...t.shape], offset: at, nbytes });
    at = Math.ceil((at + nbytes) / LAYOUT_ALIGN) * LAYOUT_ALIGN;
  }
  return { tensors: placed, bytes: Math.max(at, LAYOUT_ALIGN) };
}

/** Where `other` departs from the layout, in the layout's order: the first differing tensor, in words; undefined when equal. */
export function layoutDifference(layout: LayoutTensor[], other: LayoutTensor[]): string | undefined {
  const theirs = new Map(other.map((t) => [t.name, t]));
  for (const t of layout) {
    const o = theirs.get(t.name);
    if (!o) return `tensor ${t.name} is missing (the pool's layout has it, ${t.dtype} ${formatShape(t.shape)})`;
    if (o.dtype !== t.dtype) return `tensor ${t.name} is ${o.dtype}, the pool's layout has ${t.dtype}`;
    if (formatShape(o.shape) !== formatShape(t.shape)) return `tensor ${t.name} has shape ${formatShape(o.shape)}, the pool's layout has ${formatShape(t.shape)}`;
  }
  const mine = new Set(layout.map((t) => t.name));
  const extra = other.find((t) => !mine.has(t.name));
  if (extra) return `tensor ${extra.name} is not in the pool's layout`;
  return undefined;
}
