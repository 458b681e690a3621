"""The judge's prompt-file reader, kept importable here: it lives in :mod:`tastelab.io.prompts`.

Why it moved: ``tastelab generate`` (a layer below the judge) reads the same sd-scripts / JSONL prompt files,
and the layers allow it to import ``io`` but not the judge; one parser, so both number prompts identically.
"""

from tastelab.io.prompts import PROMPT_SUFFIXES, Prompt, PromptFileError, load_prompts, parse_prompt_line

__all__ = ["PROMPT_SUFFIXES", "Prompt", "PromptFileError", "load_prompts", "parse_prompt_line"]
