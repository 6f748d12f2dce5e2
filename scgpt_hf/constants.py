"""Names the command line shows before it imports anything heavy, so that ``scgpt-hf --help`` stays fast.

The modules that implement them use the same names; tests/test_imports.py checks that they agree.
"""

# `convert_original_checkpoint(task=...)`; the model each task builds is in `convert.TASKS`.
CONVERT_TASKS = ("pretraining", "annotation", "integration", "perturbation", "multiomic")
