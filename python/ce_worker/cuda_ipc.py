"""Map ce's buffer into this process as one zero-copy uint8 tensor.

CUDA backend: the buffer is device memory ce exported with cuIpcGetMemHandle; we open the
64-byte handle with the driver API (libcuda.so.1 through ctypes: torch has no public call for a
raw handle) and wrap the pointer through __cuda_array_interface__. CPU backend: the buffer is a
shared-memory file, mapped read-only.

Either mapping must outlive every view into it. close() checks that through a weak reference to
the object the views hang on: it refuses to unmap while a view is alive (that would leave the
engine a dangling pointer) and says so; the buffer then stays mapped.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
import os
import warnings
import weakref
from ctypes import POINTER, Structure, c_char, c_char_p, c_int, c_uint, c_uint64, c_void_p
from typing import Optional

import torch

LIBCUDA = "libcuda.so.1"
CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS = 1


class CudaError(RuntimeError):
    """A driver call failed; the message carries cuGetErrorName and cuGetErrorString."""


class CUipcMemHandle(Structure):
    # typedef struct CUipcMemHandle_st { char reserved[CU_IPC_HANDLE_SIZE]; } CUipcMemHandle;  (64)
    _fields_ = [("reserved", c_char * 64)]


CUresult = c_int
CUdevice = c_int
CUcontext = c_void_p
CUdeviceptr = c_uint64

# One entry per driver function: (Python name, symbol, restype, argtypes), each under its C
# declaration. cuda.h #defines some names to versioned symbols; we bind those symbols directly.
_FUNCTIONS = [
    # CUresult cuInit(unsigned int Flags);
    ("cuInit", "cuInit", CUresult, [c_uint]),
    # CUresult cuDeviceGet(CUdevice *device, int ordinal);
    ("cuDeviceGet", "cuDeviceGet", CUresult, [POINTER(CUdevice), c_int]),
    # CUresult cuDevicePrimaryCtxRetain(CUcontext *pctx, CUdevice dev);
    ("cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRetain", CUresult, [POINTER(CUcontext), CUdevice]),
    # CUresult cuDevicePrimaryCtxRelease(CUdevice dev);  cuda.h: cuDevicePrimaryCtxRelease_v2
    ("cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2", CUresult, [CUdevice]),
    # CUresult cuCtxPushCurrent(CUcontext ctx);  cuda.h: cuCtxPushCurrent_v2
    ("cuCtxPushCurrent", "cuCtxPushCurrent_v2", CUresult, [CUcontext]),
    # CUresult cuCtxPopCurrent(CUcontext *pctx);  cuda.h: cuCtxPopCurrent_v2
    ("cuCtxPopCurrent", "cuCtxPopCurrent_v2", CUresult, [POINTER(CUcontext)]),
    # CUresult cuIpcOpenMemHandle(CUdeviceptr *pdptr, CUipcMemHandle handle, unsigned int Flags);
    # cuda.h: cuIpcOpenMemHandle_v2. The handle is a 64-byte struct passed BY VALUE.
    ("cuIpcOpenMemHandle", "cuIpcOpenMemHandle_v2", CUresult, [POINTER(CUdeviceptr), CUipcMemHandle, c_uint]),
    # CUresult cuIpcCloseMemHandle(CUdeviceptr dptr);
    ("cuIpcCloseMemHandle", "cuIpcCloseMemHandle", CUresult, [CUdeviceptr]),
    # CUresult cuGetErrorName(CUresult error, const char **pStr);
    ("cuGetErrorName", "cuGetErrorName", CUresult, [CUresult, POINTER(c_char_p)]),
    # CUresult cuGetErrorString(CUresult error, const char **pStr);
    ("cuGetErrorString", "cuGetErrorString", CUresult, [CUresult, POINTER(c_char_p)]),
]


class LibCuda:
    """libcuda.so.1, loaded once, its functions bound from _FUNCTIONS."""

    def __init__(self, path: str = LIBCUDA) -> None:
        self.path = path
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise CudaError(f"cannot load {path}: {e} (is the NVIDIA driver installed?)") from None
        for name, symbol, restype, argtypes in _FUNCTIONS:
            try:
                fn = getattr(lib, symbol)
            except AttributeError:
                raise CudaError(f"{path} has no symbol {symbol} (driver too old?)") from None
            fn.restype, fn.argtypes = restype, argtypes
            setattr(self, name, fn)
        self.check(self.cuInit(0), "cuInit(0)")

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            name, text = c_char_p(), c_char_p()
            self.cuGetErrorName(rc, ctypes.byref(name))
            self.cuGetErrorString(rc, ctypes.byref(text))
            raise CudaError(f"{what}: {(name.value or b'CUDA_ERROR_' + str(rc).encode()).decode()}: "
                            f"{(text.value or b'unknown error').decode()}")


_libcuda: Optional[LibCuda] = None


def libcuda() -> LibCuda:
    global _libcuda
    if _libcuda is None:
        _libcuda = LibCuda()
    return _libcuda


class _DeviceMemory:
    """Exposes a device pointer to torch.as_tensor; every tensor made from it keeps it alive."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "version": 3, "shape": (nbytes,), "typestr": "|u1", "data": (ptr, False), "strides": None,
        }


