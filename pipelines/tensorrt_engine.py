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
    """Why no plan can be built here, or None when TensorRT and a CUDA device are both present."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (its wheels download from NVIDIA's index at install time)"
    try:
        import torch
    except ImportError:
        return "torch (used for CUDA buffers) is not installed"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


def device_info() -> dict[str, Any]:
    import tensorrt as trt
    import torch

    major, minor = torch.cuda.get_device_capability()
    return {
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
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
    """A deserialized plan that runs numpy batches through CUDA buffers (torch-allocated)."""

    name = "tensorrt"

    def __init__(self, plan_path: Path) -> None:
        import tensorrt as trt

        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = self.runtime.deserialize_cuda_engine(plan_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.input = next(n for n in names if self.engine.get_tensor_mode(n) == mode)
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) != mode)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        import torch

        inp = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).cuda()
        self.context.set_input_shape(self.input, tuple(inp.shape))
        out = torch.empty(tuple(self.context.get_tensor_shape(self.output)), device="cuda")
        self.context.set_tensor_address(self.input, inp.data_ptr())
        self.context.set_tensor_address(self.output, out.data_ptr())
        stream = torch.cuda.current_stream()
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.float().cpu().numpy()


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
