"""``python -m esc.export [group=option ...]``: one run of :mod:`esc.run` (same config and overrides)
that also writes its calibrated model as ONNX QDQ to ``<export>/<row key>.onnx`` (default
``export=${paths.root}/experiments/export``). A finished run with its export in place is not
recomputed; a finished run without one is re-executed (its calibration comes from the cache).
The file's ``metadata_props`` hold the row key (``esc.row_key``), the run's axes (``esc.axes``), the
git commit and the exported quantizers (see :func:`esc.export.onnx.export_onnx`).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from esc.run import export_path, register_resolvers, run, run_axes
from esc.results import run_key

register_resolvers()


@hydra.main(config_path="../../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """Run the configuration with an export directory and print the path of the ONNX file."""
    if not cfg.export:
        cfg.export = f"{cfg.paths.root}/experiments/export"
    path = export_path(cfg, run_key(run_axes(cfg)))
    if path is None:
        raise SystemExit(f"precision={cfg.precision.name} quantizes nothing, so there is no QDQ model to export; "
                         "choose a quantized precision such as precision=w8a8")
    run(cfg)
    print(path)


if __name__ == "__main__":
    main()
