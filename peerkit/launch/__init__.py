"""Launching experiments: experiment files (:mod:`peerkit.experiment`, sans-IO), the
:class:`Launcher` that runs one, its peer processes and its live status."""

from .launcher import LOG_FORMAT, RUN_DIR_ENV, Launcher, PeerRecord, current_run_dir

__all__ = ["LOG_FORMAT", "RUN_DIR_ENV", "Launcher", "PeerRecord", "current_run_dir"]
