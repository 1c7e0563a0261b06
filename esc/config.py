"""OmegaConf resolvers used by the Hydra configs, and config composition for scripts and tests."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def project_root() -> str:
    """The project directory (``$ESC_ROOT`` if set, else the checkout containing this package)."""
    return os.environ.get("ESC_ROOT") or str(CONF_DIR.parent)


def register_resolvers() -> None:
    """Register ``${esc_root:}`` (idempotent)."""
    if not OmegaConf.has_resolver("esc_root"):
        OmegaConf.register_new_resolver("esc_root", project_root)


def compose(overrides: list[str] | None = None):
    """Compose the run config with Hydra (as ``python -m esc.run`` would), for notebooks and tests."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides or [], return_hydra_config=True)
