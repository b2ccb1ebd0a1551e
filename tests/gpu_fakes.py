"""A fake of tidal._kernels' CUDA runtime for tests on hosts without a GPU.

"Device" memory is host memory here, so copies really move bytes (ctypes.memmove) and a backend that
stages the wrong buffer, copies the wrong size or reads before it synchronizes gets wrong numbers. It
counts what is allocated and freed, and every stream and graph, so tests can check nothing leaks.

Stream capture fails as CUDA's does: a call not permitted on a capturing stream (a synchronize, or whatever
`capture_unsupported` stands for inside a library's enqueue) fails with cudaErrorStreamCaptureUnsupported and
invalidates the capture, and then cudaStreamEndCapture ends it with cudaErrorStreamCaptureInvalidated and no
graph, raised as the binding raises it (RuntimeError, "call: CUDA's message").
"""

from __future__ import annotations

import ctypes

import numpy as np


class FakeCudaRuntime:
    HAS_CUDA = True

    def __init__(self, devices: int = 1) -> None:
        self.devices = devices
        self.current = 0
        self.blocks: dict[int, np.ndarray] = {}
        self.pinned: set[int] = set()
        self.streams: set[int] = set()
        self.graphs: dict[int, list] = {}
        self.capturing: dict[int, list] = {}
        self.invalidated: set[int] = set()
        self.launched: list[int] = []
        self.gemms: list[tuple[int, int, int, str]] = []
        self._next_handle = 1

    def _alloc(self, nbytes: int) -> int:
        block = np.zeros(max(nbytes, 1), np.uint8)
        self.blocks[block.ctypes.data] = block
        return block.ctypes.data

    def _handle(self) -> int:
        self._next_handle += 1
        return self._next_handle

    def cuda_device_count(self) -> int:
        return self.devices

    def cuda_set_device(self, device: int) -> None:
        assert 0 <= device < self.devices
        self.current = device

    def cuda_malloc(self, nbytes: int) -> int:
        return self._alloc(nbytes)

    def cuda_free(self, ptr: int) -> None:
        del self.blocks[ptr]

    def cuda_host_alloc(self, nbytes: int) -> int:
        ptr = self._alloc(nbytes)
        self.pinned.add(ptr)
        return ptr

    def cuda_free_host(self, ptr: int) -> None:
        self.pinned.remove(ptr)
        del self.blocks[ptr]

    def cuda_stream_create(self) -> int:
        handle = self._handle()
        self.streams.add(handle)
        return handle

    def cuda_stream_destroy(self, stream: int) -> None:
        self.streams.remove(stream)

    def cuda_stream_synchronize(self, stream: int) -> None:
        assert stream in self.streams
        self.capture_unsupported(stream, "cudaStreamSynchronize")

    def capture_unsupported(self, stream: int, call: str) -> None:
        """A call CUDA refuses on a capturing stream (a host sync, an allocation): it fails and the capture is
        invalidated. Fake libraries (TensorRT's enqueue) call it for the uncapturable work they model."""
        if stream in self.capturing:
            self.invalidated.add(stream)
            raise RuntimeError(f"{call}: operation not permitted when stream is capturing")

    def _enqueue(self, stream: int, work) -> None:
        if stream in self.capturing:
            self.capturing[stream].append(work)
        else:
            work()

    def cuda_memcpy_async(self, dst: int, src: int, nbytes: int, stream: int) -> None:
        self._enqueue(stream, lambda: ctypes.memmove(dst, src, nbytes))

    def cuda_graph_begin_capture(self, stream: int) -> None:
        assert stream in self.streams
        if stream in self.capturing:
            raise RuntimeError("cudaStreamBeginCapture: the operation cannot be performed in the present state")
        self.capturing[stream] = []

    def cuda_graph_end_capture(self, stream: int) -> int:
        """Ends the capture whatever happened in it, as cudaStreamEndCapture does; an invalidated one makes no
        graph and raises (the binding's check)."""
        if stream not in self.capturing:
            raise RuntimeError("cudaStreamEndCapture: the operation cannot be performed in the present state")
        work = self.capturing.pop(stream)
        if stream in self.invalidated:
            self.invalidated.discard(stream)
            raise RuntimeError("cudaStreamEndCapture: operation failed due to a previous error during capture")
        handle = self._handle()
        self.graphs[handle] = work
        return handle

    def cuda_graph_launch(self, graph: int, stream: int) -> None:
        self.launched.append(graph)
        for work in self.graphs[graph]:
            work()

    def cuda_graph_destroy(self, graph: int) -> None:
        del self.graphs[graph]

    def cuda_gemm_s8_ptr(self, a: int, bt: int, c: int, m: int, n: int, k: int, algo: str, stream: int) -> None:
        self.gemms.append((m, n, k, algo))

        def run() -> None:
            lhs = np.ctypeslib.as_array((ctypes.c_int8 * (m * k)).from_address(a)).reshape(m, k)
            rhs = np.ctypeslib.as_array((ctypes.c_int8 * (n * k)).from_address(bt)).reshape(n, k)
            out = np.ctypeslib.as_array((ctypes.c_int32 * (m * n)).from_address(c)).reshape(m, n)
            out[:] = (lhs.astype(np.int64) @ rhs.astype(np.int64).T).astype(np.int32)

        self._enqueue(stream, run)

    def cuda_device_sm(self) -> int:
        return 90

    def live(self) -> int:
        """Allocations, streams and graphs not yet released."""
        return len(self.blocks) + len(self.streams) + len(self.graphs)
