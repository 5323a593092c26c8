import unittest

import support

import torch

from ce_worker import dtypes, protocol
from ce_worker.loads import tensor_views

# safetensors name -> (bits, torch attribute), the format's whole list.
EXPECTED = {
    "BOOL": (8, "bool"), "U8": (8, "uint8"), "I8": (8, "int8"), "I16": (16, "int16"), "U16": (16, "uint16"),
    "I32": (32, "int32"), "U32": (32, "uint32"), "I64": (64, "int64"), "U64": (64, "uint64"),
    "F16": (16, "float16"), "BF16": (16, "bfloat16"), "F32": (32, "float32"), "F64": (64, "float64"),
    "C64": (64, "complex64"), "F8_E4M3": (8, "float8_e4m3fn"), "F8_E5M2": (8, "float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu"), "F4": (4, ""), "F6_E2M3": (6, ""), "F6_E3M2": (6, ""),
}


class DtypeTableTest(unittest.TestCase):
    def test_every_safetensors_dtype_maps_to_torch_where_torch_has_it(self):
        self.assertEqual(set(dtypes.DTYPES), set(EXPECTED))
        for name, (bits, attr) in EXPECTED.items():
            with self.subTest(name):
                dt = dtypes.DTYPES[name]
                self.assertEqual(dt.bits, bits)
                self.assertIs(dt.torch, getattr(torch, attr, None) if attr else None)
                if dt.torch is not None:
                    self.assertEqual(torch.empty((), dtype=dt.torch).element_size() * 8, bits)

    def test_an_unknown_name_is_refused_with_the_list(self):
        with self.assertRaisesRegex(ValueError, "unknown dtype 'BF32'.*BF16"):
            dtypes.lookup("BF32")

    def test_sizes_count_packed_sub_byte_elements(self):
        self.assertEqual(dtypes.DTYPES["F4"].nbytes([3, 4]), 6)
        self.assertEqual(dtypes.DTYPES["F6_E2M3"].nbytes([4]), 3)
        self.assertEqual(dtypes.DTYPES["BF16"].nbytes([2, 3]), 12)
        self.assertEqual(dtypes.DTYPES["F32"].nbytes([]), 4)

    def test_a_dtype_torch_lacks_arrives_as_raw_bytes_with_one_warning(self):
        missing = [n for n, dt in dtypes.DTYPES.items() if dt.torch is None and dt.bits % 8 == 0]
        if not missing:
            self.skipTest(f"torch {torch.__version__} has every whole-byte safetensors dtype")
        name = missing[0]
        dtypes._warned.discard(name)
        with self.assertLogs("ce_worker", "WARNING") as logs:
            dtypes.lookup(name)
            dtypes.lookup(name)
        self.assertEqual(len(logs.records), 1)
        self.assertIn(name, logs.output[0])
        self.assertEqual(dtypes.DTYPES[name].raw_shape([2, 3]), (2, 3, dtypes.DTYPES[name].bits // 8))

    def test_sub_byte_dtypes_arrive_as_a_flat_run_of_bytes(self):
        self.assertEqual(dtypes.DTYPES["F4"].raw_shape([3, 4]), (6,))


class ViewTest(unittest.TestCase):
    def test_views_apply_dtype_and_shape_without_copying(self):
        tensors = support.sample_tensors(seed=1)
        buckets, size = support.layout(tensors, 1 << 20)
        buf = torch.zeros(size, dtype=torch.uint8)
        metas = []
        for m in buckets[0]:
            data = torch.tensor(list(support.raw_bytes(tensors[m["name"]])), dtype=torch.uint8)
            buf[m["offset"]:m["offset"] + m["nbytes"]] = data
            metas.append(protocol.TensorMeta(m["name"], m["dtype"], tuple(m["shape"]), m["offset"], m["nbytes"]))
        base, end = buf.data_ptr(), buf.data_ptr() + size
        for name, view in tensor_views(buf, metas):
            with self.subTest(name):
                want = tensors[name]
                self.assertEqual((view.dtype, view.shape), (want.dtype, want.shape))
                self.assertEqual(support.raw_bytes(view), support.raw_bytes(want))
                if view.numel():
                    self.assertTrue(base <= view.data_ptr() < end, "a view, not a copy")

    def test_raw_bytes_keep_the_length_for_every_dtype(self):
        buf = torch.arange(256, dtype=torch.uint8)
        for name, dt in dtypes.DTYPES.items():
            with self.subTest(name):
                nbytes = dt.nbytes([2, 4])
                (_, view), = tensor_views(buf, [protocol.TensorMeta("t", name, (2, 4), 16, nbytes)])
                self.assertEqual(view.numel() * view.element_size(), nbytes)
                self.assertEqual(view.reshape(-1).view(torch.uint8)[0].item(), 16)

    def test_a_bad_meta_names_its_tensor(self):
        buf = torch.zeros(64, dtype=torch.uint8)
        cases = [
            (protocol.TensorMeta("a", "F32", (4,), 0, 12), "needs 16 bytes, nbytes says 12"),
            (protocol.TensorMeta("b", "F32", (4,), 56, 16), "outside the 64-byte buffer"),
            (protocol.TensorMeta("c", "Q7", (4,), 0, 4), "unknown dtype"),
        ]
        for meta, message in cases:
            with self.subTest(meta.name):
                with self.assertRaisesRegex(ValueError, message) as ctx:
                    tensor_views(buf, [meta])
                self.assertEqual(ctx.exception.ce_tensor, meta.name)


if __name__ == "__main__":
    unittest.main()
