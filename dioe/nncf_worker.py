"""NNCF's post-training quantization of one OpenVINO IR, run by the OpenVINO backend in a process of its own.

NNCF collects its statistics by compiling the model with extra outputs, and OpenVINO can crash the whole process
there (a segmentation fault, on some models and CPUs): in a child, that costs the candidate, not the caller. The
job is a JSON file naming the IR, the calibration samples (one .npy file per input, read without pickle) and
NNCF's settings; the child writes the quantized IR where the job says and nothing else. It imports neither torch
nor dioe, so that it starts in the time OpenVINO and NNCF take to import.
"""

import json
import logging
import sys


def main(job_file: str) -> None:
    import numpy as np
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import (AdvancedQuantizationParameters,
                                                       AdvancedSmoothQuantParameters, OverflowFix)

    with open(job_file, encoding="utf-8") as f:
        job = json.load(f)
    nncf.set_log_level(logging.ERROR)
    samples = [[np.load(path, allow_pickle=False) for path in sample] for sample in job["samples"]]
    advanced = {}
    if job["overflow_fix"]:
        advanced["overflow_fix"] = OverflowFix.ENABLE
    if job["smooth_quant_off"]:
        advanced["smooth_quant_alphas"] = AdvancedSmoothQuantParameters(matmul=-1)
    model = ov.Core().read_model(job["model"])
    quantized = nncf.quantize(model, nncf.Dataset(samples),
                              model_type=nncf.ModelType(job["model_type"]) if job["model_type"] else None,
                              target_device=nncf.TargetDevice(job["target"]), subset_size=len(samples),
                              advanced_parameters=AdvancedQuantizationParameters(**advanced))
    ov.save_model(quantized, job["out"], compress_to_fp16=False)  # fp32 where NNCF left float stays fp32


if __name__ == "__main__":
    main(sys.argv[1])
