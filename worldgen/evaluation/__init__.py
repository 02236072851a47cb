"""Weights-free offline evaluation of a world model (docs/evaluation.md): ``worldgen eval``."""

from worldgen.evaluation.evaluate import EvalConfig, EvaluationError, evaluate, summary, write_json
from worldgen.evaluation.metrics import PSNR_CAP_DB, psnr, ssim

__all__ = ["EvalConfig", "EvaluationError", "PSNR_CAP_DB", "evaluate", "psnr", "ssim", "summary", "write_json"]
