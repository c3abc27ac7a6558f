"""The project's own tooling (not installed with sam_fast): GPU verification, AOT compilation for sm_90,
sanitizer drivers, tuners, result merging and the performance targets. Run from the repository root as
``python -m tools.<name>`` (``bash tools/gpu_session.sh`` for the GPU session)."""
