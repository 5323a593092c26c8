import unittest

import support  # noqa: F401  (puts ce_worker on the path)

import torch

from ce_worker.loads import apply_patches
from ce_worker.protocol import PatchMeta


def layout(entries):
    """A uint8 buffer holding each (positions, values) pair 256-aligned, and their offsets."""
    chunks, offsets, at = [], [], 0
    for pos, vals in entries:
        for blob in (torch.tensor(pos, dtype=torch.int32).view(torch.uint8), vals.reshape(-1).view(torch.uint8)):
            pad = (-at) % 256
            chunks.append(torch.zeros(pad, dtype=torch.uint8))
            at += pad
            offsets.append(at)
            chunks.append(blob)
            at += blob.numel()
    return torch.cat(chunks), offsets


class ApplyPatchesTest(unittest.TestCase):
    def setUp(self):
        gen = torch.Generator().manual_seed(3)
        self.params = {
            "u8": torch.randint(0, 255, (1001,), dtype=torch.uint8, generator=gen),
            "bf16": torch.randn(40, 33, generator=gen).to(torch.bfloat16),
            "f32": torch.randn(333, generator=gen),
            "i64": torch.randint(-9, 9, (77,), dtype=torch.int64, generator=gen),
        }
        self.dtypes = {"u8": "U8", "bf16": "BF16", "f32": "F32", "i64": "I64"}

    def patch(self, name, positions):
        t = self.params[name]
        values = torch.randint(0, 255, (len(positions) * t.element_size(),), dtype=torch.uint8).view(t.dtype)
        return positions, values

    def test_patches_of_every_element_size_write_exactly_their_elements(self):
        want = {n: t.clone() for n, t in self.params.items()}
        entries, metas = [], []
        for name in self.params:
            n = self.params[name].numel()
            positions = sorted({0, n - 1, n // 3, n // 2})
            entries.append(self.patch(name, positions))
        buf, offsets = layout(entries)
        for k, name in enumerate(self.params):
            positions, values = entries[k]
            flat = want[name].reshape(-1)
            flat[torch.tensor(positions)] = values
            metas.append(PatchMeta(name, self.dtypes[name], tuple(self.params[name].shape), offsets[2 * k], offsets[2 * k + 1], len(positions)))
        apply_patches(self.params, buf, metas)
        for name, t in self.params.items():
            self.assertTrue(torch.equal(t.reshape(-1).view(torch.uint8), want[name].reshape(-1).view(torch.uint8)), name)

    def test_a_position_past_the_tensor_fails_naming_it_and_writes_nothing(self):
        before = {n: t.clone() for n, t in self.params.items()}
        good = self.patch("u8", [1, 2])
        bad = self.patch("f32", [5, 333])
        buf, offsets = layout([good, bad])
        metas = [PatchMeta("u8", "U8", (1001,), offsets[0], offsets[1], 2), PatchMeta("f32", "F32", (333,), offsets[2], offsets[3], 2)]
        with self.assertRaises(IndexError) as caught:
            apply_patches(self.params, buf, metas)
        self.assertEqual(caught.exception.ce_tensor, "f32")
        self.assertIn("positions reach 333", str(caught.exception))
        for name, t in self.params.items():
            self.assertTrue(torch.equal(t, before[name]), name)

    def test_a_patch_for_a_tensor_the_engine_lacks_is_a_key_error_naming_it(self):
        buf, offsets = layout([self.patch("u8", [1])])
        with self.assertRaises(KeyError) as caught:
            apply_patches(self.params, buf, [PatchMeta("nope", "U8", (1001,), offsets[0], offsets[1], 1)])
        self.assertEqual(caught.exception.ce_tensor, "nope")


if __name__ == "__main__":
    unittest.main()
