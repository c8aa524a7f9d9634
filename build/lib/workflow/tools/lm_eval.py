"""lm-evaluation-harness's command line with the `ctxext` model registered: any lm-eval task on one cell of a study
(its checkpoint with its method applied, logits through its attention kind; see `workflow.lm_eval_model`).

    python -m workflow.tools.lm_eval run --model ctxext \
        --model_args cell=results/tiny/cells/yarn-exact-1024-ft --tasks hellaswag
"""
from __future__ import annotations

import sys

import workflow.lm_eval_model  # noqa: F401  (registers the ctxext model with lm-eval)


def main(argv=None) -> None:
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
