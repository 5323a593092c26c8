"""A pool's slot file mapped read-write into the trainer, as a uint8 tensor, pinned for CUDA once.

ce serve creates the slot files in /dev/shm and pins them in its own process; the trainer maps
the same pages. Registered with the trainer's CUDA context too (cudaHostRegister), they take a
device-to-host copy straight from the trainer's GPU at the link's speed: unregistered memory is
pageable to CUDA, which stages every copy through a pinned bounce buffer of its own.
"""

from __future__ import annotations

import mmap
import os

import torch

from .errors import CeError

# cudaHostRegisterPortable: pinned for every CUDA context of the process, not only the current
# device's, so a state dict spread over several GPUs copies at full speed from each of them.
HOST_REGISTER_PORTABLE = 1


class SlotFile:
    """One slot file, mapped MAP_SHARED; `tensor` is a uint8 view of all of it."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise CeError("E_CLIENT_SLOT", f"cannot open slot file {path}: {e.strerror}",
                          hint="the trainer must run on ce serve's host, as a user who may write its /dev/shm files") from e
        try:
            self.size = os.fstat(fd).st_size
            if self.size == 0:
                raise CeError("E_CLIENT_SLOT", f"slot file {path} is empty")
            self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.tensor = torch.frombuffer(self.mm, dtype=torch.uint8)
        self.registered = False

    def register_cuda(self) -> None:
        """Pin the mapping for CUDA (once; close() undoes it)."""
        if self.registered:
            return
        cudart = torch.cuda.cudart()
        status = cudart.cudaHostRegister(self.tensor.data_ptr(), self.size, HOST_REGISTER_PORTABLE)
        if int(status) != 0:  # cudaSuccess
            raise CeError("E_CLIENT_PIN", f"cudaHostRegister of slot file {self.path} ({self.size} bytes at "
                                          f"{self.tensor.data_ptr():#x}) failed: {_cuda_error(cudart, status)}",
                          hint="copies from the GPU would run at pageable speed; check the locked-memory limit "
                               "(ulimit -l) of the trainer")
        self.registered = True

    def close(self) -> None:
        """Unregister and unmap. The tensor must not be used afterwards."""
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.registered = False
        self.tensor = None
        if not self.mm.closed:
            self.mm.close()


def _cuda_error(cudart, status) -> str:
    try:
        return f"{cudart.cudaGetErrorString(status)} ({int(status)})"
    except (AttributeError, TypeError):  # a torch that binds no cudaGetErrorString
        return f"cudaError {int(status)}"
