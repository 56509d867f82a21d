"""Everything that touches TensorRT, in one small module (TensorRT 10+/11 explicit-precision API).

Networks are strongly typed: precision comes from the ONNX graph (an FP16 graph, or INT8 from
explicit Q/DQ nodes), never from builder flags (TensorRT 11 removed those and the calibrators).
A plan is tied to the GPU architecture and TensorRT version it was built with: its metadata says
which, and `plan_key` names the cache entry (ONNX hash + GPU + TensorRT version).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.artifacts import file_sha256


def unavailable_reason() -> str | None:
    """Why no plan can be built or run here, or None when TensorRT, CUDA's Python bindings
    (cuda-python) and a CUDA device are all present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (its wheels download from NVIDIA's index at install time)"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python (CUDA's runtime bindings, used for device buffers) is not installed"
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess or count == 0:
        return "no CUDA device"
    return None


def cuda_call(result: tuple[Any, ...]) -> Any:
    """cuda-python returns (error, *values): raise on an error, return the value(s)."""
    from cuda.bindings import runtime as cudart

    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        raise RuntimeError(f"CUDA error: {cudart.cudaGetErrorName(err)[1].decode()}")
    return values[0] if len(values) == 1 else values


def device_info() -> dict[str, Any]:
    import tensorrt as trt
    from cuda.bindings import runtime as cudart

    device = cuda_call(cudart.cudaGetDevice())
    props = cuda_call(cudart.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace").rstrip("\x00")
    return {
        "tensorrt_version": trt.__version__,
        "gpu": name,
        "compute_capability": f"{props.major}.{props.minor}",
    }


def plan_key(onnx_path: Path, info: dict[str, Any]) -> str:
    """The cache key of a plan: which graph, for which GPU and TensorRT version."""
    gpu = info["gpu"].replace(" ", "_")
    versions = f"sm{info['compute_capability']}-trt{info['tensorrt_version']}"
    return f"{file_sha256(onnx_path)[:16]}-{gpu}-{versions}"


def build_plan(
    onnx_path: Path, plan_path: Path, max_batch: int, opt_batch: int, workspace_mib: int
) -> dict[str, Any]:
    """Parse the ONNX graph into a strongly typed network and serialize a plan for batch 1..max."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {'; '.join(errors)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    profile = builder.create_optimization_profile()
    tensor = network.get_input(0)
    sample = tuple(tensor.shape)[1:]
    profile.set_shape(tensor.name, (1, *sample), (opt_batch, *sample), (max_batch, *sample))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build a plan from {onnx_path}")
    plan_path.write_bytes(bytes(serialized))
    info = {**device_info(), "onnx_sha256": file_sha256(onnx_path), "max_batch": max_batch}
    plan_path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return info


class Engine:
    """A deserialized plan that runs numpy batches through CUDA buffers. Device memory comes from
    CUDA's runtime bindings (cuda-python), not torch: a GPU serving image needs only TensorRT."""

    name = "tensorrt"

    def __init__(self, plan_path: Path) -> None:
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        if self.engine is None:
            raise RuntimeError(f"{plan_path}: not a plan for this GPU and TensorRT version")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) != mode)
        self.stream = cuda_call(cudart.cudaStreamCreate())
        self.buffers: dict[str, tuple[int, int]] = {}  # tensor -> (device pointer, bytes)

    def _device(self, tensor: str, nbytes: int) -> int:
        """A device buffer of at least `nbytes` for `tensor`, grown when a larger batch comes."""
        from cuda.bindings import runtime as cudart

        pointer, size = self.buffers.get(tensor, (0, 0))
        if size < nbytes:
            if pointer:
                cuda_call(cudart.cudaFree(pointer))
            pointer, size = int(cuda_call(cudart.cudaMalloc(nbytes))), nbytes
            self.buffers[tensor] = (pointer, size)
        return pointer

    def __call__(self, x: np.ndarray) -> np.ndarray:
        from cuda.bindings import runtime as cudart

        host_in = np.ascontiguousarray(x, dtype=np.float32)
        self.context.set_input_shape(self.input, host_in.shape)
        host_out = np.empty(tuple(self.context.get_tensor_shape(self.output)), np.float32)
        device_in = self._device(self.input, host_in.nbytes)
        device_out = self._device(self.output, host_out.nbytes)
        self.context.set_tensor_address(self.input, device_in)
        self.context.set_tensor_address(self.output, device_out)
        kind = cudart.cudaMemcpyKind
        cuda_call(
            cudart.cudaMemcpyAsync(
                device_in, host_in, host_in.nbytes, kind.cudaMemcpyHostToDevice, self.stream
            )
        )
        if not self.context.execute_async_v3(int(self.stream)):
            raise RuntimeError("TensorRT execution failed")
        cuda_call(
            cudart.cudaMemcpyAsync(
                host_out, device_out, host_out.nbytes, kind.cudaMemcpyDeviceToHost, self.stream
            )
        )
        cuda_call(cudart.cudaStreamSynchronize(self.stream))
        return host_out

    def __del__(self) -> None:
        try:
            from cuda.bindings import runtime as cudart
        except ImportError:
            return
        for pointer, _ in getattr(self, "buffers", {}).values():
            cudart.cudaFree(pointer)


def predictor(plan_path: Path) -> Engine:
    return Engine(plan_path)


def main(argv: list[str] | None = None) -> None:
    """`python -m pipelines.tensorrt_engine ONNX PLAN MAX OPT WORKSPACE_MIB`: one build, in its own
    process so that the caller's timeout can stop it (a build is one long call into C++)."""
    import sys

    onnx_path, plan_path, max_batch, opt_batch, workspace = (argv or sys.argv[1:])[:5]
    info = build_plan(
        Path(onnx_path), Path(plan_path), int(max_batch), int(opt_batch), int(workspace)
    )
    print(json.dumps(info))


if __name__ == "__main__":
    main()
