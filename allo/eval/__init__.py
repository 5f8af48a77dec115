"""The evaluation suite (docs/method.md §6): QA and math benchmarks with answer checking, and AlpacaEval 2.0 /
Arena-Hard with an LLM judge. It uses `allo.tasks` (checkers), `allo.generate` (backends) and `allo.openai_client` (judges),
never the training code."""
