"""Evaluation: benchmarks as items (`items`; the registry `tasks`, read by `hub`, `jsonl_task`, `owleval_data`),
batched resumable answering (`runner`), scores (`metrics`, `results`), OwlEval's report (`owleval`) and the
lmms-eval adapter (`lmms_eval`). `openowl eval` drives them."""
