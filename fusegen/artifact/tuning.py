"""Measured kernel choices shipped in an artifact, so that a model loaded onto the GPU it was
exported on starts without timing kernels again.

    manifest "tuning": {"target": {"triton": "3.6.0", "gpu": "NVIDIA H200", "capability": [9, 0]},
                        "gemm":    [GemmTable rows: M, N, K, dtype, bias, fmt, pdl, config, times],
                        "prefill": {"<gpu> | triton <v> | <shape class>": {"choice": name}, ...}}

What they are: the skinny-GEMM table (codegen/skinny_gemm.py: template tiles or cuBLAS per
linear shape and batch, measured at engine set-up, most of a cold engine's set-up time) and
the prefill attention tiles (codegen/prefill_tuning.py, measured at the first call of each
shape class). Both depend on the GPU and Triton only, so they are kept with the same target
key as the shipped binaries (binaries.py) and used only where it matches; elsewhere they are
left alone and the engine measures as usual. The record is part of the manifest, so it is
covered by the manifest's digests and signature like everything else.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fusegen.codegen import prefill_tuning, skinny_gemm, triton_cache
from fusegen.errors import ArtifactFormatError

log = logging.getLogger("fusegen.artifact")
FIELD = "tuning"


@dataclass(frozen=True)
class TuningReport:
    """What loading did with an artifact's measured choices."""
    gemm: int = 0        # GEMM table rows taken
    prefill: int = 0     # prefill shape classes taken
    reason: str = ""     # why none were used, when none were


def write(compiled) -> dict | None:
    """The choices this process measured for ``compiled``'s device (None off CUDA): the GEMM
    table rows of the engine's linears (every row when no engine was set up) and the
    prefill classes tuned on this GPU and Triton."""
    target = triton_cache.TargetKey.of(compiled.device)
    if target is None:
        return None
    engine = getattr(compiled, "_shared_engine", None)
    runner = getattr(engine, "runner", None)
    ours = {(c.M, c.N, c.K, c.fmt) for c in getattr(runner, "gemm_choices", None) or []}
    gemm = [row for row in skinny_gemm.TABLE.export()
            if not ours or (row["M"], row["N"], row["K"], row["fmt"]) in ours]
    prefix = f"{target.gpu} | triton {target.triton} | "
    prefill = {k: {"choice": v["choice"]} for k, v in prefill_tuning.stored_choices().items()
               if k.startswith(prefix)}
    if not gemm and not prefill:
        return None
    return {"target": target.to_dict(), "gemm": gemm, "prefill": prefill}


def install(manifest: dict, target: torch.device) -> TuningReport:
    """Seed the GEMM table and the prefill choices from the manifest's record when it was
    made on ``target``'s kind of GPU and Triton; a malformed record raises
    ArtifactFormatError."""
    record = manifest.get(FIELD)
    if not record:
        return TuningReport(reason="the artifact ships no measured choices")
    here = triton_cache.TargetKey.of(target)
    made = triton_cache.TargetKey.from_dict(record["target"])
    reason = f"no kernels run on {target}" if here is None else made.mismatch(here)
    if reason is not None:
        log.info("the artifact's measured kernel choices are not used: %s; the engine measures its own", reason)
        return TuningReport(reason=reason)
    try:
        gemm = skinny_gemm.TABLE.seed(record["gemm"])
        prefill = prefill_tuning.seed_choices(record["prefill"])
    except ValueError as exc:
        raise ArtifactFormatError("manifest.json", f"{FIELD}: {exc}") from None
    return TuningReport(gemm=gemm, prefill=prefill)


def check(record) -> None:
    """The record's outline (verify.py); its rows are checked as they are seeded."""
    if record is None:
        return
    ok = (isinstance(record, dict) and isinstance(record.get("gemm"), list)
          and all(isinstance(r, dict) for r in record["gemm"]) and isinstance(record.get("prefill"), dict))
    if not ok:
        raise ArtifactFormatError("manifest.json", f"malformed field {FIELD!r}")
    try:
        triton_cache.TargetKey.from_dict(record.get("target"))
    except ValueError as exc:
        raise ArtifactFormatError("manifest.json", f"{FIELD}: {exc}") from None
