"""Training tasks (quality, pairwise, classification; detection and pose build on the same interface) trained
by one loop.

A task is a :class:`~tastelab.training.tasks.base.Task` subclass registered in
:data:`tastelab.training.registries.TASKS`; a recipe with a top-level ``task:`` key is a task recipe
(:mod:`~tastelab.training.tasks.config`), trained by :class:`~tastelab.training.tasks.loop.TaskTrainer`
with the resume, run-folder, accelerate, optimizer and schedule machinery of
:mod:`tastelab.training.runtime` that the quality trainer shares. See docs/tasks.md.

Nothing is imported here: the modules below import torch.
"""
