"""A stand-in for cupy, just enough for tinytensor.distributed's GPU code path on a machine
without a GPU: arrays are NumPy arrays of a marker subclass with cupy's .get(out=) and .set(),
and there are N pretend devices. install() puts it in tinytensor.backend (before dist.init(),
so each rank also picks its device). It checks the staging logic (device buffer -> host ->
MPI -> device, rank r on device r % N), not CUDA itself.
"""
import types

import numpy as np

from tinytensor import backend


class FakeGpuArray(np.ndarray):
    def get(self, stream=None, order="C", out=None, blocking=True):
        assert FakeCupy.synchronized, "MPI would read GPU data before synchronizing the stream"
        if out is None:
            return np.array(self).view(np.ndarray)
        out[...] = self.view(np.ndarray)
        return out

    def set(self, arr, stream=None):
        assert type(arr) is np.ndarray and arr.shape == self.shape
        self.view(np.ndarray)[...] = arr


class FakeCupy(types.ModuleType):
    synchronized = False
    device = None  # the index passed to cuda.Device(i).use()

    def __init__(self, n_devices):
        super().__init__("fake_cupy")
        self.ndarray = FakeGpuArray
        cuda = types.SimpleNamespace()
        cuda.runtime = types.SimpleNamespace(getDeviceCount=lambda: n_devices)

        class Device:
            def __init__(self, i):
                assert 0 <= i < n_devices
                self.i = i

            def use(self):
                FakeCupy.device = self.i

        class Stream:
            ptr = 0

            def synchronize(self):
                FakeCupy.synchronized = True

        cuda.Device = Device
        cuda.get_current_stream = Stream
        self.cuda = cuda

    def asarray(self, a, dtype=None):
        return np.array(a, dtype=dtype).view(FakeGpuArray)

    def asnumpy(self, a):
        return np.array(a).view(np.ndarray)

    def zeros(self, shape, dtype=float):
        return np.zeros(shape, dtype).view(FakeGpuArray)

    def empty(self, shape, dtype=float):
        return np.empty(shape, dtype).view(FakeGpuArray)

    def divide(self, a, b, out=None):
        FakeCupy.synchronized = False  # new GPU work is queued
        return np.divide(a, b, out=out)


def install(n_devices):
    fake = FakeCupy(n_devices)
    backend.cp = fake
    backend._cuda_ok = True
    return fake
