"""Evaluation: the one place a model is scored (docs/evaluation.md; the protocol: docs/method.md §5).

In-training validation, `toco eval` (in this process or sharded over Ray Data actors), pseudo-label scoring,
`toco predict` and the benchmarks share, in layers:

- `inference`: the test-time path of one image (`predict_image`: resize, scales, flips, fusion, CRF; precision);
- `evaluators`: one small evaluator per metric with integer counts, and `Scores`, the evaluators of one evaluation;
- `scoring`: `ImageScorer` and `score_images`, the one loop over a source;
- `runner`: a split cut into shards, each recorded as it completes (a killed evaluation resumes), scored here or
  by Ray workers (`toco.distributed.evaluate`);
- `writers`: a result folder, its files named the same everywhere, and per-image predictions.

Free of MLflow and the CLI.
"""
from toco.evaluation.evaluators import METRICS, PSEUDO_LABELS, VALIDATION, Scores
from toco.evaluation.inference import (CRF_PARAMS, MS_SCALES, InferenceSettings, Prediction, crf_refine,
                                       predict_image, segment)
from toco.evaluation.runner import (EvalJob, EvalOutcome, ResumeError, ShardResult, ShardScorer, run_evaluation,
                                    shard_ranges, subset_note)
from toco.evaluation.scoring import ImageScorer, ImageView, evaluate_model, score_images
from toco.evaluation.writers import PredictionWriter, picture_grid, write_results

__all__ = ["METRICS", "PSEUDO_LABELS", "VALIDATION", "Scores", "CRF_PARAMS", "MS_SCALES", "InferenceSettings",
           "Prediction", "crf_refine", "predict_image", "segment", "EvalJob", "EvalOutcome", "ResumeError",
           "ShardResult", "ShardScorer", "run_evaluation", "shard_ranges", "subset_note", "ImageScorer", "ImageView",
           "evaluate_model", "score_images", "PredictionWriter", "picture_grid", "write_results"]
