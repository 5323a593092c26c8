"""Tensor digests (docs/digest.md): torch agrees with the pure-Python reference bit for bit."""

import os
import random
import sys
import unittest
from unittest import mock

# Runs as `python3 -m unittest tests.test_digest` from python/ and under discover -s python/tests.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from ce_worker import digest  # noqa: E402
from ce_worker.digest import format_digest, parse_digest, reference_digest, tensor_digest, tensor_digests  # noqa: E402

MASK = (1 << 64) - 1


def random_bytes(n, seed):
    rng = random.Random(seed)
    return bytes(rng.getrandbits(8) for _ in range(n))


def as_tensor(data):
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)


def naive_digest(t):
    """The definition as one int64 expression: relies on torch's int64 wrapping, which the module avoids."""
    b = t.reshape(-1).view(torch.uint8)
    n = b.numel()
    padded = torch.zeros((n + 3) // 4 * 4, dtype=torch.uint8)
    padded[:n] = b
    w = padded.view(torch.int32).to(torch.int64)
    weights = torch.arange(w.numel(), dtype=torch.int64) * 2 + 1
    s = int((w * weights).sum()) & MASK
    return digest.finish(s, n)


class DefinitionTest(unittest.TestCase):
    def test_the_worked_examples_of_the_spec(self):
        for data, hex_ in [(b"", "9ca066f1a4ab2eea"), (b"\x01\x02\x03\x04\x05", "81bc13d290a33acf"),
                           (b"\xff\xff\xff\xff", "62d186e3287b69ff")]:
            with self.subTest(data=data):
                self.assertEqual(format_digest(reference_digest(data)), hex_)
                self.assertEqual(format_digest(tensor_digest(as_tensor(data))), hex_)

    def test_torch_agrees_with_the_reference_on_small_lengths(self):
        for n in list(range(0, 65)) + [1023, 1024, 1025, 8192 * 4 + 3]:
            data = random_bytes(n, n)
            with self.subTest(n=n):
                self.assertEqual(tensor_digest(as_tensor(data)), reference_digest(data))

    def test_every_chunk_shape_in_a_small_geometry(self):
        # 4 x 8-word chunks, 2 per piece: whole pieces, a short piece, whole rows, a last row, a byte tail
        with mock.patch.multiple(digest, ROWS=4, COLS=8, CHUNK_WORDS=32, PIECE_CHUNKS=2):
            for n in list(range(0, 300)) + [511, 512, 513, 1000, 1027]:
                data = random_bytes(n, 1000 + n)
                with self.subTest(n=n):
                    self.assertEqual(tensor_digest(as_tensor(data)), reference_digest(data))
            edge = b"\x00\x00\x00\x80" * 300 + b"\xff" * 3
            self.assertEqual(tensor_digest(as_tensor(edge)), reference_digest(edge))

    def test_format_and_parse(self):
        self.assertEqual(format_digest(1), "0000000000000001")
        self.assertEqual(parse_digest(format_digest(MASK)), MASK)
        with self.assertRaisesRegex(ValueError, "16 lowercase hex digits"):
            parse_digest("ABCDEF0123456789")


class TensorTest(unittest.TestCase):
    def test_any_dtype_or_shape_digests_its_bytes(self):
        data = random_bytes(4 * 96, 5)
        want = reference_digest(data)
        base = as_tensor(data)
        for dtype, shape in [(torch.float32, (8, 12)), (torch.bfloat16, (2, 3, 32)), (torch.float16, (192,)),
                             (torch.int64, (48,)), (torch.int8, (4, 96)), (torch.complex64, (48,)), (torch.bool, (384,))]:
            with self.subTest(dtype=dtype):
                t = base.clone().view(dtype).reshape(shape) if dtype is not torch.bool else base.clone().bool()
                if dtype is torch.bool:
                    self.assertEqual(tensor_digest(t), reference_digest(bytes(t.view(torch.uint8).tolist())))
                else:
                    self.assertEqual(tensor_digest(t), want)
        scalar = torch.tensor(1.5, dtype=torch.float32)
        self.assertEqual(tensor_digest(scalar), reference_digest(scalar.reshape(1).view(torch.uint8).numpy().tobytes()))

    def test_a_non_contiguous_tensor_digests_its_row_major_bytes(self):
        t = torch.arange(6 * 10, dtype=torch.float32).reshape(6, 10).t()
        self.assertFalse(t.is_contiguous())
        self.assertEqual(tensor_digest(t), tensor_digest(t.contiguous()))

    def test_a_view_not_4_aligned_in_memory(self):
        data = random_bytes(4099, 6)
        base = as_tensor(data)
        for skip in (1, 2, 3):
            with self.subTest(skip=skip):
                self.assertEqual(tensor_digest(base[skip:]), reference_digest(data[skip:]))

    def test_many_at_once_equal_one_by_one(self):
        ts = [as_tensor(random_bytes(n, n)) for n in (0, 7, 4096, 100_003)]
        ts.append(torch.randn(3, 5, dtype=torch.float64))
        self.assertEqual(tensor_digests(ts), [tensor_digest(t) for t in ts])

    def test_many_tensors_of_every_size_in_one_call_in_a_small_geometry(self):
        # Remainders grouped by row count, groups over the piece limit, whole chunks with and without
        # a remainder, a view not 4-aligned in memory, empties: each digest as the reference says.
        with mock.patch.multiple(digest, ROWS=4, COLS=8, CHUNK_WORDS=32, PIECE_CHUNKS=2):
            sizes = [0, 1, 3, 4, 5, 31, 32, 33, 64, 127, 128, 129, 255, 256, 300, 511, 640, 1027] * 3 + [17] * 40
            datas = [random_bytes(n, 2000 + i) for i, n in enumerate(sizes)]
            ts = [as_tensor(d) for d in datas]
            ts[5] = as_tensor(b"x" + datas[5])[1:]
            self.assertEqual(tensor_digests(ts), [reference_digest(d) for d in datas])

    def test_batches_launched_apart_and_collected_together_equal_one_call(self):
        batches = [[as_tensor(random_bytes(n, n)) for n in ns] for ns in ((5, 4096), (), (0, 100_003, 3))]
        want = [tensor_digests(b) for b in batches]
        launched = [digest.launch_digests(b) for b in batches]
        for b in batches:  # the slot is refilled once a load is answered: launched digests keep only their sums
            for t in b:
                t.fill_(0xA5)
        self.assertEqual(digest.collect_digests(launched), want)
        self.assertEqual(digest.collect_digests([]), [])

    def test_large_tensors_and_extreme_words_match_the_wrapping_formula(self):
        g = torch.Generator().manual_seed(7)
        cases = {
            "64 MiB + 13 random": torch.randint(0, 256, (64 * 2**20 + 13,), dtype=torch.uint8, generator=g),
            "INT32_MIN words": torch.full((digest.CHUNK_WORDS + 2048 * 3 + 5,), -2**31, dtype=torch.int32),
            "-1 words": torch.full((digest.CHUNK_WORDS * 2 + 1,), -1, dtype=torch.int32),
            "INT32_MAX words": torch.full((digest.CHUNK_WORDS + 1,), 2**31 - 1, dtype=torch.int32),
        }
        for name, t in cases.items():
            with self.subTest(name):
                self.assertEqual(tensor_digest(t), naive_digest(t))

    @unittest.skipUnless(torch.cuda.is_available(), "no CUDA device")
    def test_on_the_gpu_as_on_the_cpu(self):
        t = torch.randint(0, 256, (40 * 2**20 + 3,), dtype=torch.uint8)
        self.assertEqual(tensor_digest(t.cuda()), tensor_digest(t))
        b = t[: 40 * 2**20].view(torch.bfloat16).reshape(1024, -1)
        self.assertEqual(tensor_digest(b.cuda()), tensor_digest(b))
        self.assertEqual(tensor_digest(t[1:].cuda()), tensor_digest(t[1:]))


class CatchesTest(unittest.TestCase):
    def test_a_flipped_byte_swapped_words_truncation_and_zeros(self):
        data = bytearray(random_bytes(1027, 9))
        d = tensor_digest(as_tensor(data))
        for i in range(0, len(data), 13):
            data[i] ^= 0x10
            self.assertNotEqual(tensor_digest(as_tensor(data)), d, f"byte {i}")
            data[i] ^= 0x10
        for i, j in [(0, 1), (0, 255), (17, 200), (3, 4)]:
            swapped = bytearray(data)
            swapped[4 * i:4 * i + 4], swapped[4 * j:4 * j + 4] = data[4 * j:4 * j + 4], data[4 * i:4 * i + 4]
            self.assertNotEqual(tensor_digest(as_tensor(swapped)), d)
        for n in (0, 1, 1024, 1026):
            self.assertNotEqual(tensor_digest(as_tensor(data[:n])), d)
        self.assertNotEqual(tensor_digest(torch.zeros(len(data), dtype=torch.uint8)), d)
        self.assertNotEqual(tensor_digest(as_tensor(bytes(data) + b"\0")), d)


if __name__ == "__main__":
    unittest.main()
