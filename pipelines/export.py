"""`export`: the trained PyTorch model to ONNX (dynamic batch axis), checked and parity-gated.

The ONNX file carries the model's metadata (labels, input shape, preprocessing, versions, parity)
in its `mlops.metadata` property, so serving needs nothing else.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.artifacts import atomic_path, file_sha256, read_json, write_json
from pipelines.cli import run_cli
from pipelines.config import ExportConfig, Params, section_dict
from pipelines.errors import ParityError
from pipelines.prepare import read_split
from pipelines.preprocessing import to_model_input
from pipelines.runtime import ONNX_METADATA_KEY, logits, parity, session

log = logging.getLogger(__name__)


def test_inputs(
    prepared_dir: Path, preprocessing: dict[str, Any], model: Path | None = None
) -> np.ndarray:
    """The test split as model input (float32, preprocessed): the rows parity is checked on."""
    manifest = read_json(prepared_dir / "manifest.json")
    rows = read_split(prepared_dir, "test")[manifest["feature_columns"]]
    return to_model_input(rows, preprocessing, source(model, prepared_dir))


def source(model: Path | None, prepared_dir: Path) -> str:
    """Where model input comes from, for error messages."""
    data = f"prepared data {prepared_dir}"
    return f"model {model} on {data}" if model else data


def to_onnx(model: Any, example: np.ndarray, cfg: ExportConfig) -> Any:
    """torch.onnx (dynamo exporter) with a dynamic batch axis on inputs and outputs."""
    import torch

    batch = torch.export.Dim("batch", min=1, max=cfg.max_batch)
    program = torch.onnx.export(
        model,
        (torch.from_numpy(example),),
        dynamo=True,
        dynamic_shapes=({0: batch},),
        opset_version=cfg.opset,
        verbose=False,
    )
    if program is None:
        raise RuntimeError("torch.onnx.export returned no program")
    return program.model_proto


def strip_trace_metadata(proto: Any) -> None:
    """Drop what the exporter records about the exporting process (in place): the metadata and
    doc strings of nodes, values, graphs and functions (stack traces with the absolute paths of
    the environment, FX node dumps, rewrite rule names). The file then depends only on the model
    and the library versions, not on where the project is checked out. The model's own
    `metadata_props` (`mlops.metadata`, written by `embed_metadata`) are kept."""

    def clear(item: Any) -> None:
        del item.metadata_props[:]
        item.doc_string = ""

    def graph(g: Any) -> None:
        clear(g)
        for value in (*g.input, *g.output, *g.value_info, *g.initializer):
            clear(value)
        for node in g.node:
            clear(node)
            for attribute in node.attribute:
                if attribute.HasField("g"):
                    graph(attribute.g)
                for sub in attribute.graphs:
                    graph(sub)

    proto.doc_string = ""
    graph(proto.graph)
    for function in proto.functions:
        clear(function)
        for node in function.node:
            clear(node)


def embed_metadata(proto: Any, metadata: dict[str, Any]) -> None:
    entry = next((p for p in proto.metadata_props if p.key == ONNX_METADATA_KEY), None)
    if entry is None:
        entry = proto.metadata_props.add()
        entry.key = ONNX_METADATA_KEY
    entry.value = json.dumps(metadata, sort_keys=True, default=str)


def gate(what: str, figures: dict[str, float], max_abs_diff: float, min_agreement: float) -> None:
    """Raise ParityError naming each figure that misses its limit."""
    misses = []
    if figures["max_abs_diff"] > max_abs_diff:
        misses.append(f"max |logit diff| {figures['max_abs_diff']:.3g} > {max_abs_diff:g}")
    if figures["argmax_agreement"] < min_agreement:
        misses.append(f"argmax agreement {figures['argmax_agreement']:.4f} < {min_agreement:g}")
    if misses:
        raise ParityError(f"{what}: parity gate failed: {'; '.join(misses)}")


def verify_onnx(
    path: Path, x: np.ndarray, reference: np.ndarray, cfg: ExportConfig
) -> dict[str, float]:
    """Check the graph, run it on `x`, compare with `reference` logits; gate on the limits."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    figures = parity(reference, logits(session(path), x))
    gate(f"{path.name} vs PyTorch", figures, cfg.parity_max_abs_diff, cfg.parity_min_agreement)
    return figures


def export(
    cfg: ExportConfig, model_path: Path, prepared_dir: Path, out_path: Path
) -> dict[str, Any]:
    """Write `out_path` (ONNX, fp32) only if it passes the checker and the parity gate."""
    import onnx
    import torch

    from pipelines.models import load_model

    model, meta = load_model(model_path)
    x = test_inputs(prepared_dir, meta["preprocessing"], model_path)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    proto = to_onnx(model, x[:2], cfg)
    metadata = {**meta, "precision": "fp32", "engine": "onnxruntime", "opset": cfg.opset}
    metadata["source_model_sha256"] = file_sha256(model_path)
    with atomic_path(out_path) as tmp:
        strip_trace_metadata(proto)
        embed_metadata(proto, metadata)
        onnx.save(proto, str(tmp))
        figures = verify_onnx(tmp, x, reference, cfg)
    log.info("export: %s -> %s, parity %s", model_path, out_path, figures)
    return {**figures, "test_rows": len(x), "size_bytes": out_path.stat().st_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--model", type=Path, required=True, help="model file from train/distill")
    parser.add_argument("--prepared", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    parser.add_argument("--metrics", type=Path, required=True)
    parser.add_argument("--name", default="teacher", help="candidate family name")
    args = parser.parse_args(argv)
    run_cli(lambda params: _run(params, args), args.params)


def _run(params: Params, args: argparse.Namespace) -> None:
    from pipelines.tracking import stage_run

    data_hash = read_json(args.prepared / "manifest.json")["content_hash"]
    section = {"export": section_dict(params.export), "family": args.name}
    with stage_run(f"export@{args.name}", params, section, Path.cwd(), data_hash=data_hash) as run:
        metrics = export(params.export, args.model, args.prepared, args.out)
        write_json(args.metrics, metrics)
        run.log_metrics(metrics)
        run.log_artifact(args.out, "onnx")


if __name__ == "__main__":
    main()
