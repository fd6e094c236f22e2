"""``fusegen-cli analyze``."""

from __future__ import annotations

import json

from fusegen.analysis.summary import analyze
from fusegen.analysis.target import gpu_spec, parse_dtype
from fusegen.progress import stage


def run_cli(model_name: str, batch: int, seq: int, gpu: str, dtype: str | None, plot: str | None,
            json_path: str | None, config: str | None, calibration: str | None = None) -> int:
    """``fusegen-cli analyze``: load, compile (with calibration tokens from the text file
    ``calibration`` if the config needs them), analyse, print the table; write the PNG and
    JSON when asked."""
    from fusegen.calibration import compile_calibrated, prepare
    from fusegen.config import CompileConfig
    from fusegen.models import load_model

    spec, override = gpu_spec(gpu), parse_dtype(dtype)  # bad names fail before the slow part
    compile_config = CompileConfig.from_string(config or "")
    tokens = prepare(model_name, compile_config, calibration)
    compiled = compile_calibrated(load_model(model_name), compile_config, tokens, progress=True)
    with stage(f"analysing the optimized graph at batch {batch}, sequence {seq}"):
        result = analyze(compiled, batch, seq, spec, override)
    print(result.table())
    if plot:
        result.plot(plot)
        print(f"roofline plot: {plot}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(result.to_dict(), f, indent=1)
        print(f"json: {json_path}")
    return 0
