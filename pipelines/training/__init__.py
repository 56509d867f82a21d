"""The training machinery behind the `train` stage (`pipelines/train.py`), `tune` and `distill`.

- `loop`: the objects a run steps (`Loop`, `State`) and the epochs (`fit`): batches, validation,
  early stopping;
- `checkpoints`: one checkpoint per epoch, the fingerprint check and resume (`shared_start`);
- `distributed`: torchrun/DDP, a process's rank and device (a world of 1 without torchrun);
- `data`: the prepared splits as tensors;
- `progress`: a tqdm bar on a terminal, a log line per epoch otherwise.
"""