class Mapping:
    """ce's buffer in this process: `tensor` is uint8 [buffer_bytes]; close() when no view is left."""

    tensor: Optional[torch.Tensor]

    def close(self) -> None:
        raise NotImplementedError


class CudaIpcMapping(Mapping):
    def __init__(self, handle: bytes, buffer_bytes: int, device: torch.device) -> None:
        if len(handle) != ctypes.sizeof(CUipcMemHandle):
            raise ValueError(f"IPC handle has {len(handle)} bytes, expected {ctypes.sizeof(CUipcMemHandle)}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        # Let torch create and own the device's primary context first, so the driver call
        # below runs in the very context torch's kernels and copies use.
        torch.cuda.init()
        torch.cuda.synchronize(self.device)
        self._cu = cu = libcuda()
        self._cudev = CUdevice()
        cu.check(cu.cuDeviceGet(ctypes.byref(self._cudev), index), f"cuDeviceGet({index})")
        self._ctx = CUcontext()
        cu.check(cu.cuDevicePrimaryCtxRetain(ctypes.byref(self._ctx), self._cudev),
                 f"cuDevicePrimaryCtxRetain(GPU {index})")
        self._ptr = CUdeviceptr()
        try:
            with self._current():
                raw = CUipcMemHandle.from_buffer_copy(handle)
                cu.check(cu.cuIpcOpenMemHandle(ctypes.byref(self._ptr), raw, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS),
                         f"cuIpcOpenMemHandle on GPU {index} ({buffer_bytes} bytes)")
        except BaseException:
            cu.cuDevicePrimaryCtxRelease(self._cudev)
            raise
        memory = _DeviceMemory(self._ptr.value, buffer_bytes)
        self._memory_alive = weakref.ref(memory)
        self.tensor = torch.as_tensor(memory, device=self.device)

    def _current(self):
        cu, ctx = self._cu, self._ctx

        class _Push:
            def __enter__(self):
                cu.check(cu.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")

            def __exit__(self, *exc):
                cu.cuCtxPopCurrent(ctypes.byref(CUcontext()))

        return _Push()

    def close(self) -> None:
        if self._ptr is None:
            return
        self.tensor = None
        _require_dead(self._memory_alive, "CUDA IPC buffer")
        # Whatever was queued against the buffer must finish before it is unmapped.
        torch.cuda.synchronize(self.device)
        try:
            with self._current():
                self._cu.check(self._cu.cuIpcCloseMemHandle(self._ptr), "cuIpcCloseMemHandle")
        finally:
            self._ptr = None
            self._cu.cuDevicePrimaryCtxRelease(self._cudev)


class ShmMapping(Mapping):
    def __init__(self, path: str, buffer_bytes: int) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < buffer_bytes:
                raise ValueError(f"{path} has {size} bytes, the open frame says buffer_bytes {buffer_bytes}")
            self._mm = mmap.mmap(fd, buffer_bytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        # torch.frombuffer keeps a reference to the object it was given but no buffer export,
        # so an mmap given directly could be closed under a live view. A memoryview in between
        # holds the export (mmap.close() then refuses) and tells us, through a weak reference,
        # whether any tensor still uses it.
        memory = memoryview(self._mm)
        self._memory_alive = weakref.ref(memory)
        with warnings.catch_warnings():
            # torch warns that the buffer is read-only; we only ever read from it.
            warnings.simplefilter("ignore", UserWarning)
            self.tensor = torch.frombuffer(memory, dtype=torch.uint8)

    def close(self) -> None:
        if self._mm is None:
            return
        self.tensor = None
        _require_dead(self._memory_alive, "shared-memory buffer")
        self._mm.close()
        self._mm = None


def _require_dead(alive: "weakref.ref", what: str) -> None:
    if alive() is not None:
        gc.collect()  # a view may only be held by a reference cycle
    if alive() is not None:
        raise RuntimeError(f"a tensor view into the {what} is still referenced; load_fn must copy "
                           "out of the buffer, not keep views (the buffer stays mapped)")


def map_buffer(backend: str, *, buffer_bytes: int, handle: Optional[bytes] = None, path: str = "",
               device: Optional[torch.device] = None) -> Mapping:
    """Map the buffer an open frame describes."""
    if backend == "cuda":
        if device is None or device.type != "cuda":
            raise ValueError(f"backend cuda needs a CUDA device, this worker runs on {device or 'cpu'}")
        return CudaIpcMapping(handle or b"", buffer_bytes, device)
    if backend == "cpu":
        return ShmMapping(path, buffer_bytes)
    raise ValueError(f"unknown backend {backend!r}")


def device_uuid(device: torch.device) -> str:
    """CUDA's name for the GPU: GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx (as nvidia-smi -L prints)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    if uuid is None:
        raise RuntimeError(f"torch {torch.__version__} does not report device UUIDs")
    text = str(uuid)
    return text if text.startswith("GPU-") else f"GPU-{text}"
